"""Turn a pytest-benchmark JSON of ``make bench`` into a summary JSON, a markdown table and a plot.

Three kinds of entries are summarized: the encoder cases (``case`` in ``extra_info``), the end-to-end embedding
of a folder of JPEGs (``embed_case``, ``benchmarks/test_bench_embed.py``) and loading a checkpoint
(``load_case``, ``benchmarks/test_bench_load.py``).

Usage (after ``make bench``, which writes ``benchmarks/results/latest.json``)::

    python -m benchmarks.report benchmarks/results/latest.json [more.json ...]

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
    "naflex_equal": "NaFlex equal grids (8 x 14 x 14)",
    "naflex_native": "NaFlex native, 64...1024 patches (6 images)",
    "text_b256": "text, 256 x 64 tokens",
    "text_b64": "text, 64 x 64 tokens",
    "fixed_b8_train": "fwd+bwd, fixed 224, batch 8",
    "naflex_default_train": "fwd+bwd, NaFlex default pipeline",
    "naflex_native_train": "fwd+bwd, NaFlex native mixed",
}
#: short names for the tables (the titles above are their legend)
CASE_SHORT = {
    "fixed_b1": "fixed b1",
    "fixed_b32": "fixed b32",
    "naflex_default": "NaFlex default",
    "naflex_equal": "NaFlex equal",
    "naflex_native": "NaFlex mixed",
    "text_b256": "text b256",
    "text_b64": "text b64",
    "fixed_b8_train": "train fixed b8",
    "naflex_default_train": "train NaFlex default",
    "naflex_native_train": "train NaFlex mixed",
}
IMPLEMENTATION_ORDER = ("ours", "ours_inductor", "ours_onnxruntime", "transformers", "transformers_inductor", "kornia")
DTYPE_ORDER = ("float32", "bfloat16", "float16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SIZE_TITLES = {
    "base": "ViT-B/16 (768 wide, 12 layers)",
    "vitb4": "ViT-B/16 width, 4 layers (768 wide, MLP 3072, 12 heads)",
    "tiny": "tiny model (64 wide, 2 layers): quick mode",
}
SIZE_ORDER = ("vitb4", "base", "tiny")
#: the goals are stated for ViT-B widths; the tiny model measures the same code paths, not the same balance
GOAL_SIZES = ("vitb4", "base")

# (case, dtype, reference, metric, comparison, threshold, goal text, source)
GOALS = (
    ("fixed_b1", "float32", "transformers", "speedup", ">=", 1.1, "fp32 fixed 224 batch 1", "issue 17"),
    ("fixed_b32", "float32", "transformers", "speedup", ">=", 1.1, "fp32 fixed 224 batch 32", "issue 17"),
    (
        "naflex_native",
        "float32",
        "transformers",
        "speedup",
        ">=",
        2.5,
        "fp32 NaFlex mixed, packed vs padded",
        "issue 17",
    ),
    (
        "naflex_native",
        "bfloat16",
        "transformers",
        "speedup",
        ">=",
        3.0,
        "bf16 NaFlex mixed, packed vs padded",
        "issue 17",
    ),
    ("fixed_b32", "bfloat16", "transformers", "speedup", ">=", 1.25, "bf16 fixed 224 batch 32", "issue 17"),
    ("fixed_b32", "bfloat16", None, "peak_fraction", ">=", 0.7, "bf16 fixed 224 batch 32, of bf16 peak", "issue 17"),
    ("naflex_equal", "bfloat16", "transformers", "speedup", ">=", 1.25, "bf16 NaFlex equal grids", "issue 17"),
    ("naflex_equal", "bfloat16", None, "peak_fraction", ">=", 0.7, "bf16 NaFlex equal grids, of bf16 peak", "issue 17"),
    (
        "naflex_native",
        "float32",
        "transformers",
        "memory_ratio",
        "<=",
        0.6,
        "fp32 NaFlex mixed, peak memory",
        "earlier",
    ),
    ("naflex_native_train", "float32", "transformers", "speedup", ">=", 2.5, "fp32 NaFlex mixed fwd+bwd", "earlier"),
    (
        "naflex_native_train",
        "float32",
        "transformers",
        "memory_ratio",
        "<=",
        0.6,
        "fp32 NaFlex mixed fwd+bwd, peak memory",
        "earlier",
    ),
    ("naflex_default", "float32", "transformers", "speedup", ">=", 1.0, "fp32 NaFlex default pipeline", "earlier"),
    ("naflex_default_train", "float32", "transformers", "speedup", ">=", 1.0, "fp32 NaFlex default fwd+bwd", "earlier"),
    ("fixed_b1", "float32", "kornia", "speedup", ">=", 1.0, "fp32 fixed 224 batch 1 vs Kornia 0.9", "earlier"),
    ("fixed_b32", "float32", "kornia", "speedup", ">=", 1.0, "fp32 fixed 224 batch 32 vs Kornia 0.9", "earlier"),
    ("fixed_b8_train", "float32", "transformers", "speedup", ">=", 1.0, "fp32 fixed 224 fwd+bwd", "earlier"),
    ("text", "float32", "transformers", "speedup", ">=", 1.0, "fp32 text tower", "earlier"),
    ("fixed_b32", "float32", None, "peak_fraction", ">=", 0.6, "fp32 fixed 224 batch 32, of fp32 peak", "earlier"),
    # issue 25: ours compiled (inductor) against transformers compiled and against ours eager, every compiled case
    *(
        (
            case,
            dtype,
            reference,
            "compiled_speedup",
            ">=",
            1.0,
            f"{dtype_short} {title}, ours compiled vs {name}",
            "issue 25",
        )
        for case, title in (
            ("fixed_b1", "fixed 224 batch 1"),
            ("fixed_b32", "fixed 224 batch 32"),
            ("naflex_default", "NaFlex default pipeline"),
            ("naflex_equal", "NaFlex equal grids"),
            ("naflex_native", "NaFlex mixed"),
        )
        for dtype, dtype_short in (("float32", "fp32"), ("bfloat16", "bf16"))
        for reference, name in (("transformers_inductor", "transformers compiled"), ("ours", "ours eager"))
    ),
    (
        "naflex_native",
        "float32",
        "transformers_inductor",
        "compiled_speedup",
        ">=",
        2.5,
        "fp32 NaFlex mixed, ours compiled vs transformers compiled",
        "issue 25",
    ),
    (
        "fixed_b32",
        "bfloat16",
        "transformers",
        "compiled_speedup",
        ">=",
        1.25,
        "bf16 fixed 224 batch 32, compiled",
        "issue 25",
    ),
    (
        "naflex_equal",
        "bfloat16",
        "transformers",
        "compiled_speedup",
        ">=",
        1.25,
        "bf16 NaFlex equal grids, compiled",
        "issue 25",
    ),
)


#: (kind, case, metric, threshold, goal text): goals of the embedding and loading entries, all ``>=``
PIPELINE_GOALS = (
    ("embed", "embed_vitb4_float32", "speedup_vs_transformers", 1.5, "end-to-end embedding, 200 JPEGs, fp32"),
    ("embed", "embed_vitb4_bfloat16", "speedup_vs_transformers", 1.5, "end-to-end embedding, 200 JPEGs, bf16"),
    ("load", "so400m", "load_s_speedup_vs_transformers", 1.0, "from_pretrained time, So400m width, fixed"),
    ("load", "so400m-naflex", "load_s_speedup_vs_transformers", 1.0, "from_pretrained time, So400m width, NaFlex"),
)
LOAD_TITLES = {
    "tiny": "tiny checkpoint",
    "so400m": "So400m width (1152, 8 + 4 layers), fixed 224",
    "so400m-naflex": "So400m width (1152, 8 + 4 layers), NaFlex",
}


def pipeline_entries(paths: list[Path]) -> dict[str, list[dict]]:
    """The embedding (``embed_case``) and loading (``load_case``) entries of pytest-benchmark JSONs, as rows."""
    rows: dict[str, list[dict]] = {"embed": [], "load": []}
    for path in paths:
        for bench in json.loads(Path(path).read_text()).get("benchmarks", []):
            info = bench.get("extra_info", {})
            stats = bench.get("stats") or {}
            if "embed_case" in info:
                rows["embed"].append({**info, "median_s": stats.get("median"), "rounds": stats.get("rounds")})
            elif "load_case" in info:
                rows["load"].append({**info, "rounds": stats.get("rounds")})
    # speedups again from the medians of the same run (a file may hold entries the test did not pair)
    for kind, key, time_keys in (
        ("embed", "embed_case", ("median_s",)),
        ("load", "load_case", ("load_s", "process_s")),
    ):
        by_case: dict[str, dict[str, dict]] = {}
        for row in rows[kind]:
            by_case.setdefault(row[key], {})[row["implementation"]] = row
        for implementations in by_case.values():
            reference = implementations.get("transformers")
            for name, row in implementations.items():
                if reference is None or name == "transformers":
                    continue
                for time_key in time_keys:
                    if row.get(time_key) and reference.get(time_key):
                        metric = "speedup_vs_transformers" if kind == "embed" else f"{time_key}_speedup_vs_transformers"
                        row[metric] = reference[time_key] / row[time_key]
    return rows


def evaluate_pipeline_goals(pipeline: dict[str, list[dict]]) -> list[dict]:
    """Each goal of :data:`PIPELINE_GOALS` with the value measured for ours (``None`` if not measured)."""
    goals = []
    for kind, case, metric, threshold, text in PIPELINE_GOALS:
        key = "embed_case" if kind == "embed" else "load_case"
        row = next((r for r in pipeline[kind] if r[key] == case and r["implementation"] == "ours"), None)
        value = None if row is None else row.get(metric)
        met = None if value is None else value >= threshold
        size = "vitb4" if kind == "embed" else case
        goals.append(
            {
                "goal": text,
                "size": size,
                "case": case,
                "dtype": row.get("dtype") if row else None,
                "reference": "transformers",
            }
            | {"metric": metric, "target": f">= {threshold}", "value": value, "met": met, "source": "issue 17"}
        )
    return goals


def load_entries(paths: list[Path]) -> tuple[list[dict], dict]:
    """Encoder entries (those with a ``case`` in ``extra_info``) and the machine info of pytest-benchmark JSONs.

    Several files may be given (e.g. a float32 run and a bfloat16 run); ratios are only ever taken between
    entries of one (size, dtype, case), which one file holds whole.
    """
    entries, machine = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        machine = machine or data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            if "case" not in info or bench.get("stats") is None:
                continue  # another suite's entry (e.g. the sigmoid loss)
            stats = bench["stats"]
            info.setdefault("dtype", "float32")
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
    # one denominator per dtype: the best matmul rate of that dtype measured at any point of the run
    peaks: dict[str, float] = {}
    for entry in entries:
        peaks[entry["dtype"]] = max(peaks.get(entry["dtype"], 0.0), entry["matmul_peak_flops"])
    for entry in entries:
        entry["matmul_peak_flops"] = peaks[entry["dtype"]]
        entry["peak_fraction"] = entry["achieved_flops"] / peaks[entry["dtype"]]
    return entries, machine


def summarize(entries: list[dict], machine: dict, pipeline: dict[str, list[dict]] | None = None) -> dict:
    """Group entries by (size, dtype, case), add ratios against ours, and evaluate the goals on ViT-B sizes.

    ``pipeline``: the embedding and loading rows of :func:`pipeline_entries`, kept and evaluated beside.
    """
    pipeline = pipeline or {"embed": [], "load": []}
    cases: dict[tuple[str, str, str], dict[str, dict]] = {}
    for entry in entries:
        cases.setdefault((entry["size"], entry["dtype"], entry["case"]), {})[entry["implementation"]] = entry
    results = []
    for (size, dtype, case), by_impl in cases.items():
        ours = by_impl.get("ours")
        compiled = by_impl.get("ours_inductor")
        for name in sorted(by_impl, key=IMPLEMENTATION_ORDER.index):
            entry = by_impl[name]
            row = {
                "size": size,
                "dtype": dtype,
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
                "rel_err_vs_fp32": entry.get("rel_err_vs_fp32"),
                "min_cos_vs_fp32": entry.get("min_cos_vs_fp32"),
                "load_average": entry.get("load_average"),
            }
            if compiled is not None and name != "ours_inductor":  # ours compiled against this entry
                row["compiled_speedup_of_ours"] = entry["median_s"] / compiled["median_s"]
            if ours is not None and name != "ours":
                row["speedup_of_ours"] = entry["median_s"] / ours["median_s"]
                # from the fastest rounds: less sensitive to other processes on a shared machine
                row["speedup_of_ours_min"] = entry["min_s"] / ours["min_s"]
                if entry.get("peak_memory_mib") and ours.get("peak_memory_mib"):
                    row["memory_ratio_of_ours"] = ours["peak_memory_mib"] / entry["peak_memory_mib"]
            results.append(row)
    peaks: dict[str, float] = {}
    for entry in entries:
        peaks[entry["dtype"]] = entry["matmul_peak_flops"] / 1e9
    sizes = {entry["size"] for entry in entries}
    loads = [entry["load_average"] for entry in entries if entry.get("load_average") is not None]
    cpu = next((entry["cpu"] for entry in entries if entry.get("cpu")), None)
    return {
        "machine": {
            "cpu": cpu or machine.get("cpu", {}).get("brand_raw", platform.processor()),
            "cores": machine.get("cpu", {}).get("count"),
            "python": machine.get("python_version"),
            "threads": entries[0]["threads"] if entries else None,
            "load_average_min": min(loads) if loads else None,
            "load_average_max": max(loads) if loads else None,
        },
        "matmul_peak_gflops_per_s": {dtype: peaks[dtype] for dtype in DTYPE_ORDER if dtype in peaks},
        "memory_method": (
            "peak RSS of one step in a fresh forked process (ru_maxrss, high-water mark reset after model load) "
            "minus RSS after load; see benchmarks/memory.py"
        ),
        "goal_sizes": [size for size in GOAL_SIZES if size in sizes],
        "goals": [goal for size in GOAL_SIZES if size in sizes for goal in evaluate_goals(results, size)]
        + [goal for goal in evaluate_pipeline_goals(pipeline) if goal["value"] is not None or sizes & set(GOAL_SIZES)],
        "results": results,
        "embed": pipeline["embed"],
        "load": pipeline["load"],
    }


def evaluate_goals(results: list[dict], size: str) -> list[dict]:
    """Each goal of :data:`GOALS` with its measured value on model ``size`` (``None`` if not measured)."""
    index = {(row["case"], row["dtype"], row["implementation"]): row for row in results if row["size"] == size}
    goals = []
    for case, dtype, reference, metric, comparison, threshold, text, source in GOALS:
        if case == "text":  # the text batch depends on the model size
            case = "text_b256" if size == "base" else "text_b64"
        if metric == "peak_fraction":
            row = index.get((case, dtype, "ours"))
            value = row["peak_fraction"] if row else None
        else:
            row = index.get((case, dtype, reference))
            value = None if row is None else row.get(f"{metric}_of_ours")
        met = None if value is None else (value >= threshold if comparison == ">=" else value <= threshold)
        target = f"{comparison} {threshold}"
        goals.append(
            {"goal": text, "size": size, "case": case, "dtype": dtype, "reference": reference, "metric": metric}
            | {"target": target, "value": value, "met": met, "source": source}
        )
    return goals


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(
        rows, key=lambda r: (list(CASE_TITLES).index(r["case"]), IMPLEMENTATION_ORDER.index(r["implementation"]))
    )


def _machine_line(summary: dict) -> str:
    machine = summary["machine"]
    line = f"CPU: {machine['cpu']}, {machine['threads']} threads"
    if machine.get("load_average_max") is not None:
        line += (
            f"; 1-minute load average during the entries {machine['load_average_min']:.1f} to "
            f"{machine['load_average_max']:.1f}"
        )
        if machine["threads"] and machine["load_average_max"] > machine["threads"] + 0.5:
            line += " (above the thread count: other processes shared the cores)"
    return line + "."


def _peaks_line(summary: dict) -> str:
    peaks = ", ".join(
        f"{DTYPE_SHORT[dtype]} **{value:.1f} GFLOP/s**" for dtype, value in summary["matmul_peak_gflops_per_s"].items()
    )
    return f"Measured matmul peak (square `F.linear`, `benchmarks/flops.py`): {peaks}."


def markdown(summary: dict) -> str:
    """The summary as markdown: one narrow table per (model size, dtype), then the goals."""
    lines = [
        "# Encoder benchmarks",
        "",
        "Generated by `benchmarks/report.py` from `make bench` (pytest-benchmark); do not edit by hand.",
        "",
        _machine_line(summary),
        "",
        _peaks_line(summary),
        "",
        "*ms*: median time of one step. *speedup*: reference time / our time (> 1: ours faster), same run, same "
        "dtype; *compiled speedup*: reference time / the time of ours under `torch.compile` (`ours_inductor`; "
        "`*_inductor`: `torch.compile`, `ours_onnxruntime`: the exported ONNX file in onnxruntime). "
        "*GFLOP/s* counts useful FLOPs (real tokens only, `benchmarks/flops.py`), so a padded "
        "implementation reads lower; *% peak*: that rate over the matmul peak of the same dtype. *MiB*: peak "
        f"memory of the step ({summary['memory_method']}); *mem*: our MiB / the reference's. *rel err*, *cos*: "
        "max abs error of the pooled features over their max abs value, and the smallest cosine similarity, "
        "against our float32 features (first two items of the case; fp32 rows: the other implementation "
        "against ours).",
        "",
        "Cases: " + "; ".join(f"*{CASE_SHORT[case]}*: {title}" for case, title in CASE_TITLES.items()) + ".",
        "",
    ]
    for size in SIZE_ORDER:
        size_rows = [row for row in summary["results"] if row["size"] == size]
        if not size_rows:
            continue
        lines += [f"## {SIZE_TITLES.get(size, size)}", ""]
        for dtype in DTYPE_ORDER:
            rows = [row for row in size_rows if row["dtype"] == dtype]
            if not rows:
                continue
            peak = summary["matmul_peak_gflops_per_s"][dtype]
            lines += [
                f"### {dtype} (peak {peak:.1f} GFLOP/s)",
                "",
                "| case | impl | ms | GFLOP/s | % peak | MiB | speedup | compiled speedup | mem | rel err | cos |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for row in _ordered(rows):
                lines.append(
                    f"| {CASE_SHORT.get(row['case'], row['case'])} | {row['implementation']} "
                    f"| {row['median_s'] * 1e3:.1f} | {row['achieved_gflops_per_s']:.1f} "
                    f"| {100 * row['peak_fraction']:.0f} | {_fmt(row['peak_memory_mib'], '.0f')} "
                    f"| {_fmt(row.get('speedup_of_ours'), '.2f')} | {_fmt(row.get('compiled_speedup_of_ours'), '.2f')} "
                    f"| {_fmt(row.get('memory_ratio_of_ours'), '.2f')} "
                    f"| {_fmt(row.get('rel_err_vs_fp32'), '.1e')} | {_fmt(row.get('min_cos_vs_fp32'), '.5f')} |"
                )
            lines.append("")
    lines += _pipeline_markdown(summary)
    lines += ["## Goals", ""]
    if not summary["goal_sizes"]:
        lines += [
            "The goals are stated for ViT-B widths; this run measured only the tiny model, so none applies "
            "(`make bench` measures them).",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "Stated for ViT-B widths (`issue 17`: the speed issue's targets; `earlier`: the first benchmark issue's), "
        "each a ratio measured in one run.",
        "",
        "| model | goal | target | measured | met | from |",
        "|---|---|---|---:|---|---|",
    ]
    for goal in summary["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        lines.append(
            f"| {goal['size']} | {goal['goal']} | {goal['metric']} {goal['target']} | {_fmt(goal['value'], '.2f')} "
            f"| {met} | {goal['source']} |"
        )
    lines.append("")
    return "\n".join(lines)


def _pipeline_markdown(summary: dict) -> list[str]:
    """The end-to-end embedding and the loading tables (empty when the run measured neither)."""
    lines: list[str] = []
    embed_rows = sorted(
        summary.get("embed", []),
        key=lambda r: (
            SIZE_ORDER.index(r["size"]) if r.get("size") in SIZE_ORDER else 9,
            DTYPE_ORDER.index(r["dtype"]),
            ("ours", "ours-draft", "transformers").index(r["implementation"]),
        ),
    )
    if embed_rows:
        first = embed_rows[0]
        lines += [
            "## End-to-end embedding of a folder of photos",
            "",
            f"{first['images']} generated JPEGs of phone / camera / web sizes (480x640 to 3024x4032, both "
            "orientations) -> decode -> NaFlex preprocessing (256-patch budget) -> encode -> one embeddings file "
            "(`benchmarks/test_bench_embed.py`). *ours*: the `embed` command's pipeline (DataLoader workers, "
            "token-budget packed batches, Pillow decoding: transformers' pixels); *ours-draft*: the same with "
            "`--decoder pillow-draft` (JPEGs decoded at a reduced scale, >= 2x the model input; not pixel-exact, "
            "*cos*: smallest cosine of its embeddings to the exact ones); *transformers*: `load_image` + "
            "`Siglip2ImageProcessorPil` + `get_image_features` in batches of 32. Model loading is not timed. "
            "bf16 is what `--dtype auto` picks on a CPU with native bf16 matmul.",
            "",
            "| model | dtype | impl | s | images/s | speedup | cos |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for row in embed_rows:
            lines.append(
                f"| {row.get('size', '-')} | {row['dtype']} | {row['implementation']} | {row['median_s']:.2f} "
                f"| {row['images'] / row['median_s']:.2f} | {_fmt(row.get('speedup_vs_transformers'), '.2f')} "
                f"| {_fmt(row.get('min_cos_vs_exact_decode'), '.5f')} |"
            )
        lines.append("")
    load_rows = sorted(
        summary.get("load", []),
        key=lambda r: (
            list(LOAD_TITLES).index(r["load_case"]) if r["load_case"] in LOAD_TITLES else 9,
            r["implementation"],
        ),
    )
    if load_rows:
        lines += [
            "## Loading a checkpoint",
            "",
            "Each round a fresh process (`benchmarks/test_bench_load.py`, `benchmarks/load.py`): *load s*: "
            "`from_pretrained` alone (median); *process s*: interpreter start, imports, load and one forward; "
            "*speedup*: transformers' time / ours. Memory in MiB: *RSS load* counts the checkpoint's file pages "
            "mapped in (ours reads every weight once while loading, for the finite-weight check; transformers maps "
            "the file and reads a page on first use); *anon*: private memory after one forward (RssAnon).",
            "",
            "| checkpoint | impl | load s | process s | RSS load | RSS forward | anon forward | load speedup "
            "| process speedup |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in load_rows:
            lines.append(
                f"| {LOAD_TITLES.get(row['load_case'], row['load_case'])} | {row['implementation']} "
                f"| {_fmt(row.get('load_s'), '.2f')} | {_fmt(row.get('process_s'), '.2f')} "
                f"| {_fmt(row.get('rss_load_mib'), '.0f')} | {_fmt(row.get('rss_forward_mib'), '.0f')} "
                f"| {_fmt(row.get('anon_forward_mib'), '.0f')} "
                f"| {_fmt(row.get('load_s_speedup_vs_transformers'), '.2f')} "
                f"| {_fmt(row.get('process_s_speedup_vs_transformers'), '.2f')} |"
            )
        lines.append("")
    return lines


def short_table(summary: dict) -> str:
    """A terminal table a person can read: one row per (size, case), ours' time and speedup per dtype."""
    dtypes = [dtype for dtype in DTYPE_ORDER if any(row["dtype"] == dtype for row in summary["results"])]
    index = {(r["size"], r["dtype"], r["case"], r["implementation"]): r for r in summary["results"]}
    header = f"{'model':<6}{'case':<21}" + "".join(
        f"{DTYPE_SHORT[d] + ' ms':>10}{'vs trf':>8}" + (f"{'err':>9}" if d != "float32" else "") for d in dtypes
    )
    lines = [_machine_line(summary), _peaks_line(summary).replace("**", ""), "", header, "-" * len(header)]
    for size in SIZE_ORDER:
        for case in CASE_TITLES:
            if not any((size, d, case, "ours") in index for d in dtypes):
                continue
            line = f"{size:<6}{CASE_SHORT[case]:<21}"
            for dtype in dtypes:
                ours = index.get((size, dtype, case, "ours"))
                reference = index.get((size, dtype, case, "transformers"))
                line += f"{_fmt(ours and ours['median_s'] * 1e3, '10.1f'):>10}"
                speedup = reference.get("speedup_of_ours") if reference else None
                line += f"{_fmt(speedup, '7.2f') + ('x' if speedup else ''):>8}"
                if dtype != "float32":
                    line += f"{_fmt(ours and ours.get('rel_err_vs_fp32'), '9.1e'):>9}"
            lines.append(line)
    lines += ["", "vs trf: transformers' time / ours at the same dtype (> 1: ours faster); err: vs our float32."]
    if summary["goal_sizes"]:
        counts = {True: 0, False: 0, None: 0}
        for goal in summary["goals"]:
            counts[goal["met"]] += 1
        lines.append(f"goals: {counts[True]} met, {counts[False]} not met, {counts[None]} not measured (see the table)")
        for goal in summary["goals"]:
            if goal["met"] is False:
                lines.append(
                    f"  not met: {goal['size']} {goal['goal']}: {_fmt(goal['value'], '.2f')} ({goal['target']})"
                )
    else:
        lines.append("goals: stated for ViT-B widths, none applies to the tiny model (`make bench` measures them)")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Real tokens/s against real tokens per batch, packed (ours) vs padded references: one row per dtype.

    Columns: inference, forward + backward; a grey line joins the implementations of a case; the legend
    sits below the axes so that it covers no point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    sizes = [size for size in SIZE_ORDER if any(row["size"] == size for row in summary["results"])]
    size = sizes[0]
    rows = [row for row in summary["results"] if row["size"] == size]
    dtypes = [dtype for dtype in DTYPE_ORDER if any(row["dtype"] == dtype for row in rows)]
    styles = {
        "ours": ("tab:blue", "o", "ours (packed)"),
        "transformers": ("tab:orange", "s", "transformers (padded for NaFlex)"),
        "kornia": ("tab:green", "^", "Kornia 0.9 (fixed res only)"),
    }
    figure, axes = plt.subplots(len(dtypes), 2, figsize=(11, 3.6 * len(dtypes) + 0.6), squeeze=False)
    for line, dtype in enumerate(dtypes):
        for column, train in enumerate((False, True)):
            axis = axes[line, column]
            selected = [row for row in rows if row["train"] == train and row["dtype"] == dtype]
            title = ("forward + backward" if train else "inference") + f", {SIZE_TITLES[size].split(' (')[0]}, {dtype}"
            axis.set_title(title, fontsize=10)
            if not selected:
                axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
                axis.set_xticks([])
                axis.set_yticks([])
                continue
            for case in {row["case"] for row in selected}:
                pair = sorted((r["tokens"], r["tokens_per_s"]) for r in selected if r["case"] == case)
                axis.plot([p[0] for p in pair], [p[1] for p in pair], color="0.8", zorder=1)
            for name, (color, marker, legend) in styles.items():
                points = [r for r in selected if r["implementation"] == name]
                if not points:
                    continue
                xs = [r["tokens"] for r in points]
                ys = [r["tokens_per_s"] for r in points]
                axis.scatter(xs, ys, color=color, marker=marker, label=legend, zorder=2)
                if name == "ours":
                    for row, x, y in zip(points, xs, ys, strict=True):
                        axis.annotate(
                            CASE_SHORT[row["case"]].removeprefix("train "),
                            (x, y),
                            fontsize=7,
                            xytext=(4, 4),
                            textcoords="offset points",
                        )
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
            spread = max(r["tokens"] for r in selected) / min(r["tokens"] for r in selected)
            axis.xaxis.set_minor_formatter(ScalarFormatter() if spread < 10 else NullFormatter())
            # headroom above the highest point, so its label stays inside the axes and clear of the title
            axis.set_ylim(0, 1.18 * max(r["tokens_per_s"] for r in selected))
            axis.margins(x=0.12)
            axis.set_xlabel("real tokens per batch")
            axis.set_ylabel("real tokens / s")
            axis.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=color, marker=marker, linestyle="", label=legend)
        for color, marker, legend in styles.values()
    ]
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    figure.suptitle(summary["machine"]["cpu"], fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=[REPO_ROOT / "benchmarks/results/latest.json"])
    parser.add_argument("--summary", type=Path, default=REPO_ROOT / "benchmarks/results/summary.json")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "docs/benchmarks_table.md")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs/_static/bench_throughput.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.inputs if not path.is_file()]
    if missing:
        raise SystemExit(f"no benchmark JSON at {', '.join(missing)}: run `make bench` (or pytest benchmarks) first.")
    entries, machine = load_entries(args.inputs)
    if not entries:
        raise SystemExit(f"{', '.join(map(str, args.inputs))} holds no encoder benchmark entries.")
    summary = summarize(entries, machine, pipeline_entries(args.inputs))
    _write(args.summary, json.dumps(summary, indent=2) + "\n")
    _write(args.markdown, markdown(summary))
    written = [("summary", args.summary), ("table", args.markdown)]
    if not args.no_plot:
        try:
            plot(summary, args.plot)
            written.append(("plot", args.plot))
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[docs]'): no plot written.")
    print(short_table(summary))
    print()
    for what, path in written:
        print(f"wrote {what}: {_relative(path)}")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


if __name__ == "__main__":
    main()
