"""The towers under ``torch.compile(fullgraph=True)`` on a CUDA GPU: parity with eager and speed.

Part of ``benchmarks/gpu_check.sh``. On the native NaFlex mix of :data:`benchmarks.cases.NATIVE_GRIDS` (ViT-B
width, 4 layers, random weights), in bfloat16:

- the NaFlex vision tower on a ``PackedImages`` built outside the compiled function, with the flash varlen
  backend (what ``"auto"`` picks for half precision on CUDA, also inside ``torch.compile``) and with the
  tensor-only ``"blocks"`` backend (the one graph for every composition);
- the fixed-resolution vision tower (224, batch 32) and the text tower (batch 64);

each compiled with inductor, checked against eager (pooled features, max abs difference over max abs value),
timed (median of CUDA-event-timed runs after warm-up). ``--device cpu`` runs the same checks on the CPU with
the tiny model (a smoke test of the script). The report is markdown (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _time(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cases import NATIVE_GRIDS, PATCH_SIZE, write_checkpoint
    from kornia_siglip2 import PackedImages, SigLip2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout only)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = "vitb4" if device.type == "cuda" else "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as folder:
        models = {
            family: SigLip2.from_pretrained(write_checkpoint(family, size, Path(folder) / family), dtype=dtype)
            .to(device)
            .eval()
            for family in ("siglip", "siglip2")
        }
    generator = torch.Generator().manual_seed(0)
    grid_thw = torch.tensor([[1, h, w] for h, w in NATIVE_GRIDS])
    patches = torch.rand(int(grid_thw.prod(-1).sum()), 3 * PATCH_SIZE**2, generator=generator) * 2 - 1
    packed = PackedImages(patches.to(device, dtype), grid_thw.to(device))
    images = (torch.rand(32, 3, 224, 224, generator=generator) * 2 - 1).to(device, dtype)
    input_ids = torch.randint(0, 32_000, (64, 64), generator=generator).to(device)
    naflex, fixed = models["siglip2"], models["siglip"]
    cases = [
        ("NaFlex mixed, auto (flash on CUDA)", naflex, "auto", lambda m: m.vision_model(packed).pooler_output),
        ("NaFlex mixed, blocks", naflex, "blocks", lambda m: m.vision_model(packed).pooler_output),
        ("fixed 224 batch 32", fixed, "auto", lambda m: m.vision_model(images).pooler_output),
        ("text batch 64", fixed, "auto", lambda m: m.text_model(input_ids).pooler_output),
    ]
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    for name, model, backend, call in cases:
        model.set_attention_backend(backend)
        torch._dynamo.reset()
        compiled = torch.compile(lambda m=model, c=call: c(m), fullgraph=True)
        with torch.inference_mode():
            try:
                eager_out, compiled_out = call(model), compiled()
                error = _relative(compiled_out, eager_out)
                eager_ms = _time(lambda m=model, c=call: c(m), device)
                compiled_ms = _time(compiled, device)
                ok = error <= tolerance
                rows.append(
                    f"| {name} | {eager_ms:.2f} | {compiled_ms:.2f} | {eager_ms / compiled_ms:.2f} | "
                    f"{error:.1e} | {'yes' if ok else '**no**'} |"
                )
            except Exception as exception:  # a report line, not a crash: the other cases still run
                ok = False
                rows.append(f"| {name} | - | - | - | {type(exception).__name__}: {exception} | **no** |")
        failed = failed or not ok
        model.set_attention_backend("auto")
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"## Compiled towers ({title}, {size}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__})",
        "",
        "| case | eager ms | compiled ms | speedup | rel diff vs eager | within tolerance |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write("\n" + report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
