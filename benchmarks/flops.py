"""FLOP counts of the SigLIP towers (analytic) and the machine's measured fp32 matmul peak.

Conventions (those of the ViT / MFU literature): one multiply-add is 2 FLOPs; only matrix products count
(LayerNorm, activations, softmax, position-table resizing and embedding look-ups are left out); the
FLOPs are the *useful* ones, over real tokens only, so a padded implementation doing more work on padding
reads as a lower achieved rate. A training step is forward + backward without recomputation: every
matmul costs twice its forward FLOPs in backward (input and weight gradients), except the patch
embedding, whose input (the pixels) needs no gradient.

Per sequence of :math:`L` tokens, width :math:`D`, MLP width :math:`I` and :math:`n_\\ell` layers:

- patch embedding :math:`2 L P D` with :math:`P = p^2 C`;
- each layer: qkv :math:`6 L D^2`, output projection :math:`2 L D^2`, MLP :math:`4 L D I`, attention
  scores and weighted values :math:`4 L^2 D`;
- MAP head (one probe query per image): query :math:`2 D^2`, keys and values :math:`4 L D^2`,
  attention :math:`4 L D`, output projection :math:`2 D^2`, MLP :math:`4 D I`;
- text head: :math:`2 D D_{proj}` per text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_flops",
    "encoder_flops",
    "matmul_peak_flops",
    "text_tower_flops",
    "training_flops",
    "vision_tower_flops",
]


def encoder_flops(seqlens: Sequence[int], width: int, mlp_width: int, num_layers: int) -> int:
    """Forward FLOPs of ``num_layers`` pre-LN blocks over sequences of lengths ``seqlens`` (attention within each)."""
    tokens = sum(seqlens)
    projections = tokens * (2 * 4 * width * width + 2 * 2 * width * mlp_width)  # qkv + out, fc1 + fc2
    attention = sum(4 * length * length * width for length in seqlens)  # Q K^T and P V
    return num_layers * (projections + attention)


def vision_tower_flops(
    seqlens: Sequence[int], width: int, mlp_width: int, num_layers: int, patch_dim: int, head: bool = True
) -> int:
    """Forward FLOPs of the vision tower: patch embedding, encoder and (optionally) the MAP head.

    Args:
        seqlens: patches of every image (frame).
        width: hidden size :math:`D`.
        mlp_width: MLP inner size :math:`I`.
        num_layers: encoder blocks.
        patch_dim: :math:`p^2 C` values per patch.
        head: include the MAP-head pooling.

    Example:
        >>> round(vision_tower_flops([196], 768, 3072, 12, 768) / 1e9, 1)  # GFLOPs, ViT-B/16 at 224, one image
        35.4
    """
    tokens = sum(seqlens)
    total = 2 * tokens * patch_dim * width + encoder_flops(seqlens, width, mlp_width, num_layers)
    if head:
        frames = len(seqlens)
        total += frames * (2 * width * width + 2 * width * width + 4 * width * mlp_width)  # probe q, out, MLP
        total += tokens * (4 * width * width + 4 * width)  # keys + values, one query's attention
    return total


def text_tower_flops(
    batch: int, length: int, width: int, mlp_width: int, num_layers: int, projection_size: int | None = None
) -> int:
    """Forward FLOPs of the text tower on ``batch`` texts of ``length`` tokens (encoder + head)."""
    projection_size = width if projection_size is None else projection_size
    return encoder_flops([length] * batch, width, mlp_width, num_layers) + 2 * batch * width * projection_size


def training_flops(forward_flops: int, patch_embedding_flops: int = 0) -> int:
    """Forward + backward FLOPs of a step: backward doubles every matmul but the patch embedding's input gradient."""
    return 3 * forward_flops - patch_embedding_flops


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """``Q K^T`` and ``P V`` of ``aten._scaled_dot_product_flash_attention_for_cpu`` (not in torch's table)."""
    *batch, length_q, head_dim = query_shape
    length_k, value_dim = key_shape[-2], value_shape[-1]
    return 2 * int(torch.Size(batch).numel()) * length_q * length_k * (head_dim + value_dim)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Backward of the CPU flash kernel counted as twice its forward (the no-recompute convention above)."""
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def _fused_linear_flops(input_shape, *args, **kwargs) -> int:
    """``mkldnn._linear_pointwise`` (and its ``.binary`` overload): the matmul of ``F.linear`` only.

    The default overload is ``(input, weight, bias, attr, scalars, algorithm)``, ``.binary`` is ``(input,
    other, weight, bias, attr)``; torch's counter looks formulas up per op packet, so one formula serves both.
    The fused bias, activation and residual add are not counted (as for ``F.linear``).
    """
    weight_shape = args[0] if isinstance(args[2], str) else args[1]
    return 2 * int(torch.Size(input_shape[:-1]).numel()) * input_shape[-1] * weight_shape[0]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that :class:`torch.utils.flop_counter.FlopCounterMode` sees while ``fn()`` runs.

    Adds the CPU flash-attention kernels (absent from torch's table in 2.13, so SDPA on CPU would count
    as zero) and oneDNN's fused linears (the CPU inference path) with the conventions of this module.
    """
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the CPU inference fast path of kornia_siglip2.attention
        mapping[torch.ops.mkldnn._linear_pointwise] = _fused_linear_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_flops(size: int | None = None, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a square ``F.linear`` (``A @ B^T``) of side ``size`` over ``repeats`` timed runs.

    This is the practical ceiling every encoder result of that dtype is read against: the same BLAS /
    oneDNN kernels, threads and memory system, no framework overhead. ``F.linear`` is the product every
    ``nn.Linear`` of both encoders runs; for float32 it is the same MKL ``sgemm`` as ``torch.mm``, for
    bfloat16 / float16 it is the layout PyTorch's CPU kernels handle fastest (a plain ``torch.mm(A, B)`` of
    16-bit operands runs several times slower on CPUs without AVX-512 BF16 / AMX). ``size`` defaults to
    2048 in float32 and 1024 in 16-bit dtypes (which are slow where the CPU lacks support). One warm-up
    run comes first.
    """
    size = size or (2048 if dtype == torch.float32 else 1024)
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(dtype)
    right = torch.randn(size, size, generator=generator).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(left, right)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(left, right)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
