"""Train a tiny SigLIP 2 from scratch with the full SigLIP 2 loss on generated shapes, on the CPU.

Sigmoid + LocCa from the start, SILC consistency + TIPS masked prediction switched on at 80 % of training
(the EMA teacher copied from the student at that step); logs each term, writes ``history.csv`` and, with
matplotlib, ``training_curves.png`` to ``--out``, then evaluates zero-shot retrieval (image -> caption among
the held-out captions) on held-out generated images. See ``docs/training.md``.

Usage::

    python examples/train_synthetic.py --steps 1500 --seed 0 --out runs/synthetic --device cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

# the data, tokenizer and training loop live next to this script (examples/synthetic.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import TrainConfig, TrainResult, evaluate, train, window_means

from kornia_siglip2.losses.siglip2 import LOSS_TERMS


def write_history(result: TrainResult, folder: Path) -> Path:
    """Write the per-step history as CSV (empty cells where a term was not computed)."""
    path = folder / "history.csv"
    keys = list(result.history)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(keys)
        for row in zip(*(result.history[key] for key in keys), strict=True):
            writer.writerow(["" if isinstance(value, float) and math.isnan(value) else value for value in row])
    return path


def plot_history(result: TrainResult, path: Path, distill_start: float, smoothing: int = 25) -> bool:
    """Plot each term (raw and running mean) against the step; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    history = result.history
    steps = history["step"]
    switch = distill_start * len(steps)
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for axis, name in zip(axes, ("loss", *LOSS_TERMS), strict=True):
        pairs = [(step, value) for step, value in zip(steps, history[name], strict=True) if not math.isnan(value)]
        xs, ys = zip(*pairs, strict=True)
        axis.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8)
        axis.plot(xs, _running_mean(ys, smoothing), color="tab:blue", linewidth=1.6)
        axis.axvline(switch, color="tab:red", linestyle="--", linewidth=1.0, label="SILC/TIPS on")
        axis.set_xlabel("step")
        if name in ("consistency", "masked"):  # computed from the switch on only: zoom in
            axis.set_xlim(switch - 0.02 * len(steps), len(steps))
            axis.set_title(f"{name} (from step {round(switch)})")
        else:
            axis.set_xlim(0, len(steps))
            axis.set_title("total (weighted)" if name == "loss" else name)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    figure.suptitle("Tiny SigLIP 2 on generated shapes: the SigLIP 2 loss terms (unweighted)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        means.append(total / min(index + 1, window))
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="output folder (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="(default %(default)s)")
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help="peak AdamW rate (%(default)s)")
    parser.add_argument("--distill-start", type=float, default=TrainConfig.distill_start, help="(%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s; 0: torch's)")
    parser.add_argument("--eval-images", type=int, default=720, help="held-out images (default %(default)s)")
    args = parser.parse_args(argv)

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        distill_start=args.distill_start,
        seed=args.seed,
        device=args.device,
        threads=args.threads or None,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"config: {asdict(config)}")
    result = train(config)
    print(f"trained {config.steps} steps in {result.seconds:.1f} s")

    window = max(1, min(50, round(0.05 * config.steps)))
    summary: dict[str, object] = {"config": asdict(config), "train_seconds": result.seconds, "terms": {}}
    print(f"mean of the first and last {window} computed steps of each term:")
    for name in LOSS_TERMS:
        first, last = window_means(result.history, name, window)
        summary["terms"][name] = {"first": first, "last": last}
        print(f"  {name:12s} {first:8.4f} -> {last:8.4f}")

    evaluation = evaluate(result, num_images=args.eval_images, seed=10_000 + args.seed)
    summary["eval"] = asdict(evaluation)
    print(
        f"zero-shot retrieval on {evaluation.num_images} held-out images, {evaluation.num_captions} captions: "
        f"top-1 {evaluation.retrieval_accuracy:.1%} (chance {evaluation.chance:.1%})"
    )
    print(f"LocCa: greedy caption exact match {evaluation.caption_accuracy:.1%}, box IoU {evaluation.box_iou:.3f}")

    print(f"wrote {write_history(result, args.out)}")
    plot = args.out / "training_curves.png"
    if plot_history(result, plot, config.distill_start):
        print(f"wrote {plot}")
    else:
        print("matplotlib is not installed: no plot, the curves are in history.csv (pip install matplotlib)")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
