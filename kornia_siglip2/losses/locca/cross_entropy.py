"""Softmax cross-entropy through the output projection, chunked over the vocabulary.

The logits :math:`(T, V)` of a 256k vocabulary would dominate a decoder's memory (``T = B * 3 * L`` tokens).
:class:`ChunkedCrossEntropy` is a custom autograd function that fuses the projection with the loss: the
forward pass computes the log-partition chunk by chunk of ``chunk_size`` classes and keeps only
:math:`(T,)` of it; the backward pass recomputes each chunk's logits and accumulates the gradients. Peak extra
memory is :math:`O(T \\cdot \\text{chunk\\_size})` in both passes, never :math:`O(T \\cdot V)`. (A plain loop
with ``logsumexp`` under autograd would save every chunk's logits for backward and save nothing.) Half
precision inputs are computed in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from kornia_siglip2.errors import check, check_shape

__all__ = ["ChunkedCrossEntropy", "chunked_cross_entropy", "sequence_cross_entropy"]

#: Default vocabulary chunk: 8192 classes, i.e. 32 chunks for SigLIP 2's 256k vocabulary plus box bins.
DEFAULT_CHUNK_SIZE = 8192


class ChunkedCrossEntropy(torch.autograd.Function):
    """``-log softmax(hidden @ weight.T + bias)[labels]`` per token, without the :math:`(T, V)` logits.

    Inputs of :meth:`forward`: ``hidden`` :math:`(T, D)`, ``weight`` :math:`(V, D)`, ``bias`` :math:`(V,)` or
    ``None``, int ``labels`` :math:`(T,)`, ``chunk_size``; output :math:`(T,)` in at least float32.
    Use :func:`chunked_cross_entropy`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        """Per-token negative log-likelihood :math:`(T,)`."""
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden_c = hidden.to(compute_dtype)
        chunk_lse = [
            torch.logsumexp(_chunk_logits(hidden_c, weight, bias, start, chunk_size), dim=-1)
            for start in range(0, weight.shape[0], chunk_size)
        ]
        log_partition = torch.logsumexp(torch.stack(chunk_lse, dim=-1), dim=-1)  # [T]
        target_logit = (hidden_c * weight[labels].to(compute_dtype)).sum(-1)
        if bias is not None:
            target_logit = target_logit + bias[labels].to(compute_dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, log_partition)
        ctx.chunk_size = chunk_size
        return log_partition - target_logit

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradient: ``softmax - one_hot`` of the logits, pushed through the projection chunk by chunk."""
        hidden, weight, bias, labels, log_partition = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = log_partition.dtype
        hidden_c = hidden.to(compute_dtype)
        grad_nll = grad_nll.to(compute_dtype)
        grad_hidden = torch.zeros_like(hidden_c) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=compute_dtype, device=weight.device) if need_bias else None
        for start in range(0, weight.shape[0], ctx.chunk_size):
            logits = _chunk_logits(hidden_c, weight, bias, start, ctx.chunk_size)
            grad_logits = torch.exp(logits - log_partition[:, None]) * grad_nll[:, None]  # [T, chunk]
            end = start + logits.shape[-1]
            if grad_hidden is not None:
                grad_hidden += grad_logits @ weight[start:end].to(compute_dtype)
            if grad_weight is not None:
                grad_weight[start:end] = grad_logits.transpose(0, 1) @ hidden_c
            if grad_bias is not None:
                grad_bias[start:end] = grad_logits.sum(0)
        # the one-hot part of softmax - one_hot, sparse: one class per token
        if grad_hidden is not None:
            grad_hidden -= grad_nll[:, None] * weight[labels].to(compute_dtype)
        if grad_weight is not None:
            grad_weight.index_add_(0, labels, -grad_nll[:, None] * hidden_c)
        if grad_bias is not None:
            grad_bias.index_add_(0, labels, -grad_nll)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, chunk_size: int
) -> torch.Tensor:
    weight_chunk = weight[start : start + chunk_size].to(hidden.dtype)
    bias_chunk = None if bias is None else bias[start : start + chunk_size].to(hidden.dtype)
    return torch.nn.functional.linear(hidden, weight_chunk, bias_chunk)  # [T, chunk]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token softmax cross-entropy of the logits ``hidden @ weight.T + bias``, chunked over classes.

    Equal in value and gradient to ``F.cross_entropy(F.linear(hidden, weight, bias), labels,
    reduction="none")`` (to rounding), with memory :math:`O(T \\cdot \\text{chunk\\_size})` instead of
    :math:`O(T \\cdot V)`.

    Args:
        hidden: :math:`(T, D)` features.
        weight: :math:`(V, D)` output projection.
        bias: :math:`(V,)` output bias or ``None``.
        labels: int :math:`(T,)` classes in ``[0, V)``.
        chunk_size: classes per chunk.

    Returns:
        :math:`(T,)` negative log-likelihoods, float32 for half-precision inputs.

    Raises:
        ValueError: a tensor has the wrong number of dimensions.
        ValueCheckError: sizes disagree or ``chunk_size`` is not positive.

    Example:
        >>> hidden, weight, bias = torch.randn(6, 8), torch.randn(100, 8), torch.randn(100)
        >>> labels = torch.randint(0, 100, (6,))
        >>> full = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels, reduction="none")
        >>> torch.allclose(chunked_cross_entropy(hidden, weight, bias, labels, chunk_size=16), full, atol=1e-5)
        True
    """
    check_shape(hidden, ["T", "D"], "hidden must be (T, D).")
    check_shape(weight, ["V", "D"], "weight must be (V, D).")
    check_shape(labels, ["T"], "labels must be (T,).")
    check(
        hidden.shape[0] == labels.shape[0] and hidden.shape[1] == weight.shape[1],
        lambda: (
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} disagree."
        ),
    )
    check(bias is None or bias.shape == weight.shape[:1], "bias must be (V,).")
    check(chunk_size > 0, lambda: f"chunk_size must be positive, got {chunk_size}.")
    return ChunkedCrossEntropy.apply(hidden, weight, bias, labels, chunk_size)


def sequence_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross-entropy over the scored positions of each sequence (big_vision ``weighted_softmax_xent``).

    Only scored positions go through the output projection (all positions, weighted by zero, under
    ``torch.compile``), so unscored ones (padding, conditions) get exactly zero gradient. A sequence with no
    scored position gives 0.

    Args:
        hidden: :math:`(*, L, D)` decoder states.
        weight: :math:`(V, D)` output projection.
        bias: :math:`(V,)` output bias or ``None``.
        labels: int :math:`(*, L)` targets.
        loss_mask: bool :math:`(*, L)`, True where scored.
        chunk_size: classes per chunk.

    Returns:
        :math:`(*)` per-sequence losses.

    Raises:
        ValueCheckError: shapes disagree.

    Example:
        >>> import math
        >>> hidden, weight = torch.randn(2, 5, 8), torch.zeros(100, 8)
        >>> labels, mask = torch.randint(0, 100, (2, 5)), torch.rand(2, 5) > 0.3
        >>> losses = sequence_cross_entropy(hidden, weight, None, labels, mask | True)  # zero logits: log(100)
        >>> [round(value, 4) for value in losses.tolist()], round(math.log(100), 4)
        ([4.6052, 4.6052], 4.6052)
    """
    check(
        labels.shape == hidden.shape[:-1] and loss_mask.shape == labels.shape,
        lambda: (
            f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must match hidden "
            f"{tuple(hidden.shape)} without its last dimension."
        ),
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels, scored = labels.reshape(-1), loss_mask.reshape(-1)
    if torch.compiler.is_compiling():
        # static shapes: every token goes through the projection, unscored ones weighted by zero
        nll = chunked_cross_entropy(hidden, weight, bias, labels, chunk_size) * scored
    else:
        # only the scored tokens go through the projection (padding and conditions are often half a batch)
        index = scored.nonzero().squeeze(1)
        scored_nll = chunked_cross_entropy(hidden[index], weight, bias, labels[index], chunk_size)
        nll = scored_nll.new_zeros(labels.shape).index_copy(0, index, scored_nll)
    counts = loss_mask.sum(-1).clamp(min=1)
    return nll.view(loss_mask.shape).sum(-1) / counts
