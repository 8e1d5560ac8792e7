"""Every table the CLI prints, drawn one way: Markdown tables and number formats.

The lab computes results as dicts; this module turns them into the tables ``postdiff`` prints. JSON is written
one way too, by ``postdiff_lab.report.write_json`` (standard JSON: a non-finite number is written as null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def _score(value, spread=None) -> str:
    """A distribution metric to two decimals, "n/a" where it could not be computed (too few samples; see the notes)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" + (f" ± {spread:.2f}" if spread is not None and math.isfinite(spread) else "")


def fmt_macs(m: int) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if m >= div:
            return f"{m / div:.2f}{unit}"
    return str(m)


# -- postdiff bench ---------------------------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def bench_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "backend",
        "weights",
        "plan",
        "GMACs",
        "MACs ratio",
        "export s",
        "load s (first/warm)",
        "first run s",
        "median s",
        "min-max s",
        "speedup",
        "peak MB",
        "PSNR dB",
        "SSIM",
        "LPIPS",
    ]
    rows = []
    for r in result["results"]:
        same = r["psnr"] == float("inf")
        rows.append(
            [
                r["backend"]
                + "".join(f" {v}" for k, v in r.get("executed", {}).items() if k == "precision" or (k == "device" and v.lower() != "cpu")),
                r.get("weights", "fp32"),
                r["plan"],
                _fmt(r["macs"] / 1e9, 1),
                _fmt(r["macs_ratio"], 3),
                "-" if "export_s" not in r else ("cached" if r["export_cached"] else _fmt(r["export_s"], 1)),
                f"{_fmt(r['load_s'])}/{_fmt(r['load_warm_s'])}",
                _fmt(r["first_run_s"]),
                _fmt(r["median_s"], 3),
                f"{_fmt(r['min_s'], 3)}-{_fmt(r['max_s'], 3)}",
                f"{r['speedup']:.2f}x",
                f"{r['memory']['peak_rss_mb']:.0f}",
                "identical" if same else _fmt(r["psnr"]),
                _fmt(r["ssim"], 3),
                _fmt(r["lpips"], 3),
            ]
        )
    for s in result["skipped"]:
        rows.append([s["backend"], "-", "skipped (reason below)", *["-"] * (len(headers) - 3)])
    return headers, rows


def bench_step_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["backend", "weights", "plan", "UNet variant", "latent", "batch", "calls", "median ms", "min ms", "max ms"]
    rows = []
    for r in result["results"]:
        for c in r["unet_calls"]:
            rows.append(
                [
                    r["backend"],
                    r.get("weights", "fp32"),
                    r["plan"],
                    c["variant"],
                    c["latent"],
                    str(c["batch"]),
                    str(c["calls"]),
                    _fmt(c["median_ms"], 1),
                    _fmt(c["min_ms"], 1),
                    _fmt(c["max_ms"], 1),
                ]
            )
    return headers, rows


# -- postdiff eval ----------------------------------------------------------------------------------------------------
def eval_size_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    reference = any("fid_classifier" in r for r in result["sizes"])
    headers = ["size", "latent", "trained there", "MACs ratio", "seconds"]
    if reference:
        headers += ["class acc", "test-set acc at this size", "confidence", "FID (clf)", "KID (clf)"]
    rows = []
    for r in result["sizes"]:
        row = [
            f"{r['size']}x{r['size']}",
            f"{r['latent_hw'][0]}x{r['latent_hw'][1]}",
            {True: "yes", False: "NO", None: "unknown"}[r["trained"]],
            f"{r['macs_ratio']:.3f}",
            f"{r['seconds']:.1f}",
        ]
        if reference:
            row += [
                f"{r['class_accuracy']:.1%}",
                f"{r['test_set_accuracy']:.1%}",
                f"{r['class_confidence']:.3f}",
                _score(r["fid_classifier"]),
                _score(r["kid_classifier"]),
            ]
        rows.append(row)
    return headers, rows


def eval_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    reference = any("fid_classifier" in r for r in result["plans"])
    headers = ["plan", "MACs ratio", "seconds", "speedup", "PSNR dB (±95%)", "SSIM", "LPIPS (±95%)"]
    if reference:
        headers += ["FID (clf)", "KID (clf) (±std)", "class acc", "confidence"]
    inception, inception_kid, clip = ({k in r for r in result["plans"]} == {True} for k in ("fid_inception", "kid_inception", "clip_score"))
    headers += ["FID (Inception)"] * inception + ["KID (Inception) (±std)"] * inception_kid + ["CLIP score (±95%)"] * clip
    rows = []
    for r in result["plans"]:
        base = r["plan"] == "baseline"
        row = [
            r["plan"],
            f"{r['macs_ratio']:.3f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "identical" if base else f"{r['psnr']:.2f} ± {r['psnr_ci95']:.2f}",
            "1" if base else f"{r['ssim']:.3f}",
            "0" if base else f"{r['lpips']:.3f} ± {r['lpips_ci95']:.3f}",
        ]
        if reference:
            row += [
                _score(r["fid_classifier"]),
                _score(r["kid_classifier"], r["kid_classifier_std"]),
                f"{r['class_accuracy']:.1%}",
                f"{r['class_confidence']:.3f}",
            ]
        if inception:
            row += [_score(r.get("fid_inception"))]
        if inception_kid:
            row += [_score(r.get("kid_inception"), r.get("kid_inception_std"))]
        if clip:
            row += [f"{r['clip_score']:.2f} ± {r['clip_score_ci95']:.2f}"]
        rows.append(row)
    return headers, rows
