"""Sigmoid (SigLIP) loss over image-text pairs: dense, chunked, and distributed.

Every image-text pair of the batch is an independent binary problem (SigLIP paper, Zhai et al. 2023,
Algorithm 1): ``logits = (image_embeds @ text_embeds.T) * exp(t') + b``, labels are :math:`+1` on the
diagonal and :math:`-1` elsewhere, and the loss is ``-sum(logsigmoid(labels * logits)) / n``.

Three ways to compute the same number and the same gradients:

- dense (``chunk_size=None``): the paper formula on the full :math:`(n, n)` logits; the reference.
- chunked (``chunk_size=c``): rows ``c`` at a time inside one autograd Function that saves only its inputs
  and recomputes each chunk's logits in backward, so neither pass holds more than :math:`(c, n)` logits.
  This costs one extra matmul per chunk in backward.
- distributed (``distributed="ring"`` or ``"all_gather"``): each rank keeps its :math:`n_{local}` pairs and
  scores its images against every rank's texts (paper section 3.3). The text blocks travel one hop at a
  time around a ring of send/recv (memory per rank :math:`O(n_{local}^2)` logits) or are all-gathered
  (:math:`O(n_{local} \\cdot n)`); ``chunk_size`` applies to each block. Either way the other ranks' text
  embeddings, :math:`(n, D)`, stay alive for backward. Gradients of a text block flow back to the rank that
  owns it, so the gradients a rank sees, averaged over ranks (what DDP does), are the gradients of the dense
  loss on the concatenated batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kornia_siglip2.errors import check, check_shape

__all__ = ["DISTRIBUTED_MODES", "SigmoidLoss", "sigmoid_loss"]

DISTRIBUTED_MODES = ("ring", "all_gather")

DistributedMode = Literal["ring", "all_gather"]


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    chunk_size: int | None = None,
    distributed: DistributedMode | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    r"""Sigmoid loss of SigLIP: every image-text pair of the batch is a binary classification.

    .. math::
        \mathcal{L} = -\frac{1}{n} \sum_{i,j} \log \sigma\big(y_{ij} (e^{t'} \, x_i \cdot z_j + b)\big),
        \quad y_{ij} = 2 \delta_{ij} - 1

    The sum runs over all :math:`n^2` pairs and is divided by :math:`n`, not :math:`n^2` (SigLIP paper, Algorithm 1).

    Args:
        image_embeds: :math:`(n, D)` L2-normalized image embeddings; row ``i`` pairs with text row ``i``.
        text_embeds: :math:`(n, D)` L2-normalized text embeddings.
        logit_scale: the log temperature :math:`t'` (a scalar or a one-element tensor, e.g. the model's
            ``logit_scale``); the logits are scaled by :math:`e^{t'}`, unclamped.
        logit_bias: the bias :math:`b` (a scalar or a one-element tensor).
        chunk_size: if given, process ``chunk_size`` rows at a time so that forward and backward hold at
            most :math:`(\text{chunk\_size}, n)` logits; same value and gradients as the dense loss.
        distributed: ``None`` for a single process, ``"ring"`` or ``"all_gather"`` to take the negatives
            from every rank of ``group``. Then the embeddings are this rank's :math:`(n_{local}, D)` pairs
            and the result is this rank's loss, divided by :math:`n_{local}`.
        group: the ``torch.distributed`` process group (default: the world).

    Returns:
        The scalar loss, in the dtype of the embeddings (logits, loss terms and their sum in float32 at least,
        so float16 / bfloat16 batches neither overflow nor drop the small terms).

    Raises:
        ValueCheckError: ``image_embeds`` or ``text_embeds`` is not :math:`(n, D)`, or they differ in shape.
        ValueCheckError: an empty batch, a ``logit_scale``/``logit_bias`` with more than one element, a bad
            ``chunk_size`` or ``distributed``, no initialized process group, or ranks whose embedding
            widths differ or that hold no pairs (raised on every rank, so none is left waiting).

    Note:
        Distributed, the dense loss on the concatenated batch is :math:`\sum_r (n_r / n) \mathcal{L}_r`: with
        equal blocks, the mean of the rank losses, and the rank gradients averaged over ranks (what DDP does)
        are the dense gradients. With uneven blocks, multiply each rank's loss by :math:`W n_r / n` to keep
        that equality. The block sizes are exchanged on every call, so uneven blocks need nothing else.

    Example:
        >>> basis = torch.eye(8, dtype=torch.float64)
        >>> image_embeds, text_embeds = basis[:4], basis[4:]  # all pairs orthogonal: closed form
        >>> loss = sigmoid_loss(image_embeds, text_embeds, torch.tensor(math.log(10.0)), torch.tensor(-10.0))
        >>> round(loss.item(), 6)
        10.000182
        >>> chunked = sigmoid_loss(image_embeds, text_embeds, math.log(10.0), -10.0, chunk_size=3)
        >>> torch.allclose(loss, chunked)
        True
    """
    check_shape(image_embeds, ["N", "D"], "image_embeds must be (n, D) embeddings")
    check_shape(text_embeds, ["N", "D"], "text_embeds must be (n, D) embeddings")
    check(
        text_embeds.shape == image_embeds.shape,
        lambda: (
            f"text_embeds must have the shape of image_embeds (n, D): got {tuple(text_embeds.shape)} and "
            f"{tuple(image_embeds.shape)}."
        ),
    )
    check(
        chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
        lambda: f"chunk_size must be a positive int or None, got {chunk_size!r}",
    )
    check(
        distributed is None or distributed in DISTRIBUTED_MODES,
        lambda: f"distributed must be None or one of {DISTRIBUTED_MODES}, got {distributed!r}",
    )
    logit_scale = _as_scalar(logit_scale, image_embeds, "logit_scale")
    logit_bias = _as_scalar(logit_bias, image_embeds, "logit_bias")
    if distributed is not None:
        return _distributed_loss(image_embeds, text_embeds, logit_scale, logit_bias, distributed, group, chunk_size)
    check(image_embeds.shape[0] > 0, "image_embeds must hold at least one image-text pair")
    loss_sum = _pair_loss_sum(image_embeds, text_embeds, logit_scale, logit_bias, 0, chunk_size)
    return (loss_sum / image_embeds.shape[0]).to(image_embeds.dtype)


class SigmoidLoss(nn.Module):
    r"""The SigLIP sigmoid loss as a module, optionally owning the learnable :math:`t'` and :math:`b`.

    Single-process, chunked and distributed computation are options of the same module and give the
    same loss and gradients (see :func:`sigmoid_loss`).

    Args:
        init_logit_scale: initial log temperature :math:`t'` of the owned parameter ``logit_scale``
            (:math:`\log 10`, SigLIP paper section 3.2), or ``None`` to own none and take it in forward.
        init_logit_bias: initial bias :math:`b` of the owned parameter ``logit_bias`` (:math:`-10`), or
            ``None`` to own none.
        chunk_size: rows per chunk, or ``None`` for the dense loss; see :func:`sigmoid_loss`.
        distributed: ``None``, ``"ring"`` or ``"all_gather"``; see :func:`sigmoid_loss`.
        group: the ``torch.distributed`` process group of the distributed modes (default: the world).

    Raises:
        ValueCheckError: a bad ``chunk_size`` or ``distributed``.

    Example:
        >>> loss_fn = SigmoidLoss()
        >>> image_embeds = F.normalize(torch.randn(8, 16), dim=-1)
        >>> text_embeds = F.normalize(torch.randn(8, 16), dim=-1)
        >>> loss = loss_fn(image_embeds, text_embeds)
        >>> loss.shape, loss_fn.logit_bias.item()
        (torch.Size([]), -10.0)
        >>> model_scale, model_bias = torch.tensor([2.3]), torch.tensor([-1.7])  # e.g. a model's own
        >>> loss = SigmoidLoss(None, None, chunk_size=4)(image_embeds, text_embeds, model_scale, model_bias)
    """

    logit_scale: nn.Parameter | None
    logit_bias: nn.Parameter | None

    def __init__(
        self,
        init_logit_scale: float | None = math.log(10.0),
        init_logit_bias: float | None = -10.0,
        *,
        chunk_size: int | None = None,
        distributed: DistributedMode | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check(
            chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
            lambda: f"chunk_size must be a positive int or None, got {chunk_size!r}",
        )
        check(
            distributed is None or distributed in DISTRIBUTED_MODES,
            lambda: f"distributed must be None or one of {DISTRIBUTED_MODES}, got {distributed!r}",
        )
        self.logit_scale = None if init_logit_scale is None else nn.Parameter(torch.tensor(init_logit_scale))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(init_logit_bias))
        self.chunk_size = chunk_size
        self.distributed = distributed
        self.group = group

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        r"""Loss of a batch of pairs (this rank's pairs in a distributed mode).

        Args:
            image_embeds: :math:`(n, D)` L2-normalized image embeddings.
            text_embeds: :math:`(n, D)` L2-normalized text embeddings.
            logit_scale: log temperature :math:`t'` to use instead of the owned one.
            logit_bias: bias :math:`b` to use instead of the owned one.

        Returns:
            The scalar loss.

        Raises:
            ValueCheckError: no ``logit_scale``/``logit_bias`` is given and the module owns none; and the errors
                of :func:`sigmoid_loss`.
        """
        logit_scale = self.logit_scale if logit_scale is None else logit_scale
        logit_bias = self.logit_bias if logit_bias is None else logit_bias
        check(logit_scale is not None, "logit_scale is required: this SigmoidLoss was built without one")
        check(logit_bias is not None, "logit_bias is required: this SigmoidLoss was built without one")
        return sigmoid_loss(
            image_embeds,
            text_embeds,
            logit_scale,
            logit_bias,
            chunk_size=self.chunk_size,
            distributed=self.distributed,
            group=self.group,
        )

    def extra_repr(self) -> str:
        """Options shown by ``repr``."""
        return f"chunk_size={self.chunk_size}, distributed={self.distributed!r}"


def _as_scalar(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """A 0-dim tensor from a number or a one-element tensor (HF stores ``logit_scale`` as shape (1,))."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    check(value.numel() == 1, lambda: f"{name} must be a scalar, got shape {tuple(value.shape)}")
    return value.reshape(())


def _pair_loss_sum(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positive_offset: int | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """Sum of ``-logsigmoid(label * logit)`` over the :math:`(n, m)` pairs of one block.

    Image row ``i`` is positive with text row ``i + positive_offset`` (the other pairs are negatives), or
    with none of the block's texts when ``positive_offset`` is ``None``.
    """
    if chunk_size is not None:
        return _ChunkedPairLossSum.apply(image, text, logit_scale, logit_bias, positive_offset, chunk_size)
    accumulate = _accumulation_dtype(image)  # fp16 / bf16: the n x m sum overflows or loses the small terms
    logits = (image @ text.T).to(accumulate) * logit_scale.to(accumulate).exp() + logit_bias.to(accumulate)
    labels = -torch.ones_like(logits)
    if positive_offset is not None:
        labels.diagonal(positive_offset).fill_(1.0)  # 2 * eye(n) - 1 for a square block
    return -F.logsigmoid(labels * logits).sum()


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision embeddings, their own dtype otherwise (float64 stays float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _ChunkedPairLossSum(torch.autograd.Function):
    """:func:`_pair_loss_sum` that holds at most :math:`(c, m)` logits in forward and in backward.

    Forward saves only the inputs; backward recomputes each chunk's logits and applies the closed-form
    gradient ``d loss / d logit = sigmoid(logit) - [positive]``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        positive_offset: int | None,
        chunk_size: int,
    ) -> torch.Tensor:
        accumulate = _accumulation_dtype(image)  # logits, loss terms and their sum in float32 at least
        scale = logit_scale.to(accumulate).exp()
        bias = logit_bias.to(accumulate)
        total = image.new_zeros((), dtype=accumulate)
        for start in range(0, image.shape[0], chunk_size):
            # -label * logit, built in place: -(a * s + b) == a * (-s) - b exactly, so this matches dense
            signed = (image[start : start + chunk_size] @ text.T).to(accumulate).mul_(-scale).sub_(bias)  # [c, m]
            if positive_offset is not None:
                signed.diagonal(positive_offset + start).neg_()
            total = total - F.logsigmoid(signed).sum()
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.positive_offset = positive_offset
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    @once_differentiable  # backward works in place on recomputed logits: no graph for double backward
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        need_image, need_text, need_scale, need_bias = ctx.needs_input_grad[:4]
        accumulate = _accumulation_dtype(image)
        scale = logit_scale.to(accumulate).exp()
        bias = logit_bias.to(accumulate)
        grad_image = torch.empty_like(image, dtype=accumulate) if need_image or need_scale else None
        grad_text = torch.zeros_like(text, dtype=accumulate) if need_text else None
        scale_sum = image.new_zeros((), dtype=accumulate)  # sum over pairs of dL/dlogit * (x_i . z_j)
        bias_sum = image.new_zeros((), dtype=accumulate)  # sum over pairs of dL/dlogit
        text_acc = text.to(accumulate)
        for start in range(0, image.shape[0], ctx.chunk_size):
            image_chunk = image[start : start + ctx.chunk_size].to(accumulate)
            grad_logits = (image[start : start + ctx.chunk_size] @ text.T).to(accumulate)
            grad_logits = grad_logits.mul_(scale).add_(bias).sigmoid_()  # [c, m]
            if ctx.positive_offset is not None:
                grad_logits.diagonal(ctx.positive_offset + start).sub_(1.0)
            if grad_image is not None:
                grad_image_chunk = grad_logits @ text_acc  # [c, D]
                grad_image[start : start + ctx.chunk_size] = grad_image_chunk
                # sum_ij g_ij (x_i . z_j) = sum_i x_i . (g @ z)_i: reuses the matmul of the image gradient
                scale_sum = scale_sum + (image_chunk * grad_image_chunk).sum()
            if grad_text is not None:
                grad_text.addmm_(grad_logits.T, image_chunk)
            bias_sum = bias_sum + grad_logits.sum()
        step = grad_output.to(accumulate) * scale  # d logit / d (x_i . z_j) = exp(t')
        grad_scale = (scale_sum * step).to(logit_scale.dtype) if need_scale else None
        grad_bias = (bias_sum * grad_output).to(logit_bias.dtype) if need_bias else None
        grad_image = grad_image.mul_(step).to(image.dtype) if need_image else None
        grad_text = grad_text.mul_(step).to(text.dtype) if need_text else None
        return grad_image, grad_text, grad_scale, grad_bias, None, None


def _distributed_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    mode: DistributedMode,
    group: dist.ProcessGroup | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """This rank's loss: its rows against all global columns, divided by its own row count."""
    check(
        dist.is_available() and dist.is_initialized(),
        lambda: f"distributed={mode!r} needs an initialized torch.distributed process group",
    )
    group = dist.group.WORLD if group is None else group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    rows = _exchange_rows(image, group)  # rows of every rank: blocks may be uneven
    if mode == "all_gather":
        all_text = _AllGatherRows.apply(text, rows, group)  # [n, D]
        loss_sum = _pair_loss_sum(image, all_text, logit_scale, logit_bias, sum(rows[:rank]), chunk_size)
    else:
        loss_sum = _pair_loss_sum(image, text, logit_scale, logit_bias, 0, chunk_size)
        block = text
        for step in range(1, world_size):
            # after `step` hops this rank holds the text block of rank - step: negatives only
            block = _RingShift.apply(block, rows[(rank - step) % world_size], group)
            loss_sum = loss_sum + _pair_loss_sum(image, block, logit_scale, logit_bias, None, chunk_size)
    return (loss_sum / image.shape[0]).to(image.dtype)


def _exchange_rows(image: torch.Tensor, group: dist.ProcessGroup) -> list[int]:
    """Row count of every rank; checks that all ranks agree on the width and hold pairs.

    The checks run on the gathered sizes, so every rank raises the same error instead of one rank raising
    while the others wait in a collective.
    """
    local = torch.tensor(list(image.shape), dtype=torch.int64, device=image.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    shapes = [tuple(shape.tolist()) for shape in gathered]
    check(
        len({width for _, width in shapes}) == 1,
        lambda: f"the embeddings of all ranks must have the same width D, got (n_local, D) = {shapes}",
    )
    check(
        all(rows > 0 for rows, _ in shapes),
        lambda: f"every rank must hold at least one image-text pair, got (n_local, D) = {shapes}",
    )
    return [rows for rows, _ in shapes]


def _send_recv(send: torch.Tensor, to_rank: int, recv: torch.Tensor, from_rank: int, group: dist.ProcessGroup) -> None:
    """Send to one group rank while receiving from another, posted together so the ring cannot deadlock."""
    operations = [
        dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, to_rank), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, from_rank), group),
    ]
    for request in dist.batch_isend_irecv(operations):
        request.wait()


class _RingShift(torch.autograd.Function):
    """Pass a block one hop around the ring (to rank + 1, from rank - 1); its gradient goes one hop back."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        block: torch.Tensor,
        incoming_rows: int,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        received = block.new_empty((incoming_rows, block.shape[1]))
        _send_recv(block, (rank + 1) % world_size, received, (rank - 1) % world_size, group)
        ctx.group = group
        ctx.outgoing_rows = block.shape[0]
        return received

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_received: torch.Tensor) -> tuple:
        rank, world_size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grad_block = grad_received.new_empty((ctx.outgoing_rows, grad_received.shape[1]))
        _send_recv(grad_received, (rank - 1) % world_size, grad_block, (rank + 1) % world_size, ctx.group)
        return grad_block, None, None


class _AllGatherRows(torch.autograd.Function):
    """All-gather blocks of possibly different row counts into :math:`(n, D)`, with gradient.

    Backward sums every rank's gradient with respect to the gathered rows and keeps this rank's slice: an
    all-reduce, since gloo has no reduce-scatter.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        block: torch.Tensor,
        rows: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        most = max(rows)
        # all_gather needs equal shapes: pad short blocks with zero rows and cut them off again
        padded = F.pad(block, (0, 0, 0, most - block.shape[0])).contiguous()
        gathered = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(gathered, padded, group=group)
        ctx.group = group
        ctx.rows = rows
        return torch.cat([part[:count] for part, count in zip(gathered, rows, strict=True)])

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_all: torch.Tensor) -> tuple:
        grad_all = grad_all.clone(memory_format=torch.contiguous_format)  # never reduce into autograd's buffer
        dist.all_reduce(grad_all, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.rows[:rank])
        return grad_all[start : start + ctx.rows[rank]], None, None
