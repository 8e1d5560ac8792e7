"""Train an in-domain classifier (deterministic; weights shipped with PostDiff).

    python benchmarks/reference/train_classifier.py                    # Fashion-MNIST, about 5 minutes on 2 cores
    python benchmarks/reference/train_classifier.py --dataset digits   # MNIST digits (no flips)

Writes classifier.safetensors beside the dataset's reference weights (postdiff/reference/weights[_digits]/) and
prints the test accuracy (the acceptance bar is 90%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from postdiff_lab import data
from postdiff_lab.reference.classifier import Classifier, weights_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", choices=sorted(data.DATASETS), default="fashion")
    ap.add_argument("--data", default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    WEIGHTS = weights_path(args.dataset)
    flips = args.dataset == "fashion"  # a garment's class does not depend on left-right; a digit's does
    xtr, ytr = data.load("train", args.data, dataset=args.dataset)
    xte, yte = data.load("test", args.data, dataset=args.dataset)
    xtr, xte = data.to_model_space(xtr), data.to_model_space(xte)
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * (len(xtr) // 128))
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            x = xtr[idx]
            flip = (torch.rand(len(x), generator=g) < 0.5) & flips
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (torch.cat([model(xte[i : i + 1000]).argmax(-1) for i in range(0, len(xte), 1000)]) == yte).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.4f}", flush=True)
    from safetensors.torch import save_file

    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = WEIGHTS.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp),
        metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)},
    )
    os.replace(tmp, WEIGHTS)
    (WEIGHTS.parent / "classifier.json").write_text(
        json.dumps(
            {
                "test_accuracy": acc,
                "epochs": args.epochs,
                "seed": args.seed,
                "data": data.SHA256 if args.dataset == "fashion" else data.DIGITS_SHA256,
            },
            indent=2,
        )
    )
    print(f"wrote {WEIGHTS} (test accuracy {acc:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
