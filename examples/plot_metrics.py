"""Plot the ``metrics.jsonl`` of a ``python -m kornia_siglip2.train`` run: loss, learning rate, tokens/s.

Usage::

    python examples/plot_metrics.py runs/a/metrics.jsonl --out docs/_static/training_recipe_curves.png

A resumed run logs the steps after its checkpoint again; the last line of each step is plotted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(path: Path) -> list[dict]:
    """The last record of every step, in step order."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def running_mean(values: list[float], window: int) -> list[float]:
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        means.append(total / min(index + 1, window))
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=Path("training_recipe_curves.png"))
    parser.add_argument("--title", default="python -m kornia_siglip2.train (torchrun, 2 CPU processes, DDP)")
    args = parser.parse_args(argv)
    records = read_metrics(args.metrics)
    steps = [record["step"] for record in records]
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    losses = [record["loss"] for record in records]
    axes[0].plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
    axes[0].plot(steps, running_mean(losses, 20), color="tab:blue", linewidth=1.6)
    axes[0].set_title("sigmoid loss (global batch)")
    axes[1].plot(steps, [record["lr"] for record in records], color="tab:green")
    axes[1].set_title("learning rate (warmup + cosine)")
    axes[2].plot(steps, [record["tokens_per_s"] for record in records], color="tab:orange", alpha=0.6)
    axes[2].set_title("patch tokens / s (all ranks)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110, metadata={"Software": None})
    plt.close(figure)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
