"""Quality of quantized bundles on the trained embedded models: fp32, int8 and int4 ONNX bundles side by side.

    python benchmarks/bench_bundle_quality.py                               # reference and digits, N = 1,000
    python benchmarks/bench_bundle_quality.py --models reference --samples 200 --plans postdiff

For each model, plan and weight type: the ONNX bundle (exported once, cached under benchmarks/.bundles/), N samples
generated through ONNX Runtime's numpy loop (the classes in turn, seed ``--seed``: the same noise for every weight
type), then the in-domain metrics of ``postdiff eval``: class accuracy by the model's own classifier and FID/KID on
its 128-d features against the test set, and paired PSNR of each image against the fp32 bundle's image of the same
seed. Prints a Markdown table; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WEIGHTS = ("fp32", "int8", "int4")


def bundle(model: str, plan: str, weights: str) -> Path:
    from postdiff.bundle.export import export_bundle

    folder = HERE / ".bundles" / f"quality-{model}-{plan}-{weights}"
    if not (folder / "manifest.json").is_file():
        print(f"exporting {folder.name}", file=sys.stderr)
        export_bundle("onnx", model, plan, folder, weights=weights, overwrite=folder.exists(), log=lambda m: None)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="reference,digits")
    ap.add_argument("--plans", default="baseline,postdiff")
    ap.add_argument("--weights", default=",".join(WEIGHTS))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "bundle_quality.json"))
    args = ap.parse_args(argv)
    from postdiff.bundle.manifest import read_manifest
    from postdiff_lab.evaluation import _distribution_note
    from postdiff_lab.metrics import frechet_distance, kernel_inception_distance, psnr
    from postdiff_lab.reference.classifier import classify_samples, test_set_features
    from postdiff_lab.report import machine_info
    from postdiff_onnx.runtime import load_bundle

    split = [s.strip() for s in args.models.split(",") if s.strip()], [p.strip() for p in args.plans.split(",") if p.strip()]
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    result = {
        "command": " ".join(["bench_bundle_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "samples": args.samples,
        "seed": args.seed,
        "rows": [],
    }
    lines = [
        "| model | plan | weights | bundle MB | class accuracy | FID (clf) | KID (clf) | PSNR vs fp32 dB (median) | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in split[0]:
        dataset = {"reference": "fashion", "digits": "digits"}[model]
        test = test_set_features(dataset)
        result["note"] = _distribution_note(dataset, len(test))
        labels = [i % 10 for i in range(args.samples)]
        for plan in split[1]:
            fp32 = None
            for w in weights:
                folder = bundle(model, plan, w)
                _, manifest = read_manifest(folder, "onnx")
                start = time.perf_counter()
                images = load_bundle(folder).generate(labels, seed=args.seed)
                seconds = time.perf_counter() - start
                pred, _, feats = classify_samples(images, dataset)
                kid, kid_std = kernel_inception_distance(feats, test, subset_size=min(1000, len(labels)))
                row = {
                    "model": model,
                    "plan": plan,
                    "weights": manifest.weights,
                    "bundle_bytes": (folder / "weights.onnx.data").stat().st_size,
                    "class_accuracy": float((pred == np.asarray(labels)).mean()),
                    "fid_classifier": frechet_distance(feats, test),
                    "kid_classifier": kid,
                    "kid_classifier_std": kid_std,
                    "seconds": seconds,
                }
                if w == "fp32":
                    fp32 = images
                elif fp32 is not None:
                    row["psnr_vs_fp32_median_db"] = float(np.median([psnr(a, b) for a, b in zip(images, fp32)]))
                result["rows"].append(row)
                db = row.get("psnr_vs_fp32_median_db")
                lines.append(
                    f"| {model} | {plan} | {row['weights']} | {row['bundle_bytes'] / 1e6:.2f} | {100 * row['class_accuracy']:.1f}% | "
                    f"{row['fid_classifier']:.2f} | {row['kid_classifier']:.4f} | {'-' if db is None else f'{db:.1f}'} | {seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    from postdiff_lab.report import write_results

    print(f"wrote {write_results(args.out, result, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
