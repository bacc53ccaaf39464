"""Encoder benchmark fixtures: shared checkpoints and models, the matmul peak, side-by-side ratios.

Every (case, implementation) pair is one pytest-benchmark entry; all implementations of a case run in the
same session on the same random weights, and ours' entry gets the ratios against each reference in its
``extra_info`` (``speedup_vs_<impl>`` = reference time / our time, ``memory_ratio_vs_<impl>`` = our peak /
reference peak). ``benchmarks/report.py`` turns the JSON into the summary, table and plot.

Environment knobs: ``BENCH_ROUNDS=N`` forces N timed rounds per entry; ``BENCH_MEMORY=0`` skips the
memory measurements (:mod:`benchmarks.memory`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks.*` importable however pytest was started
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import CASES, Case, load_model, make_runner, write_checkpoint  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from benchmarks.memory import MemoryProbe  # noqa: E402

TARGET_SECONDS = 1.0  # timed seconds aimed at per entry; large cases always get MIN_ROUNDS
MIN_ROUNDS, MAX_ROUNDS = 3, 15

# (size, case) -> implementation -> extra_info dict of its benchmark (kept by reference: pytest-benchmark
# serializes it at the end of the session, so ratios written later still land in the JSON)
_RESULTS: dict[tuple[str, str], dict[str, dict]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "large: ViT-B/16-size benchmarks (minutes); `make bench-quick` deselects them")
    # pytest-benchmark writes --benchmark-json without creating its folder (benchmarks/results/ is not in git)
    json_path = config.getoption("benchmark_json", default=None)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # every encoder benchmark runs on the tiny model (quick mode) and on ViT-B (marked large)
    if "encoder_size" in metafunc.fixturenames:
        metafunc.parametrize("encoder_size", [pytest.param("tiny"), pytest.param("base", marks=pytest.mark.large)])


@pytest.fixture(scope="session")
def matmul_peak() -> list[float]:
    """Best fp32 FLOP/s of a 2048 x 2048 ``torch.mm`` seen so far in the session (a one-element list).

    Measured at the start and again right after every entry (best of 5), so that a machine that was busy
    at one moment does not set the denominator of every fraction.
    """
    return [matmul_peak_flops()]


@pytest.fixture(scope="session")
def memory_probe():
    """The launcher of the per-measurement memory processes (``None`` with ``BENCH_MEMORY=0``)."""
    if os.environ.get("BENCH_MEMORY", "1") == "0":
        yield None
        return
    probe = MemoryProbe(threads=torch.get_num_threads())
    yield probe
    probe.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``checkpoint(family, size)``: folder of the session's seeded random transformers model (written once)."""
    folders: dict[tuple[str, str], Path] = {}

    def get(family: str, size: str) -> Path:
        if (family, size) not in folders:
            folders[family, size] = write_checkpoint(family, size, tmp_path_factory.mktemp(f"{family}-{size}"))
            os.sync()  # no page-cache writeback of the ~1 GB file competing with the first timings
        return folders[family, size]

    return get


@pytest.fixture(scope="session")
def model_cache(checkpoint: Callable[[str, str], Path]) -> Callable[[str, str, str], torch.nn.Module]:
    """``model_cache(implementation, family, size)``: each implementation loaded once from the shared folder."""
    models: dict[tuple[str, str, str], torch.nn.Module] = {}

    def get(implementation: str, family: str, size: str) -> torch.nn.Module:
        key = (implementation, family, size)
        if key not in models:
            models[key] = load_model(implementation, checkpoint(family, size))
        return models[key]

    return get


def _check_parity(case: Case, implementation: str, model_cache: Callable, size: str) -> float:
    """Max abs difference of pooled features, ours vs ``implementation``, on the case's first two items."""
    small = replace(case.reduced(), train=False)
    outputs = []
    for name in ("ours", implementation):
        model = model_cache(name, case.family, size)
        was_training = model.training
        outputs.append(make_runner(small, name, model, small.inputs(name))())
        model.train(was_training)
    difference = (outputs[0] - outputs[1]).abs().max().item()
    scale = outputs[0].abs().max().item()
    assert difference <= 1e-4 * max(scale, 1.0), (
        f"{implementation} and ours disagree on {case.name} ({difference:.2e}): not the same computation"
    )
    return difference


def _rounds(run: Callable[[], object], predicted_seconds: float) -> int:
    """Timed rounds for an entry; runs one untimed warm-up unless a step is predicted to take seconds."""
    if "BENCH_ROUNDS" in os.environ:
        rounds = int(os.environ["BENCH_ROUNDS"])
        if predicted_seconds < TARGET_SECONDS:
            run()
        return rounds
    if predicted_seconds >= TARGET_SECONDS:  # ViT-B steps: the median of 3 discards a cold first round
        return MIN_ROUNDS
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / max(seconds, 1e-6)))))


def _update_ratios(entries: dict[str, dict]) -> None:
    """Write time and memory ratios between ours and every other implementation of one case."""
    ours = entries.get("ours")
    if ours is None:
        return
    for name, other in entries.items():
        if name == "ours":
            continue
        ours[f"speedup_vs_{name}"] = other["median_s"] / ours["median_s"]
        other["time_vs_ours"] = other["median_s"] / ours["median_s"]
        if ours.get("peak_memory_mib") and other.get("peak_memory_mib"):
            ours[f"memory_ratio_vs_{name}"] = ours["peak_memory_mib"] / other["peak_memory_mib"]
            other["memory_vs_ours"] = other["peak_memory_mib"] / ours["peak_memory_mib"]


@pytest.fixture
def bench_case(
    benchmark, encoder_size: str, model_cache, checkpoint, matmul_peak: list[float], memory_probe
) -> Callable[[str, str], None]:
    """``bench_case(case_name, implementation)``: time one case for one implementation and record it.

    Checks first that the implementation computes the same features as ours on the case's first two
    items (same weights, same work), then times the full case, measures its peak memory in a fresh
    process (:mod:`benchmarks.memory`), and fills ``benchmark.extra_info``.
    """

    def run_case(case_name: str, implementation: str) -> None:
        case = CASES[case_name]
        if implementation not in case.implementations:
            pytest.skip(f"{implementation} cannot run {case_name}")
        size = encoder_size
        model = model_cache(implementation, case.family, size)
        difference = _check_parity(case, implementation, model_cache, size) if implementation != "ours" else 0.0
        runner = make_runner(case, implementation, model, case.inputs(implementation))
        flops = case.flops(size)
        computed = case.padded_tokens if implementation != "ours" else case.num_tokens
        predicted = flops * computed / case.num_tokens / (0.5 * matmul_peak[0])
        rounds = _rounds(runner, predicted)

        benchmark.group = f"{size}/{case_name}"
        benchmark.pedantic(runner, rounds=rounds, iterations=1, warmup_rounds=0)
        matmul_peak[0] = max(matmul_peak[0], matmul_peak_flops(repeats=5))
        info = benchmark.extra_info
        info.update(
            case=case_name,
            size=size,
            implementation=implementation,
            family=case.family,
            tower=case.tower,
            train=case.train,
            items=case.num_items,
            tokens=case.num_tokens,
            computed_tokens=computed,
            flops=flops,
            matmul_peak_flops=matmul_peak[0],
            parity_max_abs_diff=difference,
            threads=torch.get_num_threads(),
        )
        if benchmark.stats is None:  # --benchmark-disable
            return
        median = benchmark.stats.stats.median
        info.update(
            median_s=median,
            items_per_s=case.num_items / median,
            tokens_per_s=case.num_tokens / median,
            achieved_flops=flops / median,
            peak_fraction=flops / median / matmul_peak[0],
        )
        if memory_probe is not None:
            record = memory_probe.measure(case_name, implementation, checkpoint(case.family, size))
            info.update(
                peak_memory_mib=record["delta_mib"],
                rss_after_load_mib=record["baseline_mib"],
                memory_method="fresh process: ru_maxrss during one step minus after load (benchmarks/memory.py)",
            )
        entries = _RESULTS.setdefault((size, case_name), {})
        entries[implementation] = info
        _update_ratios(entries)

    return run_case


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("encoder benchmarks: ours vs references (time ratio = reference / ours)")
    for (size, case_name), entries in sorted(_RESULTS.items()):
        ours = entries.get("ours", {})
        parts = []
        for name, info in entries.items():
            text = f"{name} {info['median_s'] * 1e3:.1f} ms, {100 * info['peak_fraction']:.0f}% peak"
            if "peak_memory_mib" in info:
                text += f", {info['peak_memory_mib']:.0f} MiB"
            if name != "ours" and "median_s" in ours:
                text += f" (x{info['time_vs_ours']:.2f} time"
                text += f", x{info['memory_vs_ours']:.2f} mem)" if "memory_vs_ours" in info else ")"
            parts.append(text)
        terminalreporter.write_line(f"{size:>4} {case_name:<22} " + " | ".join(parts))
