"""Turn a pytest-benchmark JSON of the encoder benchmarks into a summary JSON, a markdown table and a plot.

Usage (after ``make bench``, which writes ``benchmarks/results/latest.json``)::

    python -m benchmarks.report benchmarks/results/latest.json

writes ``benchmarks/results/summary.json``, ``docs/benchmarks_table.md`` and
``docs/_static/bench_throughput.png`` (matplotlib, from the ``docs`` extra). Ratios are recomputed here
from the medians of entries measured in the same session, so the JSON alone is enough.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CASE_TITLES = {
    "fixed_b1": "fixed 224, batch 1",
    "fixed_b32": "fixed 224, batch 32",
    "naflex_default": "NaFlex default pipeline (8 images, 256-patch budget)",
    "naflex_native": "NaFlex native, 64...1024 patches (6 images)",
    "text_b256": "text, 256 x 64 tokens",
    "text_b64": "text, 64 x 64 tokens",
    "fixed_b8_train": "fwd+bwd, fixed 224, batch 8",
    "naflex_default_train": "fwd+bwd, NaFlex default pipeline",
    "naflex_native_train": "fwd+bwd, NaFlex native mixed",
}
IMPLEMENTATION_ORDER = ("ours", "transformers", "kornia")

# (case, reference, metric, comparison, threshold, goal text) -- the issue's goals on CPU, float32, median
GOALS = (
    ("naflex_native", "transformers", "speedup", ">=", 2.5, "NaFlex native mixed, packed vs padded throughput"),
    ("naflex_native", "transformers", "memory_ratio", "<=", 0.6, "NaFlex native mixed, peak memory"),
    ("naflex_native_train", "transformers", "speedup", ">=", 2.5, "NaFlex native mixed fwd+bwd, throughput"),
    ("naflex_native_train", "transformers", "memory_ratio", "<=", 0.6, "NaFlex native mixed fwd+bwd, peak memory"),
    ("naflex_default", "transformers", "speedup", ">=", 1.0, "NaFlex default pipeline, forward"),
    ("naflex_default_train", "transformers", "speedup", ">=", 1.0, "NaFlex default pipeline, fwd+bwd"),
    ("fixed_b1", "transformers", "speedup", ">=", 1.0, "fixed 224 batch 1 vs transformers"),
    ("fixed_b1", "kornia", "speedup", ">=", 1.0, "fixed 224 batch 1 vs Kornia 0.9"),
    ("fixed_b32", "transformers", "speedup", ">=", 1.0, "fixed 224 batch 32 vs transformers"),
    ("fixed_b32", "kornia", "speedup", ">=", 1.0, "fixed 224 batch 32 vs Kornia 0.9"),
    ("fixed_b8_train", "transformers", "speedup", ">=", 1.0, "fixed 224 fwd+bwd vs transformers"),
    ("fixed_b8_train", "kornia", "speedup", ">=", 1.0, "fixed 224 fwd+bwd vs Kornia 0.9"),
    ("text", "transformers", "speedup", ">=", 1.0, "text tower vs transformers"),
    ("fixed_b32", None, "peak_fraction", ">=", 0.6, "fixed 224 batch 32 encoder forward, fraction of matmul peak"),
)


def load_entries(path: Path) -> tuple[list[dict], dict]:
    """Encoder entries (those with a ``case`` in ``extra_info``) and the machine info of a pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    entries = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "case" not in info:
            continue  # another suite's entry (e.g. the sigmoid loss)
        stats = bench["stats"]
        info.update(
            name=bench["name"],
            median_s=stats["median"],
            min_s=stats["min"],
            iqr_s=stats["iqr"],
            rounds=stats["rounds"],
        )
        info["items_per_s"] = info["items"] / info["median_s"]
        info["tokens_per_s"] = info["tokens"] / info["median_s"]
        info["achieved_flops"] = info["flops"] / info["median_s"]
        entries.append(info)
    # one denominator for the whole run: the best matmul rate measured at any point of the session
    peak = max((entry["matmul_peak_flops"] for entry in entries), default=0.0)
    for entry in entries:
        entry["matmul_peak_flops"] = peak
        entry["peak_fraction"] = entry["achieved_flops"] / peak
    return entries, data.get("machine_info", {})


def summarize(entries: list[dict], machine: dict) -> dict:
    """Group entries by (size, case), add ratios against ours, and evaluate the goals on the largest size."""
    cases: dict[str, dict[str, dict]] = {}
    for entry in entries:
        cases.setdefault(f"{entry['size']}/{entry['case']}", {})[entry["implementation"]] = entry
    results = []
    for key, by_impl in cases.items():
        size, case = key.split("/")
        ours = by_impl.get("ours")
        for name in sorted(by_impl, key=IMPLEMENTATION_ORDER.index):
            entry = by_impl[name]
            row = {
                "size": size,
                "case": case,
                "implementation": name,
                "train": entry["train"],
                "items": entry["items"],
                "tokens": entry["tokens"],
                "computed_tokens": entry["computed_tokens"],
                "median_s": entry["median_s"],
                "min_s": entry["min_s"],
                "iqr_s": entry["iqr_s"],
                "rounds": entry["rounds"],
                "items_per_s": entry["items_per_s"],
                "tokens_per_s": entry["tokens_per_s"],
                "gflops": entry["flops"] / 1e9,
                "achieved_gflops_per_s": entry["achieved_flops"] / 1e9,
                "peak_fraction": entry["peak_fraction"],
                "peak_memory_mib": entry.get("peak_memory_mib"),
            }
            if ours is not None and name != "ours":
                row["speedup_of_ours"] = entry["median_s"] / ours["median_s"]
                # from the fastest rounds: less sensitive to other processes on a shared machine
                row["speedup_of_ours_min"] = entry["min_s"] / ours["min_s"]
                if entry.get("peak_memory_mib") and ours.get("peak_memory_mib"):
                    row["memory_ratio_of_ours"] = ours["peak_memory_mib"] / entry["peak_memory_mib"]
            results.append(row)
    peaks = [entry["matmul_peak_flops"] for entry in entries]
    sizes = {entry["size"] for entry in entries}
    goal_size = "base" if "base" in sizes else "tiny"
    return {
        "machine": {
            "cpu": machine.get("cpu", {}).get("brand_raw", platform.processor()),
            "cores": machine.get("cpu", {}).get("count"),
            "python": machine.get("python_version"),
            "threads": entries[0]["threads"] if entries else None,
        },
        "matmul_peak_gflops_per_s": max(peaks) / 1e9 if peaks else None,
        "memory_method": (
            "peak RSS of one step in a fresh forked process (ru_maxrss, high-water mark reset after model load) "
            "minus RSS after load; see benchmarks/memory.py"
        ),
        "goals_size": goal_size,
        "goals": evaluate_goals(results, goal_size),
        "results": results,
    }


def evaluate_goals(results: list[dict], size: str) -> list[dict]:
    """Each goal of :data:`GOALS` with its measured value on model ``size`` (``None`` if not measured)."""
    index = {(row["case"], row["implementation"]): row for row in results if row["size"] == size}
    goals = []
    for case, reference, metric, comparison, threshold, text in GOALS:
        if case == "text":  # the text batch depends on the model size
            case = "text_b256" if size == "base" else "text_b64"
        if metric == "peak_fraction":
            row = index.get((case, "ours"))
            value = row["peak_fraction"] if row else None
        else:
            row = index.get((case, reference))
            value = None if row is None else row.get(f"{metric}_of_ours")
        met = None if value is None else (value >= threshold if comparison == ">=" else value <= threshold)
        target = f"{comparison} {threshold}"
        goals.append(
            {"goal": text, "case": case, "reference": reference, "metric": metric, "target": target}
            | {"value": value, "met": met}
        )
    return goals


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def markdown(summary: dict) -> str:
    """The summary as markdown: one table per model size, then the goals."""
    lines = [
        "# Encoder benchmarks",
        "",
        "Generated by `benchmarks/report.py` from `make bench` (pytest-benchmark); do not edit by hand.",
        "",
        f"CPU: {summary['machine']['cpu']}, {summary['machine']['threads']} threads, float32. "
        f"Measured matmul peak (2048^2 `torch.mm`, best of 10): "
        f"**{_fmt(summary['matmul_peak_gflops_per_s'], '.1f')} GFLOP/s**.",
        "",
        "Times are medians. *speedup* = reference time / our time (> 1: ours faster), from medians; *(min)* the "
        "same from the fastest rounds (less sensitive to other load on the machine); *mem ratio* = our peak "
        "memory / the reference's (< 1: ours smaller). GFLOP/s counts useful FLOPs (real tokens only, "
        "`benchmarks/flops.py`), so a padded implementation reads lower; *% peak* is that rate over the matmul "
        f"peak. Memory: {summary['memory_method']}.",
        "",
    ]
    for size in ("base", "tiny"):
        rows = [row for row in summary["results"] if row["size"] == size]
        if not rows:
            continue
        title = "ViT-B/16 (768 wide, 12 layers)" if size == "base" else "tiny model (64 wide, 2 layers): quick mode"
        lines += [
            f"## {title}",
            "",
            "| case | impl | median ms | items/s | tokens/s | GFLOP/s | % peak | peak MiB | speedup | (min) "
            "| mem ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in sorted(rows, key=lambda r: (list(CASE_TITLES).index(r["case"]), r["implementation"] != "ours")):
            lines.append(
                f"| {CASE_TITLES.get(row['case'], row['case'])} | {row['implementation']} "
                f"| {row['median_s'] * 1e3:.1f} | {row['items_per_s']:.2f} | {row['tokens_per_s']:.0f} "
                f"| {row['achieved_gflops_per_s']:.1f} | {100 * row['peak_fraction']:.0f} "
                f"| {_fmt(row['peak_memory_mib'], '.0f')} | {_fmt(row.get('speedup_of_ours'), '.2f')} "
                f"| {_fmt(row.get('speedup_of_ours_min'), '.2f')} | {_fmt(row.get('memory_ratio_of_ours'), '.2f')} |"
            )
        lines.append("")
    lines += [f"## Goals ({summary['goals_size']} model)", ""]
    if summary["goals_size"] != "base":
        lines += ["The goals are stated for ViT-B (`make bench`); on the tiny model they are indicative only.", ""]
    lines += [
        "| goal | target | measured | met |",
        "|---|---|---:|---|",
    ]
    for goal in summary["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {goal['metric']} {goal['target']} | {_fmt(goal['value'], '.2f')} | {met} |")
    lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Real tokens/s and % of the matmul peak against real tokens per batch, packed (ours) vs padded references.

    One column for inference, one for forward + backward; a grey line joins the implementations of a case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    size = summary["goals_size"]
    rows = [row for row in summary["results"] if row["size"] == size]
    styles = {
        "ours": ("tab:blue", "o", "ours (packed)"),
        "transformers": ("tab:orange", "s", "transformers (padded for NaFlex)"),
        "kornia": ("tab:green", "^", "Kornia 0.9 (fixed res only)"),
    }
    metrics = (("tokens_per_s", "real tokens / s", 1.0), ("peak_fraction", "% of matmul peak (useful FLOPs)", 100.0))
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for column, train in enumerate((False, True)):
        selected = [row for row in rows if row["train"] == train]
        for line, (metric, label, scale) in enumerate(metrics):
            axis = axes[line, column]
            for case in {row["case"] for row in selected}:
                pair = sorted((r["tokens"], r[metric] * scale) for r in selected if r["case"] == case)
                axis.plot([p[0] for p in pair], [p[1] for p in pair], color="0.8", zorder=1)
            for name, (color, marker, legend) in styles.items():
                points = [r for r in selected if r["implementation"] == name]
                if not points:
                    continue
                xs = [r["tokens"] for r in points]
                ys = [r[metric] * scale for r in points]
                axis.scatter(xs, ys, color=color, marker=marker, label=legend, zorder=2)
                if name == "ours":
                    for row, x, y in zip(points, xs, ys, strict=True):
                        axis.annotate(
                            row["case"].removesuffix("_train"),
                            (x, y),
                            fontsize=7,
                            xytext=(4, -10) if row["case"].startswith("naflex_native") else (4, 4),
                            textcoords="offset points",
                        )
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
            # label the minor ticks only when the axis spans less than a decade (else they collide)
            spread = max(r["tokens"] for r in selected) / min(r["tokens"] for r in selected)
            axis.xaxis.set_minor_formatter(ScalarFormatter() if spread < 10 else NullFormatter())
            # headroom above the highest point, so its label stays inside the axes and clear of the title
            axis.set_ylim(0, 1.18 * max(r[metric] * scale for r in selected))
            axis.margins(x=0.12)
            axis.set_xlabel("real tokens per batch")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            if line == 0:
                axis.set_title(("forward + backward" if train else "inference") + f", {size} model, CPU fp32")
    # one legend for the figure, below the axes: inside an axis it covered data points
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", type=Path, default=REPO_ROOT / "benchmarks/results/latest.json")
    parser.add_argument("--summary", type=Path, default=REPO_ROOT / "benchmarks/results/summary.json")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "docs/benchmarks_table.md")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs/_static/bench_throughput.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib)")
    args = parser.parse_args(argv)
    entries, machine = load_entries(args.input)
    if not entries:
        raise SystemExit(f"{args.input} holds no encoder benchmark entries.")
    summary = summarize(entries, machine)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown(summary))
    if not args.no_plot:
        try:
            plot(summary, args.plot)
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[docs]'): no plot written.")
    for goal in summary["goals"]:
        status = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        print(f"{status:>12}  {goal['goal']}: {_fmt(goal['value'], '.2f')} (target {goal['target']})")


if __name__ == "__main__":
    main()
