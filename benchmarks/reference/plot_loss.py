"""Plot a training run's loss.csv (written by train_reference.py) to loss.png beside it.

python benchmarks/reference/plot_loss.py                              # the reference model (Fashion-MNIST)
python benchmarks/reference/plot_loss.py benchmarks/reference/digits  # the digits model
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else HERE
    rows = [r for r in csv.DictReader(open(folder / "loss.csv")) if r["iteration"].isdigit()]
    it = [int(r["iteration"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(it, loss, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (batch 64)")
    ax.set_ylabel("epsilon MSE (mean of 50 iterations)")
    from postdiff_lab.data import SOURCES

    name = SOURCES[folder.name if folder.name in SOURCES else "fashion"].title  # benchmarks/reference[/digits]
    ax.set_title(f"{name} model: loss, batches at 16, 24, 32 px")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png")
    print(f"wrote {folder / 'loss.png'} ({len(it)} points, last iteration {it[-1]}, last loss {loss[-1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
