"""Time and peak memory of the dense and the chunked sigmoid loss, forward + backward, on CPU.

Run ``pytest benchmarks/test_bench_sigmoid_loss.py``; ``-m "not slow"`` skips n = 16384 (two to three minutes per
case on 2 cores).

Peak memory is measured in a fresh subprocess (this file run as a script) per case: the peak resident set size
over one forward + backward minus the resident size just before it, with inputs built and torch warm. The peak is
Linux's ``VmHWM`` of ``/proc/self/status``, reset to the current size through ``/proc/self/clear_refs`` before the
step. Not ``resource.getrusage(...).ru_maxrss``: exec carries the parent's high-water mark into it, so a child of
the benchmark process would report the peak of the largest case run before. tracemalloc does not see torch's
allocations. The subprocess also fixes glibc's mmap threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): otherwise
glibc raises it after the first freed chunk buffer and keeps later ones in its heap, and the RSS counts freed
memory (chunked, n = 4096: 98 MiB instead of 63 MiB). The numbers go to ``benchmark.extra_info["peak_mib"]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kornia_siglip2.losses import sigmoid_loss

ROOT = Path(__file__).resolve().parents[1]
EMBED_DIM = 768  # SigLIP base width
CHUNK_SIZE = 1024  # (1024, n) fp32 logits: 16 MiB at n = 4096, 64 MiB at n = 16384
CASES = [
    pytest.param(4096, id="n4096"),
    pytest.param(16384, id="n16384", marks=pytest.mark.slow),
]


def _inputs(n: int, dim: int = EMBED_DIM) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embeds = []
    for _ in range(2):
        x = torch.randn(n, dim, generator=generator)
        x.div_(x.norm(dim=-1, keepdim=True))  # in place: no transient copy inflates the memory baseline
        embeds.append(x.requires_grad_())
    scale = torch.tensor(2.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    return [*embeds, scale, bias]


def _step(inputs: list[torch.Tensor], chunk_size: int | None) -> None:
    loss = sigmoid_loss(*inputs, chunk_size=chunk_size)
    torch.autograd.grad(loss, inputs)


def _peak_mib(n: int, chunk_size: int | None) -> float:
    """Peak memory of one step, measured in a fresh process (see the module docstring)."""
    command = [sys.executable, __file__, str(n), str(chunk_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.parametrize("chunk_size", [None, CHUNK_SIZE], ids=["dense", f"chunked{CHUNK_SIZE}"])
@pytest.mark.parametrize("n", CASES)
def test_sigmoid_loss_forward_backward(benchmark, n, chunk_size):
    inputs = _inputs(n)
    rounds = 5 if n <= 4096 else 2
    benchmark.pedantic(_step, args=(inputs, chunk_size), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        n=n, embed_dim=EMBED_DIM, chunk_size=chunk_size, peak_mib=round(_peak_mib(n, chunk_size), 1)
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _measure(n: int, chunk_size: int | None) -> float:
    _step(_inputs(64), chunk_size=16 if chunk_size else None)  # load kernels and thread pools first
    inputs = _inputs(n)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    _step(inputs, chunk_size)
    return (_status_kib("VmHWM") - before) / 1024


if __name__ == "__main__":
    size, chunk = int(sys.argv[1]), None if sys.argv[2] == "None" else int(sys.argv[2])
    print(json.dumps({"peak_mib": _measure(size, chunk)}))
