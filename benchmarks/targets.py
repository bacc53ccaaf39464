"""The speed targets of issue 17, measured side by side: ours vs transformers in alternating rounds, one process.

Usage::

    python -m benchmarks.targets [--size vitb4] [--rounds 7] [--dtypes float32,bfloat16] [--cases ...]
        [--json benchmarks/results/targets.json] [--markdown benchmarks/results/targets.md]

For every (case, dtype) it loads ours and transformers from the same seeded checkpoint
(:mod:`benchmarks.cases`), checks that they compute the same pooled features (float32: within 1e-4 of the
feature scale; 16 bits: both within 0.1 of our float32 features), then runs ``rounds`` rounds in which
ours (fast path), ours with :data:`kornia_siglip2.attention.FUSED_CPU_KERNELS` off (the plain
``torch.nn.functional`` path: what the fast path buys) and transformers each run once, in that order. A
shared machine slows all three of a round alike, so the ratios of medians are the number to read even
when the absolute times are not. The matmul peak per dtype is :func:`benchmarks.flops.matmul_peak_flops`,
the suite's definition, measured before and after the rounds (the best is kept).

It prints a markdown table with the CPU, its AVX-512 / AMX flags, the threads and the load average, and
each target of the issue as met or not with its measured ratio (the ratio of medians; beside it the median
of the per-round ratios, which a load that drifts during the run disturbs less). ``pytest benchmarks`` (``make bench``)
remains the source of ``docs/benchmarks_table.md``; this script answers the targets on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import CASES, DTYPES, load_model, make_runner, write_checkpoint  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from benchmarks.machine import cpu_description, load_average  # noqa: E402

__all__ = ["COMPILED_TARGETS", "TARGETS", "main"]

DEFAULT_CASES = ("fixed_b1", "fixed_b32", "naflex_equal", "naflex_native")
#: (case, dtype, metric, threshold, text): metric "speedup" (transformers / ours) or "peak" (fraction of peak)
TARGETS = (
    ("fixed_b32", "bfloat16", "speedup", 1.25, "bf16 fixed 224 batch 32 >= 1.25x transformers"),
    ("fixed_b32", "bfloat16", "peak", 0.70, "bf16 fixed 224 batch 32 >= 70 % of the bf16 matmul peak"),
    ("naflex_equal", "bfloat16", "speedup", 1.25, "bf16 NaFlex equal grids >= 1.25x transformers"),
    ("naflex_equal", "bfloat16", "peak", 0.70, "bf16 NaFlex equal grids >= 70 % of the bf16 matmul peak"),
    ("fixed_b1", "float32", "speedup", 1.10, "fp32 fixed 224 batch 1 >= 1.1x transformers"),
    ("fixed_b32", "float32", "speedup", 1.10, "fp32 fixed 224 batch 32 >= 1.1x transformers"),
    ("naflex_native", "float32", "speedup", 2.50, "fp32 NaFlex mixed >= 2.5x transformers (padded)"),
    ("naflex_native", "bfloat16", "speedup", 3.00, "bf16 NaFlex mixed >= 3.0x transformers (padded)"),
)


#: issue 25 (with ``--compiled``): (case, dtype, per-round ratio, threshold, text)
COMPILED_TARGETS = (
    *(
        (case, dtype, metric, 1.0, f"{dtype_short} {case}: ours compiled >= {name}")
        for case in DEFAULT_CASES
        for dtype, dtype_short in (("float32", "fp32"), ("bfloat16", "bf16"))
        for metric, name in (
            ("compiled_vs_transformers_compiled", "transformers compiled"),
            ("compiled_vs_ours_eager", "ours eager"),
        )
    ),
    (
        "naflex_native",
        "float32",
        "compiled_vs_transformers_compiled",
        2.5,
        "fp32 NaFlex mixed: ours compiled >= 2.5x transformers compiled",
    ),
    (
        "fixed_b32",
        "bfloat16",
        "compiled_vs_transformers_eager",
        1.25,
        "bf16 fixed 224 b32: compiled >= 1.25x transformers",
    ),
    (
        "naflex_equal",
        "bfloat16",
        "compiled_vs_transformers_eager",
        1.25,
        "bf16 NaFlex equal: compiled >= 1.25x transformers",
    ),
)


def _unfused(runner):
    import kornia_siglip2.attention as attention

    def run():
        attention.FUSED_CPU_KERNELS = False
        try:
            return runner()
        finally:
            attention.FUSED_CPU_KERNELS = True

    return run


def measure(
    case_name: str,
    dtype: str,
    size: str,
    folder: Path,
    rounds: int,
    fp32_features: torch.Tensor,
    compiled: bool = False,
) -> dict:
    """Alternating rounds of ours / ours plain / transformers (/ ours compiled) on one case; medians, ratios, errors."""
    case = CASES[case_name]
    ours = load_model("ours", folder, dtype)
    reference = load_model("transformers", folder, dtype)
    runners = {
        "ours": make_runner(case, "ours", ours, case.inputs("ours", dtype=dtype)),
        "transformers": make_runner(case, "transformers", reference, case.inputs("transformers", dtype=dtype)),
    }
    runners["ours_plain"] = _unfused(runners["ours"])
    graphs_before = compile_seconds = None
    if compiled:  # issue 25: whole towers under torch.compile(fullgraph=True, inductor), ours and transformers
        from torch._dynamo.utils import counters

        start = time.perf_counter()
        for name, model in (("transformers_compiled", reference), ("ours_compiled", ours)):
            implementation = name.replace("_compiled", "_inductor")
            runners[name] = make_runner(case, implementation, model, case.inputs(implementation, dtype=dtype))
        compile_seconds = time.perf_counter() - start  # both compiles (and one warm call of each)
        runners["ours_compiled"]()  # its cache was reset by the second runner: compiles again, outside the rounds
        runners["transformers_compiled"]()
        graphs_before = counters["stats"]["unique_graphs"]
    outputs = {name: run().double() for name, run in runners.items()}  # also the warm-up round
    scale = fp32_features.abs().max().item()
    errors = {name: (out - fp32_features).abs().max().item() / scale for name, out in outputs.items()}
    difference = (outputs["ours"] - outputs["transformers"]).abs().max().item()
    if dtype == "float32":
        assert difference <= 1e-4 * max(scale, 1.0), f"{case_name}: ours and transformers differ by {difference:.2e}"
    else:
        assert max(errors.values()) <= 0.1, f"{case_name} {dtype}: error vs float32 {errors}"
    names = ("ours", "ours_plain", "transformers") + (("ours_compiled", "transformers_compiled") if compiled else ())
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in times:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    del ours, reference, runners
    extra = {}
    if compiled:
        extra = {
            "speedup_compiled": medians["transformers"] / medians["ours_compiled"],
            "compiled_vs_transformers_compiled": _per_round(times, "ours_compiled", "transformers_compiled"),
            "compiled_vs_ours_eager": _per_round(times, "ours_compiled", "ours"),
            "compiled_vs_transformers_eager": _per_round(times, "ours_compiled", "transformers"),
            "compile_s": compile_seconds,
            "graphs_compiled_during_rounds": counters["stats"]["unique_graphs"] - graphs_before,
        }
    return {
        **extra,
        "case": case_name,
        "dtype": dtype,
        "size": size,
        "rounds": rounds,
        "flops": case.flops(size),
        "median_s": medians,
        "times_s": times,
        "speedup": medians["transformers"] / medians["ours"],
        "speedup_per_round": _per_round(times),
        "speedup_plain": medians["transformers"] / medians["ours_plain"],
        "fast_path_gain": medians["ours_plain"] / medians["ours"],
        "rel_err_vs_fp32": errors,
        "max_abs_diff_vs_transformers": difference,
    }


def _per_round(times: dict[str, list[float]], ours: str = "ours", other: str = "transformers") -> float:
    """Median over rounds of ``other``'s time / ``ours``'s in the same round (robust to load that drifts)."""
    return statistics.median(b / a for a, b in zip(times[ours], times[other], strict=True))


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON and markdown; returns 0 (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="vitb4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "targets.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "targets.md")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time ours and transformers under torch.compile (inductor; ours fullgraph on packed input)",
    )
    args = parser.parse_args(argv)
    dtypes, cases = args.dtypes.split(","), args.cases.split(",")
    loads = [load_average()]
    peaks = {dtype: matmul_peak_flops(dtype=DTYPES[dtype]) for dtype in dtypes}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {family: write_checkpoint(family, args.size, Path(tmp) / family) for family in ("siglip", "siglip2")}
        for case_name in cases:
            case = CASES[case_name]
            fp32 = load_model("ours", folders[case.family], "float32")
            full = make_runner(case, "ours", fp32, case.inputs("ours"))().double()
            del fp32
            for dtype in dtypes:
                result = measure(case_name, dtype, args.size, folders[case.family], args.rounds, full, args.compiled)
                loads.append(load_average())
                results.append(result)
                print(
                    f"{case_name:<14} {dtype:<9} ours {result['median_s']['ours'] * 1e3:8.1f} ms  "
                    f"x{result['speedup']:.2f} vs transformers (plain path x{result['speedup_plain']:.2f}"
                    + (f", compiled x{result['speedup_compiled']:.2f}" if args.compiled else "")
                    + ")",
                    flush=True,
                )
    for dtype in dtypes:
        peaks[dtype] = max(peaks[dtype], matmul_peak_flops(dtype=DTYPES[dtype]))
    for result in results:
        result["peak_flops"] = peaks[result["dtype"]]
        result["peak_fraction"] = result["flops"] / result["median_s"]["ours"] / peaks[result["dtype"]]
    machine = {
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_max": max(loads),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    try:
        import transformers

        machine["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the benchmarks need it
        pass
    text = render(results, machine)
    print("\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    args.markdown.write_text(text)
    print(f"\nwrote {args.json} and {args.markdown}")
    return 0


def render(results: list[dict], machine: dict) -> str:
    """Markdown: the machine, one row per (case, dtype), then every target as met / not met."""
    lines = [
        f"{machine['date_utc']} UTC, {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"transformers {machine.get('transformers', '?')}; highest 1-minute load average seen: "
        f"{machine['load_average_max']:.1f}.",
        "",
        "| case | dtype | ours ms | plain path ms | transformers ms | speedup | per round | plain speedup | GFLOP/s "
        "| % peak | rel err vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median_s"]
        lines.append(
            f"| {r['case']} | {r['dtype']} | {m['ours'] * 1e3:.1f} | {m['ours_plain'] * 1e3:.1f} | "
            f"{m['transformers'] * 1e3:.1f} | {r['speedup']:.2f} | {_per_round(r['times_s']):.2f} | "
            f"{r['speedup_plain']:.2f} | "
            f"{r['flops'] / m['ours'] / 1e9:.0f} | {100 * r['peak_fraction']:.0f} | "
            f"{r['rel_err_vs_fp32']['ours']:.1e} |"
        )
    compiled = [r for r in results if "speedup_compiled" in r]
    if compiled:
        lines += [
            "",
            "Compiled (`torch.compile`, inductor; ours `fullgraph=True` on a `PackedImages` or the pixel batch). "
            "Ratios are medians of the per-round ratios (each round runs every variant once):",
            "",
            "| case | dtype | ours compiled ms | transformers compiled ms | ours eager ms | transformers ms "
            "| vs transformers compiled | vs ours eager | vs transformers eager | graphs compiled during the rounds |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in compiled:
            m = r["median_s"]
            lines.append(
                f"| {r['case']} | {r['dtype']} | {m['ours_compiled'] * 1e3:.1f} | "
                f"{m['transformers_compiled'] * 1e3:.1f} | {m['ours'] * 1e3:.1f} | {m['transformers'] * 1e3:.1f} | "
                f"{r['compiled_vs_transformers_compiled']:.2f} | {r['compiled_vs_ours_eager']:.2f} | "
                f"{r['compiled_vs_transformers_eager']:.2f} | {r['graphs_compiled_during_rounds']} |"
            )
    peaks = {r["dtype"]: r["peak_flops"] for r in results}
    lines += ["", "Matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()), ""]
    lines += ["| target | measured (per round) | status |", "|---|---:|---|"]
    by_key = {(r["case"], r["dtype"]): r for r in results}
    for case_name, dtype, metric, threshold, text in TARGETS:
        result = by_key.get((case_name, dtype))
        if result is None:
            lines.append(f"| {text} | - | not measured |")
            continue
        value = result["speedup"] if metric == "speedup" else result["peak_fraction"]
        if metric == "speedup":
            shown = f"{value:.2f}x ({_per_round(result['times_s']):.2f}x)"
        else:
            shown = f"{100 * value:.0f} %"
        lines.append(f"| {text} | {shown} | {'met' if value >= threshold else 'not met'} |")
    for case_name, dtype, metric, threshold, text in COMPILED_TARGETS:
        result = by_key.get((case_name, dtype))
        if result is None or metric not in result:
            lines.append(f"| {text} | - | not measured |")
            continue
        value = result[metric]
        lines.append(f"| {text} | {value:.2f}x | {'met' if value >= threshold else 'not met'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
