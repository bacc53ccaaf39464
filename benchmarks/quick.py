"""``make bench-quick``: the encoder and load benchmarks on the tiny model in every dtype, then one short table.

Runs pytest (output kept in ``benchmarks/results/quick_pytest.log``, shown only when something fails) with
``BENCH_QUICK=1 BENCH_MEMORY=0`` and a short timing target, then :mod:`benchmarks.report`, which prints the
table, the goals (stated for ViT-B widths: none applies to the tiny model, and the table says so) and
where it wrote the table, the plot and the summary. The exit status is pytest's or the report's: non-zero
only when a benchmark errored or its parity check failed, never for a goal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
SUITES = ["test_bench_fixed.py", "test_bench_naflex.py", "test_bench_text.py", "test_bench_training.py"]
SUITES += ["test_bench_load.py"]


def main(argv: list[str] | None = None) -> int:
    """Run the quick suite; returns the exit status."""
    extra = list(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "quick_pytest.log"
    data = RESULTS / "quick.json"
    env = dict(os.environ, BENCH_QUICK="1", BENCH_MEMORY="0", BENCH_TARGET_SECONDS="0.05")
    command = [sys.executable, "-m", "pytest", *(f"benchmarks/{suite}" for suite in SUITES)]
    command += ["-q", "-m", "not large and not slow", "-p", "no:cacheprovider", f"--benchmark-json={data}", *extra]
    print("make bench-quick: tiny model, float32 / bfloat16 / float16, ours vs transformers (and Kornia 0.9) ...")
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.call(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if status != 0:
        lines = log.read_text().splitlines()
        print("\n".join(lines[-40:]))
        print(f"\nbenchmarks failed (pytest exit status {status}) after {seconds:.0f} s; full log: {_rel(log)}")
        return status
    print(f"benchmarks ran in {seconds:.0f} s (pytest log: {_rel(log)})\n")
    report = [sys.executable, "-m", "benchmarks.report", str(data)]
    report += ["--summary", str(RESULTS / "quick_summary.json"), "--markdown", str(RESULTS / "quick_table.md")]
    report += ["--plot", str(RESULTS / "quick_throughput.png")]
    return subprocess.call(report, cwd=REPO_ROOT)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
