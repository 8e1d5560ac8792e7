"""Does a multifunction Core ML package share its weights? Size of the plan's package against a one-function
package of the same weights (the ``baseline`` plan: ``full`` at the full latent size). Runs on any OS.

    python benchmarks/coreml_package_size.py --model arch:sd15 --size 256        # about 9 minutes here
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from postdiff.models import load_model
from postdiff.report import machine_info
from postdiff_coreml.export import UNET_PACKAGE, export_coreml

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:sd15")
    ap.add_argument("--plan", default="postdiff")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default=str(HERE / "results" / "coreml_package_size_sd15_256.json"))
    args = ap.parse_args(argv)
    model = load_model(args.model, need_pipeline=not args.model.startswith("arch:"))
    result = {
        "command": " ".join(["coreml_package_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "packages": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for plan in ("baseline", args.plan):
            t = time.perf_counter()
            folder = export_coreml(model, plan, Path(tmp) / plan, height=args.size, width=args.size, steps=20, scheduler="DDIMScheduler")
            pkg = folder / UNET_PACKAGE
            import coremltools as ct

            functions = [f.name for f in ct.models.MLModel(str(pkg), skip_model_load=True).get_spec().description.functions]
            result["packages"][plan] = {
                "functions": functions,
                "bytes": sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file()),
                "weight_bin_bytes": next(pkg.rglob("weight.bin")).stat().st_size,
                "export_s": round(time.perf_counter() - t),
            }
    single, multi = result["packages"]["baseline"], result["packages"][args.plan]
    result["ratio"] = multi["bytes"] / single["bytes"]
    result["weight_ratio"] = multi["weight_bin_bytes"] / single["weight_bin_bytes"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| package | functions | bytes | weight.bin bytes |\n|---|---|---|---|")
    for plan, r in result["packages"].items():
        print(f"| {plan} | {len(r['functions'])} | {r['bytes']:,} | {r['weight_bin_bytes']:,} |")
    print(f"\n{args.plan} / baseline: {result['ratio']:.4f}x the bytes, {result['weight_ratio']:.4f}x the weights; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
