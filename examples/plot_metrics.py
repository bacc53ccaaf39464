"""Plot the ``metrics.jsonl`` of a ``python -m kornia_siglip2.train`` run: losses, learning rate, tokens/s.

Usage::

    python examples/plot_metrics.py runs/a/metrics.jsonl --out docs/_static/training_recipe_curves.png

A resumed run logs the steps after its checkpoint again; the last line of each step is plotted. A run of the
full objective (``--objective siglip2``) gets one panel per term, with the self-distillation switch marked.
"""

from __future__ import annotations

import argparse
import json
import math
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
    full = "sigmoid" in records[0]  # --objective siglip2 logs every term
    panels = (
        ["loss", "sigmoid", "locca", "distillation", "lr", "tokens_per_s"] if full else ["loss", "lr", "tokens_per_s"]
    )
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(15, 3.6 * rows), squeeze=False)
    switch = next((record["step"] for record in records if record.get("distillation")), None)
    titles = {
        "loss": "total loss, weighted (global batch)" if full else "sigmoid loss (global batch)",
        "sigmoid": "sigmoid (image-text)",
        "locca": "LocCa (3 decoder tasks)",
        "lr": "learning rate (warmup + cosine)",
        "tokens_per_s": "patch tokens / s (all ranks)",
    }
    for axis, panel in zip(axes.flat, panels, strict=False):
        if panel == "distillation":
            for name, color in (("consistency", "tab:purple"), ("masked", "tab:brown")):
                pairs = [(r["step"], r[name]) for r in records if r.get(name) is not None]
                if pairs:
                    xs, ys = zip(*pairs, strict=True)
                    axis.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
                    axis.plot(xs, running_mean(list(ys), 10), color=color, linewidth=1.6, label=name)
            # computed from the switch on only: zoom in
            axis.set_xlim((switch or 0) - 0.02 * steps[-1], steps[-1])
            axis.legend(loc="upper right")
            axis.set_title("SILC consistency / TIPS masked (unweighted)")
        elif panel in ("loss", "sigmoid", "locca"):
            values = [record[panel] for record in records]
            axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
            axis.plot(steps, running_mean(values, 20), color="tab:blue", linewidth=1.6)
            axis.set_title(titles[panel])
        else:
            color = "tab:green" if panel == "lr" else "tab:orange"
            axis.plot(steps, [record[panel] for record in records], color=color, alpha=0.6 if panel != "lr" else 1)
            axis.set_title(titles[panel])
        if switch is not None and panel not in ("lr",):
            axis.axvline(switch, color="tab:red", linestyle="--", linewidth=1.0)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110, metadata={"Software": None})
    plt.close(figure)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
