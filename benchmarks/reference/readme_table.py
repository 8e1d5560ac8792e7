"""Print a recorded ``postdiff eval --json`` result as the Markdown table the docs show (docs/evaluation.md), plus the matched-MACs
comparisons it answers, computed from the JSON (nothing typed by hand).

    python benchmarks/reference/readme_table.py benchmarks/results/eval_reference_2000.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ci(value, ci, fmt):
    if value is None:
        return "identical"
    return f"{value:{fmt}}" + (f" ± {ci:{fmt}}" if ci is not None else "")


def table(result: dict) -> str:
    rows = ["| plan | MACs ratio | speedup | PSNR dB (±95%) | LPIPS (±95%) | FID (clf) | KID (clf) (±std) | class acc |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for p in result["plans"]:
        base = p["plan"] == "baseline"
        rows.append(
            f"| `{p['plan']}` | {p['macs_ratio']:.3f} | {p['speedup']:.2f}x | {'identical' if base else _ci(p['psnr'], p.get('psnr_ci95'), '.2f')} "
            f"| {'0' if base else _ci(p['lpips'], p.get('lpips_ci95'), '.3f')} | {p['fid_classifier']:.2f} "
            f"| {p['kid_classifier']:.2f} ± {p['kid_classifier_std']:.2f} | {p['class_accuracy']:.1%} |"
        )
    return "\n".join(rows)


def matched(result: dict, tolerance: float = 0.03) -> str:
    """Each accelerated plan against the ``steps:N`` plans within ``tolerance`` of its MACs ratio, and at twice it."""
    plans = result["plans"]
    steps = [p for p in plans if p["plan"].startswith("steps:")]
    lines = []
    for p in plans:
        if p["plan"] == "baseline" or p["plan"].startswith("steps:"):
            continue
        for label, target in (("matched MACs", p["macs_ratio"]), ("twice its MACs", 2 * p["macs_ratio"])):
            near = [s for s in steps if abs(s["macs_ratio"] - target) <= tolerance]
            for s in near:
                better = "lower" if p["fid_classifier"] < s["fid_classifier"] else "higher"
                lines.append(
                    f"- `{p['plan']}` ({p['macs_ratio']:.3f}): FID {p['fid_classifier']:.2f}, {p['class_accuracy']:.1%} against "
                    f"`{s['plan']}` at {label} ({s['macs_ratio']:.3f}): FID {s['fid_classifier']:.2f}, {s['class_accuracy']:.1%} "
                    f"(FID {better})"
                )
    return "\n".join(lines)


def main(path: str) -> None:
    result = json.loads(Path(path).read_text())
    print(table(result))
    print()
    print(matched(result))


if __name__ == "__main__":
    main(sys.argv[1])
