"""Variable-length (block-diagonal) attention over packed sequences.

:func:`varlen_attention` is the only attention entry point of the towers. Queries of sequence ``i``
attend to keys of sequence ``i`` only. The result does not depend on the backend:

- ``"grouped"`` (default on CPU): sequences with the same (query, key) lengths are gathered into one
  batched ``scaled_dot_product_attention`` call with no mask, so memory grows with
  :math:`\\sum_i L_i^2` and a batch of equal lengths is a single plain SDPA call.
- ``"dense"``: one SDPA call with a block-diagonal boolean mask built from ``cu_seqlens`` (memory grows
  with :math:`N^2`); the reference, and the ``torch.compile(fullgraph=True)`` path for small batches.
- ``"loop"``: one SDPA call per sequence; the obvious reference the tests compare against.
- ``"flash"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16), picked by ``"auto"`` there.

The per-forward metadata (Python-int lengths, groups, gather indices) lives in a :class:`VarlenLayout`,
built once per forward and shared by all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.core.check import KORNIA_CHECK

__all__ = ["BACKENDS", "VarlenLayout", "varlen_attention"]

BACKENDS = ("auto", "grouped", "dense", "loop", "flash")


@dataclass(frozen=True)
class VarlenLayout:
    """Layout of a packed batch for attention, computed once and reused by every layer.

    Attributes:
        cu_seqlens_q: int32 :math:`(n + 1,)` query boundaries.
        cu_seqlens_k: int32 :math:`(n + 1,)` key boundaries.
        seqlens_q: query length of each sequence (Python ints).
        seqlens_k: key length of each sequence (Python ints).
        groups: ``(num_sequences, len_q, len_k)`` per group of sequences sharing their lengths, in the
            order their tokens appear after ``gather_q`` / ``gather_k``.
        gather_q: :math:`(N_q,)` token order that makes each group contiguous, or ``None`` if the
            tokens are already in that order (no copy is made then).
        gather_k: the same for keys and values.
        scatter_q: inverse of ``gather_q`` (``None`` when ``gather_q`` is).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    groups: tuple[tuple[int, int, int], ...]
    gather_q: torch.Tensor | None
    gather_k: torch.Tensor | None
    scatter_q: torch.Tensor | None

    @property
    def max_seqlen_q(self) -> int:
        """Longest query sequence."""
        return max(self.seqlens_q, default=0)

    @property
    def max_seqlen_k(self) -> int:
        """Longest key sequence."""
        return max(self.seqlens_k, default=0)

    @property
    def num_tokens_q(self) -> int:
        """Total number of query tokens."""
        return sum(self.seqlens_q)

    @property
    def num_tokens_k(self) -> int:
        """Total number of key tokens."""
        return sum(self.seqlens_k)

    @classmethod
    def from_seqlens(
        cls,
        seqlens_q: Sequence[int],
        seqlens_k: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> VarlenLayout:
        """Build the layout from per-sequence lengths.

        Args:
            seqlens_q: query length of each sequence.
            seqlens_k: key length of each sequence; defaults to ``seqlens_q`` (self-attention).
            device: device of the index tensors.

        Example:
            >>> layout = VarlenLayout.from_seqlens([4, 9, 4])
            >>> layout.groups, layout.gather_q is None
            (((2, 4, 4), (1, 9, 9)), False)
            >>> VarlenLayout.from_seqlens([16, 16, 16]).groups
            ((3, 16, 16),)
        """
        seqlens_q = tuple(int(length) for length in seqlens_q)
        seqlens_k = seqlens_q if seqlens_k is None else tuple(int(length) for length in seqlens_k)
        if len(seqlens_q) != len(seqlens_k):
            raise ValueError(
                f"Query and key layouts have {len(seqlens_q)} and {len(seqlens_k)} sequences; they must match."
            )
        if any(length <= 0 for length in seqlens_q + seqlens_k):
            raise ValueError(f"Sequence lengths must be positive, got q={seqlens_q}, k={seqlens_k}.")
        members: dict[tuple[int, int], list[int]] = {}
        for index, key in enumerate(zip(seqlens_q, seqlens_k, strict=True)):
            members.setdefault(key, []).append(index)
        order = [index for indices in members.values() for index in indices]
        groups = tuple((len(indices), len_q, len_k) for (len_q, len_k), indices in members.items())
        cu_q = _cumsum(seqlens_q)
        cu_k = _cumsum(seqlens_k)
        gather_q = gather_k = scatter_q = None
        if order != sorted(order):
            gather_q = _gather_index(order, cu_q, device)
            gather_k = _gather_index(order, cu_k, device)
            scatter_q = torch.argsort(gather_q)
        return cls(
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
            seqlens_q=seqlens_q,
            seqlens_k=seqlens_k,
            groups=groups,
            gather_q=gather_q,
            gather_k=gather_k,
            scatter_q=scatter_q,
        )

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None) -> VarlenLayout:
        """Build the layout from flash-attention style boundaries (reads them on the host once)."""
        _check_cu_seqlens(cu_seqlens_q, "cu_seqlens")
        seqlens_q = torch.diff(cu_seqlens_q).tolist()
        seqlens_k = None
        if cu_seqlens_k is not None:
            _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
            seqlens_k = torch.diff(cu_seqlens_k).tolist()
        return cls.from_seqlens(seqlens_q, seqlens_k, device=cu_seqlens_q.device)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    layout: VarlenLayout | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention restricted to blocks of a packed sequence.

    Args:
        query: :math:`(N_q, H, D_h)` packed queries.
        key: :math:`(N_k, H, D_h)` packed keys.
        value: :math:`(N_k, H, D_v)` packed values.
        cu_seqlens: int :math:`(n + 1,)` query boundaries (keys too unless ``cu_seqlens_k`` is given).
            Not needed when ``layout`` is given.
        max_seqlen: longest sequence; accepted for flash-attention compatibility (derived when absent).
        cu_seqlens_k: int :math:`(n + 1,)` key boundaries for cross-attention.
        layout: a prebuilt :class:`VarlenLayout`; saves the host sync of reading ``cu_seqlens`` when the
            same layout serves many calls.
        scale: softmax scale; defaults to :math:`D_h^{-1/2}`.
        backend: one of :data:`BACKENDS`. ``"auto"`` picks ``"flash"`` for fp16/bf16 CUDA tensors when
            torch provides varlen kernels, ``"grouped"`` otherwise.

    Returns:
        :math:`(N_q, H, D_v)` attention output, row ``r`` mixing only the values of its own sequence.

    Raises:
        ValueError: shapes disagree with each other or with the boundaries, or the backend is unknown.

    Example:
        >>> q, k, v = torch.randn(3, 10, 2, 8).unbind(0)
        >>> cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
        >>> out = varlen_attention(q, k, v, cu_seqlens)
        >>> out.shape
        torch.Size([10, 2, 8])
        >>> alone = varlen_attention(q[:4], k[:4], v[:4], torch.tensor([0, 4]))
        >>> torch.allclose(out[:4], alone, atol=1e-6)
        True
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}.")
    KORNIA_CHECK(
        query.ndim == 3 and key.ndim == 3 and value.ndim == 3,
        f"query, key and value must be (tokens, heads, head_dim), got {tuple(query.shape)}, "
        f"{tuple(key.shape)}, {tuple(value.shape)}.",
    )
    KORNIA_CHECK(
        key.shape[:2] == value.shape[:2] and query.shape[1] == key.shape[1] and query.shape[2] == key.shape[2],
        f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} do not share "
        "heads / head_dim / token counts.",
    )
    if backend == "auto":
        backend = "flash" if _flash_available(query) else "grouped"
    if backend == "dense":
        if cu_seqlens is None and layout is not None:
            cu_seqlens, cu_seqlens_k = layout.cu_seqlens_q, layout.cu_seqlens_k
        KORNIA_CHECK(cu_seqlens is not None, "varlen_attention needs cu_seqlens or a layout.")
        return _dense_attention(query, key, value, cu_seqlens, cu_seqlens_k, scale)
    if layout is None:
        KORNIA_CHECK(cu_seqlens is not None, "varlen_attention needs cu_seqlens or a layout.")
        layout = VarlenLayout.from_cu_seqlens(cu_seqlens, cu_seqlens_k)
    if not torch.compiler.is_compiling():
        KORNIA_CHECK(
            layout.num_tokens_q == query.shape[0] and layout.num_tokens_k == key.shape[0],
            f"cu_seqlens describe {layout.num_tokens_q} query / {layout.num_tokens_k} key tokens but query has "
            f"{query.shape[0]} and key {key.shape[0]} rows.",
        )
    if backend == "loop":
        return _loop_attention(query, key, value, layout, scale)
    if backend == "flash":
        return _flash_attention(query, key, value, layout, scale)
    return _grouped_attention(query, key, value, layout, scale)


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    if layout.gather_q is not None:
        query = query.index_select(0, layout.gather_q)
        key = key.index_select(0, layout.gather_k)
        value = value.index_select(0, layout.gather_k)
    heads = query.shape[1]
    sizes_q = [count * len_q for count, len_q, _ in layout.groups]
    sizes_k = [count * len_k for count, _, len_k in layout.groups]
    outputs = []
    for (count, len_q, len_k), q, k, v in zip(
        layout.groups, query.split(sizes_q), key.split(sizes_k), value.split(sizes_k), strict=True
    ):
        # [count * L, H, Dh] -> [count, H, L, Dh]
        q = q.view(count, len_q, heads, -1).transpose(1, 2)
        k = k.view(count, len_k, heads, -1).transpose(1, 2)
        v = v.view(count, len_k, heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        outputs.append(out.transpose(1, 2).reshape(count * len_q, heads, -1))
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if layout.scatter_q is not None:
        output = output.index_select(0, layout.scatter_q)
    return output


def _loop_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    outputs = []
    for q, k, v in zip(
        query.split(list(layout.seqlens_q)),
        key.split(list(layout.seqlens_k)),
        value.split(list(layout.seqlens_k)),
        strict=True,
    ):
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    # document id of every token: index of the block its position falls into
    doc_q = torch.searchsorted(
        cu_seqlens_q[1:].contiguous(), torch.arange(query.shape[0], device=query.device), right=True
    )
    doc_k = torch.searchsorted(cu_seqlens_k[1:].contiguous(), torch.arange(key.shape[0], device=key.device), right=True)
    mask = doc_q[:, None] == doc_k[None, :]  # [N_q, N_k]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
    )
    return out[0].transpose(0, 1)


def _flash_available(query: torch.Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    # CUDA only: tests/test_attention.py::TestFlashBackend runs on a GPU machine and skips on CPU (as in our CI)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        query,
        key,
        value,
        layout.cu_seqlens_q.to(query.device),
        layout.cu_seqlens_k.to(query.device),
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        scale=scale,
    )


def _cumsum(lengths: Sequence[int]) -> list[int]:
    boundaries = [0]
    for length in lengths:
        boundaries.append(boundaries[-1] + length)
    return boundaries


def _gather_index(order: list[int], boundaries: list[int], device: torch.device | str | None) -> torch.Tensor:
    ranges = [torch.arange(boundaries[index], boundaries[index + 1]) for index in order]
    return torch.cat(ranges).to(device)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, name: str) -> None:
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor (n + 1,) of boundaries, got {tuple(cu_seqlens.shape)}.")
    if int(cu_seqlens[0]) != 0 or bool((torch.diff(cu_seqlens) <= 0).any()):
        raise ValueError(f"{name} must start at 0 and increase strictly, got {cu_seqlens.tolist()}.")
