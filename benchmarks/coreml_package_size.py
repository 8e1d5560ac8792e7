"""Does a multifunction Core ML package share its weights? Size of the plan's package against a one-function
package of the same weights (the ``baseline`` plan: ``full`` at the full latent size). Runs on any OS.

    python benchmarks/coreml_package_size.py --model arch:sd15 --size 256        # about 9 minutes here
    python benchmarks/coreml_package_size.py --model reference                  # about 1 minute
    python benchmarks/coreml_package_size.py --model toy-sdxl --plan deepcache

Each function carries its own MIL program beside the shared weights, so ``program_bytes`` (model.mlmodel) is
what grows with the number of functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import coremltools as ct

from postdiff.families.model import load_model
from postdiff_coreml.export import UNET_PACKAGE, export_coreml
from postdiff_lab.report import machine_info

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:sd15")
    ap.add_argument("--plan", default="postdiff")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's own)")
    ap.add_argument("--out", default=None, help="JSON file (default: results/coreml_package_size_<model>[_<size>].json)")
    args = ap.parse_args(argv)
    if args.out is None:
        stem = args.model.replace("arch:", "") + (f"_{args.size}" if args.size else "")
        args.out = str(HERE / "results" / f"coreml_package_size_{stem}.json")
    model = load_model(args.model, need_pipeline=None)
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
            functions = [f.name for f in ct.models.MLModel(str(pkg), skip_model_load=True).get_spec().description.functions]
            result["packages"][plan] = {
                "functions": functions,
                "bytes": sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file()),
                "weight_bin_bytes": next(pkg.rglob("weight.bin")).stat().st_size,
                "program_bytes": next(pkg.rglob("model.mlmodel")).stat().st_size,
                "export_s": round(time.perf_counter() - t),
            }
    single, multi = result["packages"]["baseline"], result["packages"][args.plan]
    result["ratio"] = multi["bytes"] / single["bytes"]
    result["weight_ratio"] = multi["weight_bin_bytes"] / single["weight_bin_bytes"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.model}, fp16 weights; package = the UNet's .mlpackage\n")
    print("| plan | functions | package bytes | weight.bin bytes | program bytes |\n|---|---|---|---|---|")
    for plan, r in result["packages"].items():
        print(f"| {plan} | {len(r['functions'])} | {r['bytes']:,} | {r['weight_bin_bytes']:,} | {r['program_bytes']:,} |")
    print(f"\n{args.plan} / baseline: {result['ratio']:.4f}x the bytes, {result['weight_ratio']:.4f}x the weights; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
