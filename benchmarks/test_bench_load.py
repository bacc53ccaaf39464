"""Load and start-up: ``from_pretrained`` time and memory after load / after one forward, ours vs transformers.

Each round is a fresh process (:mod:`benchmarks.load`); pytest-benchmark times the whole process (interpreter
start, imports, load, one forward: the start-up a user waits for), and ``extra_info`` carries the medians of
``from_pretrained`` alone and of the memory figures. ``tiny`` runs in `make bench-quick`; ``so400m`` and
``so400m-naflex`` (So400m-width fixed-resolution and NaFlex checkpoints of 0.9 GB) are marked large.
``extra_info`` of ours carries the memory ratios ours / transformers (``*_ratio_vs_transformers``: RSS,
``RssAnon`` and peak, after load and after one forward); the target is <= 1.0.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from benchmarks.load import MEMORY_KEYS, measure_in_subprocess, write_load_checkpoint
from benchmarks.machine import cpu_description, load_average

_INFOS: dict[tuple[str, str], dict] = {}
_FOLDERS: dict[str, Path] = {}


def _folder(size: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if size not in _FOLDERS:
        _FOLDERS[size] = write_load_checkpoint(size, tmp_path_factory.mktemp(f"load-{size}"))
        for path in _FOLDERS[size].iterdir():  # page cache: the load is timed, not the disk
            path.read_bytes()
    return _FOLDERS[size]


@pytest.mark.parametrize("implementation", ["ours", "transformers"])
@pytest.mark.parametrize(
    "size",
    [
        pytest.param("tiny"),
        pytest.param("so400m", marks=pytest.mark.large),
        pytest.param("so400m-naflex", marks=pytest.mark.large),
    ],
)
def test_load(benchmark, tmp_path_factory, size, implementation):
    folder = _folder(size, tmp_path_factory)
    records = []

    def run() -> None:
        records.append(measure_in_subprocess(implementation, folder))

    rounds = 1 if os.environ.get("BENCH_QUICK") == "1" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(load_case=size, implementation=implementation, cpu=cpu_description(), load_average=load_average())
    for key in records[0]:
        if key.endswith(("_s", "_mib")):
            info[key] = statistics.median(record[key] for record in records)
    info["process_s"] = benchmark.stats.stats.median
    _INFOS[size, implementation] = info
    if (size, "ours") in _INFOS and (size, "transformers") in _INFOS:
        ours, reference = _INFOS[size, "ours"], _INFOS[size, "transformers"]
        for key in ("load_s", "process_s"):
            ours[f"{key}_speedup_vs_transformers"] = reference[key] / ours[key]
        for key in MEMORY_KEYS:  # target <= 1.0 (a ratio of one run; no assert: benchmarks report)
            ours[f"{key}_ratio_vs_transformers"] = ours[key] / reference[key]
