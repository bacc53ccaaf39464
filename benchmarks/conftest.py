"""Encoder benchmark fixtures: shared checkpoints and models, the matmul peak, side-by-side ratios.

Every (case, implementation) pair is one pytest-benchmark entry; all implementations of a case run in the
same session on the same random weights, and ours' entry gets the ratios against each reference in its
``extra_info`` (``speedup_vs_<impl>`` = reference time / our time, ``memory_ratio_vs_<impl>`` = our peak /
reference peak). ``benchmarks/report.py`` turns the JSON into the summary, table and plot.

Every case runs in float32, bfloat16 and float16 (``bench_dtype``), each implementation at the same dtype;
a low-precision entry also records the error of its pooled features against our float32 features on the
case's first two items (``rel_err_vs_fp32`` = max abs error / max abs value, ``min_cos_vs_fp32``), and its
fraction of the matmul peak measured at that dtype.

Environment knobs: ``BENCH_QUICK=1`` (set by ``benchmarks/quick.py``) measures the matmul peak once per dtype;
``BENCH_ROUNDS=N`` forces N timed rounds per entry; ``BENCH_TARGET_SECONDS`` (default 1)
the timed seconds aimed at per entry; ``BENCH_MEMORY=0`` skips the memory measurements
(:mod:`benchmarks.memory`), ``BENCH_MEMORY=all`` also measures low-precision ViT-B entries (skipped by
default: minutes per step on CPUs without bf16 hardware); ``BENCH_DTYPES`` (comma list, default all three);
``BENCH_FP16=1`` runs float16 at ViT-B widths on CPUs without AVX-512 FP16 / AMX-FP16;
``BENCH_LOWP_TRAIN=1`` runs the 16-bit fwd+bwd cases on ViT-B widths too; ``BENCH_KORNIA_LOWP=1`` runs
Kornia 0.9 at 16 bits on ViT-B widths too.
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

from benchmarks.cases import CASES, COMPILED, DTYPES, Case, load_model, make_runner, write_checkpoint  # noqa: E402
from benchmarks.flops import matmul_peak_flops  # noqa: E402
from benchmarks.machine import cpu_description, cpu_flags, load_average  # noqa: E402
from benchmarks.memory import MemoryProbe  # noqa: E402

#: `make bench-quick` (benchmarks/quick.py): the matmul peak once per dtype, no re-measurement after each entry
QUICK = os.environ.get("BENCH_QUICK") == "1"
TARGET_SECONDS = float(os.environ.get("BENCH_TARGET_SECONDS", "1.0"))  # timed seconds aimed at per entry
MIN_ROUNDS, MAX_ROUNDS = 3, 15
#: largest relative error of 16-bit pooled features against float32 that still means "the same computation"
LOWP_TOLERANCE = {"bfloat16": 0.1, "float16": 0.02}

# (size, case) -> implementation -> extra_info dict of its benchmark (kept by reference: pytest-benchmark
# serializes it at the end of the session, so ratios written later still land in the JSON)
_RESULTS: dict[tuple[str, str], dict[str, dict]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "large: ViT-B/16-width benchmarks (minutes); `make bench-quick` deselects them")
    config.addinivalue_line("markers", "slow: 12-layer ViT-B and float16 at ViT-B width; `make bench` deselects them")
    # pytest-benchmark writes --benchmark-json without creating its folder (benchmarks/results/ is not in git)
    json_path = config.getoption("benchmark_json", default=None)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # every encoder benchmark runs on the tiny model (quick mode), on the 4-layer ViT-B (large) and on the
    # 12-layer ViT-B (large, slow); in every dtype of BENCH_DTYPES (float16 at ViT-B width: slow)
    if "encoder_size" in metafunc.fixturenames:
        sizes = [
            pytest.param("tiny"),
            pytest.param("vitb4", marks=pytest.mark.large),
            pytest.param("base", marks=[pytest.mark.large, pytest.mark.slow]),
        ]
        metafunc.parametrize("encoder_size", sizes)
    if "bench_dtype" in metafunc.fixturenames:
        names = os.environ.get("BENCH_DTYPES", ",".join(DTYPES)).split(",")
        unknown = sorted(set(names) - set(DTYPES))
        if unknown:
            raise pytest.UsageError(f"BENCH_DTYPES names {unknown}; expected a comma list of {list(DTYPES)}.")
        metafunc.parametrize("bench_dtype", names)


@pytest.fixture(scope="session")
def matmul_peak() -> dict[str, float]:
    """Best FLOP/s of a square ``F.linear`` per dtype seen so far in the session (see ``matmul_peak_flops``).

    Measured at a dtype's first entry and again right after every entry of that dtype, so that a machine
    that was busy at one moment does not set the denominator of every fraction.
    """
    return {}


def _peak_repeats(dtype: str) -> int:
    if QUICK:
        return 3 if dtype == "float32" else 1
    return 5 if dtype == "float32" else 2  # 16-bit products are slow without AVX-512 BF16 / AMX


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
def model_cache(checkpoint: Callable[[str, str], Path]) -> Callable[[str, str, str, str], torch.nn.Module]:
    """``model_cache(implementation, family, size, dtype)``: each implementation loaded once from the shared folder.

    Only the models of one (size, dtype) are kept: asking for another frees the others (ViT-B models in
    three dtypes and three implementations would not fit a CI runner).
    """
    models: dict[tuple[str, str, str, str], torch.nn.Module] = {}

    def get(implementation: str, family: str, size: str, dtype: str = "float32") -> torch.nn.Module:
        key = (implementation, family, size, dtype)
        if key not in models:
            for other in [k for k in models if k[2:] != (size, dtype)]:
                del models[other]
            models[key] = load_model(implementation, checkpoint(family, size), dtype)
        return models[key]

    return get


@pytest.fixture(scope="session")
def fp32_reference(checkpoint: Callable[[str, str], Path]) -> Callable[[Case, str], torch.Tensor]:
    """``fp32_reference(case, size)``: our float32 pooled features of the case's first two items (cached)."""
    features: dict[tuple[str, str], torch.Tensor] = {}

    def get(case: Case, size: str) -> torch.Tensor:
        if (case.name, size) not in features:
            small = replace(case.reduced(), train=False)
            model = load_model("ours", checkpoint(case.family, size), "float32")
            features[case.name, size] = make_runner(small, "ours", model, small.inputs("ours"))().double()
        return features[case.name, size]

    return get


def _small_features(case: Case, implementation: str, model: torch.nn.Module, dtype: str) -> torch.Tensor:
    """Pooled features of ``implementation`` at ``dtype`` on the case's first two items (inference)."""
    small = replace(case.reduced(), train=False)
    was_training = model.training
    output = make_runner(small, implementation, model, small.inputs(implementation, dtype=dtype))()
    model.train(was_training)
    return output.double()


def _errors(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Max abs error over the max abs reference value, and the smallest cosine similarity of a row."""
    relative = ((output - reference).abs().max() / reference.abs().max()).item()
    cosine = torch.nn.functional.cosine_similarity(output, reference, dim=-1).min().item()
    return relative, cosine


def _check_parity(
    case: Case, implementation: str, model_cache: Callable, size: str, dtype: str, reference: torch.Tensor
) -> tuple[float, float, float]:
    """Check that ``implementation`` computes our features; returns (diff vs ours, rel err and cos vs fp32).

    float32: max abs difference to ours within 1e-4 of the feature scale. 16 bits: both implementations
    within :data:`LOWP_TOLERANCE` of our float32 features (each rounds differently, so they are compared
    to the float32 truth rather than to each other).
    """
    ours = _small_features(case, "ours", model_cache("ours", case.family, size, dtype), dtype)
    other = ours
    if implementation != "ours":
        other = _small_features(case, implementation, model_cache(implementation, case.family, size, dtype), dtype)
    difference = (ours - other).abs().max().item()
    relative, cosine = _errors(other, reference)
    if dtype == "float32":
        scale = ours.abs().max().item()
        assert difference <= 1e-4 * max(scale, 1.0), (
            f"{implementation} and ours disagree on {case.name} ({difference:.2e}): not the same computation"
        )
    else:
        ours_relative, _ = _errors(ours, reference)
        worst = max(relative, ours_relative)
        assert worst <= LOWP_TOLERANCE[dtype], (
            f"{case.name} in {dtype}: relative error {worst:.2e} against float32 exceeds "
            f"{LOWP_TOLERANCE[dtype]} (ours {ours_relative:.2e}, {implementation} {relative:.2e})"
        )
    return difference, relative, cosine


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
    compiled = entries.get("ours_inductor")
    if compiled is not None:  # ours compiled against everything else of the case (eager ours included)
        for name, other in entries.items():
            if name != "ours_inductor":
                compiled[f"speedup_vs_{name}"] = other["median_s"] / compiled["median_s"]
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
    benchmark,
    encoder_size: str,
    bench_dtype: str,
    model_cache,
    checkpoint,
    fp32_reference,
    matmul_peak: dict[str, float],
    memory_probe,
) -> Callable[[str, str], None]:
    """``bench_case(case_name, implementation)``: time one case for one implementation and record it.

    Checks first that the implementation computes the same features as ours on the case's first two
    items (same weights, same work), then times the full case, measures its peak memory in a fresh
    process (:mod:`benchmarks.memory`), and fills ``benchmark.extra_info``.
    """

    def run_case(case_name: str, implementation: str) -> None:
        case = CASES[case_name]
        size, dtype = encoder_size, bench_dtype
        if implementation not in case.implementations:
            pytest.skip(f"{implementation} cannot run {case_name}")
        low_precision = dtype != "float32"
        if low_precision and size != "tiny" and case.train and os.environ.get("BENCH_LOWP_TRAIN") != "1":
            pytest.skip(f"{dtype} fwd+bwd at ViT-B width: set BENCH_LOWP_TRAIN=1 (minutes per step without AMX)")
        if (
            low_precision
            and size != "tiny"
            and implementation == "kornia"
            and os.environ.get("BENCH_KORNIA_LOWP") != "1"
        ):
            pytest.skip(f"Kornia 0.9 in {dtype} at ViT-B width: set BENCH_KORNIA_LOWP=1")
        fp16_hardware = bool(cpu_flags() & {"avx512_fp16", "amx_fp16"})
        if dtype == "float16" and size != "tiny" and not fp16_hardware and os.environ.get("BENCH_FP16") != "1":
            pytest.skip("float16 at ViT-B width: no AVX-512 FP16 / AMX-FP16 on this CPU; set BENCH_FP16=1")
        torch_dtype = DTYPES[dtype]
        if dtype not in matmul_peak:
            matmul_peak[dtype] = matmul_peak_flops(dtype=torch_dtype, repeats=_peak_repeats(dtype))
        model = model_cache(implementation, case.family, size, dtype)
        reference = fp32_reference(case, size)
        difference, relative, cosine = _check_parity(case, implementation, model_cache, size, dtype, reference)
        runner = make_runner(case, implementation, model, case.inputs(implementation, dtype=dtype))
        flops = case.flops(size)
        computed = case.num_tokens if implementation.startswith("ours") else case.padded_tokens
        predicted = flops * computed / case.num_tokens / (0.5 * matmul_peak[dtype])
        rounds = _rounds(runner, predicted)

        benchmark.group = f"{size}/{dtype}/{case_name}"
        load_before = load_average()
        benchmark.pedantic(runner, rounds=rounds, iterations=1, warmup_rounds=0)
        load_after = load_average()
        if not QUICK:
            peak = matmul_peak_flops(dtype=torch_dtype, repeats=_peak_repeats(dtype))
            matmul_peak[dtype] = max(matmul_peak[dtype], peak)
        info = benchmark.extra_info
        info.update(
            case=case_name,
            size=size,
            dtype=dtype,
            cpu=cpu_description(),
            load_average=max(load_before, load_after),
            implementation=implementation,
            family=case.family,
            tower=case.tower,
            train=case.train,
            items=case.num_items,
            tokens=case.num_tokens,
            computed_tokens=computed,
            flops=flops,
            matmul_peak_flops=matmul_peak[dtype],
            parity_max_abs_diff=difference,
            rel_err_vs_fp32=relative,
            min_cos_vs_fp32=cosine,
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
            peak_fraction=flops / median / matmul_peak[dtype],
        )
        measure_memory = not low_precision or size == "tiny" or os.environ.get("BENCH_MEMORY") == "all"
        measure_memory = measure_memory and implementation not in COMPILED  # the memory worker runs eager code
        if memory_probe is not None and measure_memory:
            record = memory_probe.measure(case_name, implementation, checkpoint(case.family, size), dtype)
            info.update(
                peak_memory_mib=record["delta_mib"],
                rss_after_load_mib=record["baseline_mib"],
                memory_method="fresh process: ru_maxrss during one step minus after load (benchmarks/memory.py)",
            )
        entries = _RESULTS.setdefault((size, dtype, case_name), {})
        entries[implementation] = info
        _update_ratios(entries)

    return run_case


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("encoder benchmarks: our time / speedup = reference time / ours")
    terminalreporter.write_line(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads")
    for (size, dtype, case_name), entries in sorted(_RESULTS.items()):
        ours = entries.get("ours", {})
        if "median_s" not in ours:
            continue
        parts = [f"{size:>5} {dtype:<8} {case_name:<22} ours {ours['median_s'] * 1e3:8.1f} ms"]
        parts += [f"x{info['time_vs_ours']:.2f} vs {name}" for name, info in entries.items() if "time_vs_ours" in info]
        terminalreporter.write_line("  ".join(parts))
        compiled = entries.get("ours_inductor", {})
        ratios = [
            f"x{value:.2f} vs {key[len('speedup_vs_') :]}"
            for key, value in compiled.items()
            if key.startswith("speedup_vs_")
        ]
        if ratios:
            terminalreporter.write_line(
                f"{'':>37}ours_inductor {compiled['median_s'] * 1e3:8.1f} ms  " + "  ".join(ratios)
            )
