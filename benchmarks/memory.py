"""Peak host memory of one (implementation, case) pair, measured in a fresh process.

Method:

1. Each measurement runs in a process of its own, ``fork()``-ed for it from a small launcher that has
   only imported the libraries (torch, transformers, kornia): it has never loaded a model or run a step.
   The fork matters beyond speed: on Linux, ``ru_maxrss`` of a process started by ``exec`` inherits the
   high-water mark of the process that spawned it (the kernel keeps it in the signal struct across
   ``exec``), so a worker spawned straight from a pytest process holding several GB would report several
   GB whatever it did; a forked process gets a fresh signal struct.
2. The process loads the model from the shared checkpoint, reads every weight once (a loader may keep
   weights as lazily mapped safetensors pages, which would otherwise enter the resident set during the
   step and count as its memory), builds the case's inputs, collects garbage, then resets its
   high-water mark to its current RSS (``/proc/self/clear_refs`` ``5``) so that transient loading
   buffers do not hide the step's peak. ``baseline = ru_maxrss``.
3. It runs the case once (inference, or forward + backward) and reads ``peak = ru_maxrss``.
4. The result is ``peak - baseline`` (MiB): the memory the step needs beyond weights and inputs
   (activations, attention buffers, padding copies, gradients for a training step). It is the resident
   set, so it also covers allocations outside PyTorch's allocator.

glibc's mmap threshold is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``, as the sigmoid-loss benchmark
does): by default glibc raises it after the first large free and then serves later large buffers from
its heap, where freed memory stays resident, so the RSS peak would depend on the order of frees rather
than on what the step keeps alive.

The launcher is ``python -m benchmarks.memory --serve`` (one per pytest session, :class:`MemoryProbe`);
``python -m benchmarks.memory CASE IMPLEMENTATION CHECKPOINT`` measures one pair from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
from pathlib import Path

__all__ = ["MemoryProbe"]

REPO_ROOT = Path(__file__).resolve().parents[1]


class MemoryProbe:
    """A launcher subprocess that forks one fresh process per memory measurement.

    Args:
        threads: intra-op threads of the measured processes (the benchmark's own).
        timeout: seconds one measurement may take before the launcher is killed.
    """

    def __init__(self, threads: int, timeout: float = 900) -> None:
        self.timeout = timeout
        paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
        # thread counts through the environment: the launcher must not touch torch's thread pools before fork()
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="131072")
        command = [sys.executable, "-m", "benchmarks.memory", "--serve"]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        # wait for the launcher's imports: seconds of CPU that would otherwise overlap the first timing
        self._read_line("start of the memory launcher")

    def measure(self, case: str, implementation: str, checkpoint: Path, dtype: str = "float32") -> dict:
        """Measure one pair; returns ``{"baseline_mib", "peak_mib", "delta_mib", "hiwater_reset"}``.

        Raises:
            RuntimeError: the measurement failed or timed out (the launcher's stderr shows why).
        """
        request = {"case": case, "implementation": implementation, "checkpoint": str(checkpoint), "dtype": dtype}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self._read_line(f"memory measurement of {case}/{implementation}") or "null")
        if not reply or "error" in reply:
            raise RuntimeError(f"memory measurement of {case}/{implementation} failed: {reply}")
        return reply

    def _read_line(self, what: str) -> str:
        """One line from the launcher, or RuntimeError after :attr:`timeout` seconds."""
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise RuntimeError(f"{what} timed out after {self.timeout} s")
        return self.process.stdout.readline()

    def close(self) -> None:
        """Stop the launcher."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _max_rss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hiwater() -> bool:
    """Set this process's RSS high-water mark to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _measure(case_name: str, implementation: str, checkpoint: Path, dtype: str = "float32") -> dict:
    """Steps 2-4 of the method (runs in the freshly forked process)."""
    import gc

    import torch

    from benchmarks.cases import CASES, load_model, make_runner

    case = CASES[case_name]
    model = load_model(implementation, checkpoint, dtype)
    with torch.no_grad():  # page in lazily mapped weights now, not during the step
        for tensor in model.state_dict().values():
            tensor.sum()
    run = make_runner(case, implementation, model, case.inputs(implementation, dtype=dtype))
    gc.collect()
    reset = _reset_hiwater()
    baseline = _max_rss_mib()
    run()
    peak = _max_rss_mib()
    return {
        "baseline_mib": round(baseline, 1),
        "peak_mib": round(peak, 1),
        "delta_mib": round(peak - baseline, 1),
        "hiwater_reset": reset,
        "threads": torch.get_num_threads(),
    }


def _in_fresh_process(case_name: str, implementation: str, checkpoint: Path, dtype: str = "float32") -> dict:
    """Fork, measure in the child, return its record (or ``{"error": ...}``) to the parent through a pipe."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            record = _measure(case_name, implementation, checkpoint, dtype)
        except BaseException as error:  # reported to the parent, never raised across the fork
            import traceback

            traceback.print_exc()
            record = {"error": f"{type(error).__name__}: {error}"}
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(json.dumps(record))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(child, 0)
    if not text:
        return {"error": f"measuring process died (exit status {os.waitstatus_to_exitcode(status)})"}
    return json.loads(text)


def _serve() -> None:
    """The launcher: import the libraries once, then one forked measurement per request line on stdin."""
    # imported here, before any fork, so that each measurement pays none of their import time; no torch op
    # runs in this process (an OpenMP pool started before fork() would not survive in the children)
    import kornia.models.siglip2  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Siglip2Model, SiglipModel  # noqa: F401

    import benchmarks.cases  # noqa: F401
    import kornia_siglip2  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        record = _in_fresh_process(
            request["case"], request["implementation"], Path(request["checkpoint"]), request.get("dtype", "float32")
        )
        print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--serve`` (the launcher), or ``CASE IMPLEMENTATION CHECKPOINT`` for one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?")
    parser.add_argument("implementation", nargs="?")
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--serve", action="store_true", help="read JSON requests from stdin, one per line")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.serve:
        _serve()
        return
    if args.checkpoint is None:
        parser.error("CASE IMPLEMENTATION CHECKPOINT are required without --serve")
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(_in_fresh_process(args.case, args.implementation, args.checkpoint)))


if __name__ == "__main__":
    main()
