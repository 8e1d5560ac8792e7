"""Plot benchmarks/reference/loss.csv (written by train_reference.py) to loss.png."""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> int:
    rows = [r for r in csv.DictReader(open(HERE / "loss.csv")) if r["iteration"].isdigit()]
    it = [int(r["iteration"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(it, loss, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (batch 64)")
    ax.set_ylabel("epsilon MSE (mean of 50 iterations)")
    ax.set_title("Reference model training loss (Fashion-MNIST 32x32)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "loss.png")
    print(f"wrote {HERE / 'loss.png'} ({len(it)} points, last iteration {it[-1]}, last loss {loss[-1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
