"""Mixed-batch attention speed on a CUDA GPU: varlen (flash / cuDNN) vs padded SDPA vs transformers.

Part of ``benchmarks/gpu_check.sh``. Three measurements on the native NaFlex mix of
:data:`benchmarks.cases.NATIVE_GRIDS` (6 images, 64 ... 1024 patches), ViT-B width, 4 layers, in bfloat16 and
float16, random weights shared through one transformers checkpoint:

- attention alone: :func:`kornia_siglip2.attention.varlen_attention` with ``backend="flash"`` on the packed
  tokens vs ``F.scaled_dot_product_attention`` on the batch padded to the longest image with a key mask;
- the vision tower: ours packed (``get_image_features(patches=..., grid_thw=...)``) vs transformers'
  ``Siglip2Model`` on the padded batch with ``attn_implementation="sdpa"``, and ``"flash_attention_2"``
  when the ``flash_attn`` package is installed.

Times are medians of CUDA-event-timed runs after warm-up. The target of the speed issue: varlen >= 2x padded
SDPA on this batch. The report is markdown (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _time_cuda(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_speed(dtype: torch.dtype, seqlens: list[int], heads: int = 12, head_dim: int = 64) -> dict:
    """Varlen flash attention on packed tokens vs SDPA on the padded batch with a key mask (ms)."""
    from kornia_siglip2.attention import VarlenLayout, varlen_attention

    device = torch.device("cuda")
    total, longest, count = sum(seqlens), max(seqlens), len(seqlens)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = torch.randn(3, total, heads, head_dim, device=device, dtype=dtype, generator=generator).unbind(0)
    layout = VarlenLayout.from_seqlens(seqlens, device=device)
    padded = torch.zeros(3, count, heads, longest, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(count, 1, 1, longest, dtype=torch.bool, device=device)
    start = 0
    for index, length in enumerate(seqlens):
        for slot, tensor in enumerate((q, k, v)):
            padded[slot, index, :, :length] = tensor[start : start + length].transpose(0, 1)
        mask[index, ..., :length] = True
        start += length
    pq, pk, pv = padded.unbind(0)
    varlen_ms = _time_cuda(lambda: varlen_attention(q, k, v, layout=layout, backend="flash"))
    padded_ms = _time_cuda(lambda: F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask))
    return {"varlen_ms": varlen_ms, "padded_sdpa_ms": padded_ms, "speedup": padded_ms / varlen_ms}


def tower_speed(dtype: torch.dtype, folder: Path) -> dict:
    """Vision tower, ours packed vs transformers padded (sdpa, flash_attention_2 when installed), in ms."""
    from transformers import AutoModel

    from benchmarks.cases import CASES
    from kornia_siglip2 import SigLip2

    case = CASES["naflex_native"]
    device = torch.device("cuda")
    ours = SigLip2.from_pretrained(folder, dtype=dtype, device=device).eval()
    packed = {k: v.to(device) for k, v in case.inputs("ours", dtype="float32").items()}
    packed["patches"] = packed["patches"].to(dtype)
    padded = {k: v.to(device) for k, v in case.inputs("transformers", dtype="float32").items()}
    padded["pixel_values"] = padded["pixel_values"].to(dtype)
    results = {}
    with torch.inference_mode():
        reference = ours.get_image_features(**packed).pooler_output.float()
        results["ours_varlen_ms"] = _time_cuda(lambda: ours.get_image_features(**packed), repeats=10)
        implementations = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
        for name in implementations:
            model = AutoModel.from_pretrained(folder, attn_implementation=name, dtype=dtype).to(device).eval()
            features = model.get_image_features(**padded).pooler_output.float()
            results[f"transformers_{name}_max_abs_diff"] = (features - reference).abs().max().item()
            results[f"transformers_{name}_ms"] = _time_cuda(
                lambda model=model: model.get_image_features(**padded), repeats=10
            )
            del model
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure and write the markdown report; returns 0, or 1 when a measurement failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/gpu_check.md")
    parser.add_argument("--parity-log", type=Path, default=None)
    parser.add_argument("--parity-status", type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_speed: no CUDA device (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 2
    from benchmarks.cases import CASES, write_checkpoint

    seqlens = CASES["naflex_native"].seqlens
    lines = [
        "# GPU check",
        "",
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}.",
        "",
    ]
    if args.parity_log is not None:
        tail = args.parity_log.read_text().strip().splitlines()[-1:] if args.parity_log.is_file() else ["no log"]
        verdict = "passed" if args.parity_status == 0 else f"**failed** (exit {args.parity_status})"
        lines += [f"Parity (`tests/test_attention.py::TestFlashBackend`): {verdict}: `{tail[0]}`", ""]
    failed = False
    lines += [
        f"Attention alone, 12 heads x 64, sequences {seqlens} (varlen target: >= 2x padded SDPA):",
        "",
        "| dtype | varlen ms | padded SDPA ms | speedup | >= 2x |",
        "|---|---:|---:|---:|---|",
    ]
    for dtype in (torch.bfloat16, torch.float16):
        try:
            r = attention_speed(dtype, seqlens)
            met = "yes" if r["speedup"] >= 2 else "**no**"
            lines.append(f"| {dtype} | {r['varlen_ms']:.3f} | {r['padded_sdpa_ms']:.3f} | {r['speedup']:.2f} | {met} |")
        except Exception as error:  # reported in the file, and the exit status says so
            failed = True
            lines.append(f"| {dtype} | error: {type(error).__name__}: {error} | | | |")
    lines += [
        "",
        "Vision tower, ViT-B width, 4 layers, the same 6 images (ours packed, transformers padded to 1024):",
        "",
        "| dtype | ours ms | transformers sdpa ms | transformers flash-attn-2 ms | max abs diff (sdpa) |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = write_checkpoint("siglip2", "vitb4", Path(tmp))
        for dtype in (torch.bfloat16, torch.float16):
            try:
                r = tower_speed(dtype, folder)
                flash = r.get("transformers_flash_attention_2_ms")
                lines.append(
                    f"| {dtype} | {r['ours_varlen_ms']:.2f} | {r['transformers_sdpa_ms']:.2f} "
                    f"| {'not installed' if flash is None else f'{flash:.2f}'} "
                    f"| {r['transformers_sdpa_max_abs_diff']:.2e} |"
                )
            except Exception as error:
                failed = True
                lines.append(f"| {dtype} | error: {type(error).__name__}: {error} | | | |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    temporary.write_text("\n".join(lines))
    temporary.replace(args.out)
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
