"""Packed patch sequences: patchify images, describe them with ``grid_thw``, convert to and from padding.

A packed batch is ``patches [N, p*p*C]`` plus ``grid_thw [n, 3]``: row ``(t, h, w)`` is ``t`` frames of
``h x w`` patches, stored frame after frame, patches row-major, each patch flattened in ``(py, px, c)``
order (the order of transformers' ``Siglip2ImageProcessor``). Each frame is one attention block.

This module holds the package's one packed-batch type, :class:`PackedImages`, and the host-side layouts
derived from it once per batch: :class:`VarlenLayout` (which tokens attend to which, as flash-attention's
``cu_seqlens``) and :class:`ImageLayout` (the layouts of a packed image batch: per-frame self-attention and
per-frame MAP-head pooling).

A batch may carry only some of each image's patches (NaViT token dropping, Dehghani et al. 2023, section 2.2):
``keep_mask`` over the full grids says which are present, and only those are in ``patches``. Position
embeddings still come from each patch's place in its full grid; attention and pooling see the kept patches.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kornia_siglip2.errors import ValueCheckError, check, check_shape, check_type

__all__ = [
    "BlockLayout",
    "ImageLayout",
    "PackedImages",
    "VarlenLayout",
    "check_cu_seqlens",
    "check_grid_thw",
    "check_keep_mask",
    "conv_to_linear_patch_weight",
    "linear_to_conv_patch_weight",
    "grid_thw_to_cu_seqlens",
    "grid_thw_to_seqlens",
    "image_blocks",
    "pack_inputs",
    "packed_layout",
    "packed_to_padded",
    "padded_to_packed",
    "patchify",
    "unpatchify",
]


def patchify(images: torch.Tensor, patch_size: int, drop_remainder: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch of images into one packed sequence of flattened patches.

    Args:
        images: images :math:`(B, C, H, W)`.
        patch_size: patch side :math:`p` in pixels.
        drop_remainder: drop the last ``H % p`` rows and ``W % p`` columns, as the Conv2d patch embedding
            (kernel = stride = ``p``, no padding) of fixed-resolution checkpoints does (e.g.
            ``google/siglip-so400m-patch14-384``: 384 = 27 * 14 + 6, a 27 x 27 grid). ``False`` (the default,
            and NaFlex's rule) requires ``H`` and ``W`` divisible by ``p``.

    Returns:
        - patches :math:`(B \\cdot h \\cdot w, p \\cdot p \\cdot C)`, image after image, patches row-major,
          each patch in ``(py, px, c)`` order.
        - grid_thw :math:`(B, 3)` int64 rows ``(1, h, w)`` with ``h = H // p``, ``w = W // p``.

    Raises:
        ValueError: the image size is not divisible by ``patch_size`` (and ``drop_remainder`` is False), or an
            image is smaller than one patch.

    Example:
        >>> patches, grid_thw = patchify(torch.rand(2, 3, 32, 48), patch_size=16)
        >>> patches.shape, grid_thw.tolist()
        (torch.Size([12, 768]), [[1, 2, 3], [1, 2, 3]])
        >>> patchify(torch.rand(1, 3, 384, 384), patch_size=14, drop_remainder=True)[1].tolist()
        [[1, 27, 27]]
    """
    check_shape(
        images, ["B", "C", "H", "W"], "images must have shape (B, C, H, W); add a batch dimension with images[None]."
    )
    batch, channels, height, width = images.shape
    if (height % patch_size or width % patch_size) and not drop_remainder:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by patch_size {patch_size}: "
            "resize or crop the images first (the preprocessors do this), or pass drop_remainder=True "
            "(fixed-resolution towers: the Conv2d patch embedding drops the remainder)."
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    check(
        grid_h > 0 and grid_w > 0,
        lambda: f"Image size {height}x{width} is smaller than one patch of {patch_size}x{patch_size} pixels.",
    )
    if (grid_h * patch_size, grid_w * patch_size) != (height, width):
        images = images[..., : grid_h * patch_size, : grid_w * patch_size]
    # [B, C, h, p, w, p] -> [B, h, w, p, p, C]
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch * grid_h * grid_w, -1)
    grid_thw = torch.tensor([[1, grid_h, grid_w]], device=images.device).expand(batch, 3).clone()
    return patches, grid_thw


def conv_to_linear_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d patch embedding :math:`(D, C, p, p)` as the Linear over ``(py, px, c)`` patches, :math:`(D, p^2 C)`.

    Example:
        >>> conv_to_linear_patch_weight(torch.zeros(8, 3, 4, 4)).shape
        torch.Size([8, 48])
    """
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def linear_to_conv_patch_weight(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Inverse of :func:`conv_to_linear_patch_weight`: :math:`(D, p^2 C)` over ``(py, px, c)`` to :math:`(D, C, p, p)`.

    Example:
        >>> conv = torch.randn(8, 3, 4, 4)
        >>> torch.equal(linear_to_conv_patch_weight(conv_to_linear_patch_weight(conv), 3), conv)
        True
    """
    patch = round((weight.shape[1] // num_channels) ** 0.5)
    return weight.reshape(weight.shape[0], patch, patch, num_channels).permute(0, 3, 1, 2).contiguous()


def unpatchify(patches: torch.Tensor, grid_thw: torch.Tensor, patch_size: int) -> list[torch.Tensor]:
    """Invert :func:`patchify`: one :math:`(t, C, h \\cdot p, w \\cdot p)` tensor per grid row.

    Example:
        >>> images = torch.rand(2, 3, 32, 48)
        >>> frames = unpatchify(*patchify(images, 16), patch_size=16)
        >>> torch.equal(torch.cat(frames), images)
        True
    """
    check_grid_thw(grid_thw, patches.shape[0])
    images = []
    for chunk, (frames, grid_h, grid_w) in zip(
        patches.split(grid_thw.prod(-1).tolist()), grid_thw.tolist(), strict=True
    ):
        # [t, h, w, p, p, C] -> [t, C, h, p, w, p]
        chunk = chunk.reshape(frames, grid_h, grid_w, patch_size, patch_size, -1)
        chunk = chunk.permute(0, 5, 1, 3, 2, 4)
        images.append(chunk.reshape(frames, -1, grid_h * patch_size, grid_w * patch_size))
    return images


def check_grid_thw(grid_thw: torch.Tensor, num_tokens: int | None = None) -> None:
    """Check that ``grid_thw`` is an integer :math:`(n, 3)` tensor of positive sizes matching ``num_tokens``.

    Raises:
        ValueError: wrong shape, dtype, non-positive entries, or a patch count different from ``num_tokens``.
    """
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        shape = tuple(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else type(grid_thw).__name__
        raise ValueError(f"grid_thw must be a tensor of shape (num_images, 3) with rows (t, h, w), got {shape}.")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise ValueError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}.")
    if torch.compiler.is_compiling():
        return
    if grid_thw.numel() and bool((grid_thw <= 0).any()):
        raise ValueError(f"grid_thw entries must be positive, got {grid_thw.tolist()}.")
    if num_tokens is not None:
        total = int(grid_thw.prod(-1).sum())
        if total != num_tokens:
            raise ValueError(f"grid_thw describes {total} patches (sum of t*h*w) but patches has {num_tokens} rows.")


def check_keep_mask(keep_mask: torch.Tensor, grid_thw: torch.Tensor, num_tokens: int | None = None) -> None:
    """Check a token-dropping mask: bool :math:`(\\sum t h w,)` over the full grids, ``num_tokens`` True.

    Raises:
        TypeCheckError: ``keep_mask`` is not a bool tensor.
        ValueCheckError: ``keep_mask`` is not 1-D of the length ``grid_thw`` describes, or it keeps a number of
            patches different from ``num_tokens`` (the rows of ``patches``).
    """
    check_type(
        isinstance(keep_mask, torch.Tensor) and keep_mask.dtype == torch.bool,
        lambda: (
            "keep_mask must be a bool tensor (sum of t*h*w,), True at the patches present in patches, got "
            f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)}."
        ),
    )
    check_grid_thw(grid_thw)
    if torch.compiler.is_compiling():
        return
    full = int(grid_thw.long().prod(-1).sum())
    check(
        tuple(keep_mask.shape) == (full,),
        lambda: (
            f"keep_mask must have shape ({full},): one entry per patch of the full grids (sum of t*h*w of "
            f"grid_thw), got {tuple(keep_mask.shape)}."
        ),
    )
    if num_tokens is not None:
        kept = int(keep_mask.sum())
        check(
            kept == num_tokens,
            lambda: f"keep_mask keeps {kept} patches but patches has {num_tokens} rows; they must match.",
        )


def grid_thw_to_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Attention block lengths: one block of ``h * w`` tokens per frame.

    Args:
        grid_thw: :math:`(n, 3)` rows ``(t, h, w)``.

    Returns:
        int64 lengths :math:`(\\sum t,)`.

    Example:
        >>> grid_thw_to_seqlens(torch.tensor([[1, 2, 3], [2, 1, 4]])).tolist()
        [6, 4, 4]
    """
    check_grid_thw(grid_thw)
    grid_thw = grid_thw.long()  # int8 / uint8 / int16 grids: h * w overflows in their own dtype
    return torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])


def grid_thw_to_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative block boundaries in the packed sequence, as flash-attention's ``cu_seqlens``.

    Args:
        grid_thw: :math:`(n, 3)` rows ``(t, h, w)``.

    Returns:
        int32 :math:`(\\sum t + 1,)` starting at 0 and ending at the total number of tokens.

    Example:
        >>> grid_thw_to_cu_seqlens(torch.tensor([[1, 2, 3], [2, 1, 4]])).tolist()
        [0, 6, 10, 14]
    """
    lengths = grid_thw_to_seqlens(grid_thw)
    boundaries = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    if not torch.compiler.is_compiling():
        check(
            boundaries.numel() == 0 or int(boundaries[-1]) < 2**31,
            lambda: (
                f"grid_thw describes {int(boundaries[-1])} patches, more than int32 cu_seqlens can index "
                "(2**31 - 1); split the batch."
            ),
        )
    return boundaries.to(torch.int32)


def padded_to_packed(
    pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert transformers' padded NaFlex inputs to a packed batch.

    Args:
        pixel_values: :math:`(B, L_{max}, p \\cdot p \\cdot C)` patches, valid ones first.
        pixel_attention_mask: :math:`(B, L_{max})`, 1 (or True) for valid patches.
        spatial_shapes: :math:`(B, 2)` patch grid ``(h, w)`` of each image.

    Returns:
        ``(patches [sum(h*w), p*p*C], grid_thw [B, 3])``.

    Raises:
        ValueError: the mask does not mark exactly the first ``h * w`` patches of each image as valid.

    Example:
        >>> values = torch.rand(2, 6, 12)
        >>> mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
        >>> patches, grid_thw = padded_to_packed(values, mask, torch.tensor([[2, 3], [1, 2]]))
        >>> patches.shape, grid_thw.tolist()
        (torch.Size([8, 12]), [[1, 2, 3], [1, 1, 2]])
    """
    check_shape(pixel_values, ["B", "L", "P"], "pixel_values must have shape (B, L, patch_size**2 * C).")
    check_shape(pixel_attention_mask, ["B", "L"], "pixel_attention_mask must have shape (B, L).")
    check_shape(spatial_shapes, ["B", "2"], "spatial_shapes must have shape (B, 2) (rows, columns of patches).")
    check(
        pixel_values.shape[:2] == pixel_attention_mask.shape and spatial_shapes.shape[0] == pixel_values.shape[0],
        f"pixel_values {tuple(pixel_values.shape)}, pixel_attention_mask "
        f"{tuple(pixel_attention_mask.shape)} and spatial_shapes {tuple(spatial_shapes.shape)} disagree "
        "on the batch size or the padded length.",
    )
    grid_thw = torch.nn.functional.pad(spatial_shapes.long(), (1, 0), value=1)
    lengths = spatial_shapes.long().prod(-1)
    positions = torch.arange(pixel_values.shape[1], device=pixel_values.device)
    expected = positions[None, :] < lengths[:, None]
    if not torch.equal(pixel_attention_mask.bool(), expected):
        raise ValueError(
            "pixel_attention_mask must mark exactly the first h*w patches of each image as valid "
            f"(spatial_shapes {spatial_shapes.tolist()}, valid counts "
            f"{pixel_attention_mask.bool().sum(-1).tolist()})."
        )
    return pixel_values[expected], grid_thw


def packed_to_padded(
    tokens: torch.Tensor, seqlens: torch.Tensor, max_length: int | None = None, padding_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter a packed sequence into a padded batch.

    Args:
        tokens: :math:`(N, *)` packed tokens.
        seqlens: :math:`(n,)` length of each sequence, summing to ``N``.
        max_length: padded length; defaults to the longest sequence.
        padding_value: value written at padded positions.

    Returns:
        - padded :math:`(n, L, *)`.
        - mask :math:`(n, L)` bool, True at valid positions.

    Example:
        >>> padded, mask = packed_to_padded(torch.arange(5.0)[:, None], torch.tensor([3, 2]))
        >>> padded[..., 0].tolist(), mask.tolist()
        ([[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]], [[True, True, True], [True, True, False]])

    Raises:
        ValueCheckError: ``seqlens`` not a 1-D integer tensor of non-negative lengths summing to ``N`` (a float
            length such as ``2.5`` is refused, not truncated), or ``max_length`` shorter than a sequence.
    """
    check(
        isinstance(seqlens, torch.Tensor)
        and seqlens.ndim == 1
        and not seqlens.is_floating_point()
        and not seqlens.is_complex()
        and seqlens.dtype != torch.bool,
        lambda: (
            "seqlens must be a 1-D integer tensor of sequence lengths, got "
            f"{getattr(seqlens, 'dtype', type(seqlens).__name__)} {tuple(getattr(seqlens, 'shape', ()))}."
        ),
    )
    check(seqlens.numel() == 0 or int(seqlens.min()) >= 0, "seqlens must not be negative.")
    check(
        max_length is None or (isinstance(max_length, int) and not isinstance(max_length, bool)),
        lambda: f"max_length must be an integer or None, got {max_length!r}.",
    )
    check(
        int(seqlens.sum()) == tokens.shape[0],
        f"seqlens sum to {int(seqlens.sum())} but tokens has {tokens.shape[0]} rows.",
    )
    longest = int(seqlens.max()) if seqlens.numel() else 0
    max_length = longest if max_length is None else max_length
    check(max_length >= longest, f"max_length {max_length} is shorter than a sequence ({longest}).")
    positions = torch.arange(max_length, device=tokens.device)
    mask = positions[None, :] < seqlens.to(tokens.device)[:, None]
    padded = tokens.new_full((seqlens.shape[0], max_length, *tokens.shape[1:]), padding_value)
    padded = padded.masked_scatter(mask.reshape(*mask.shape, *([1] * (tokens.ndim - 1))), tokens)
    return padded, mask


@dataclass(frozen=True)
class BlockLayout:
    """Tensor-only description of a block-diagonal attention pattern, as padded blocks with a key mask.

    The graph-capture form of a :class:`VarlenLayout` (the ``"blocks"`` attention backend): the packed tokens
    of block ``b`` are scattered into row ``b`` of a padded :math:`(n_b, L)` array, attention runs per block with
    the padded keys masked out, and the outputs are gathered back. No Python number depends on the batch's
    composition, so one ``torch.compile(dynamic=True)`` graph or one exported graph serves every batch, with
    memory :math:`n_b L^2` per head (never the square of the total token count).

    Attributes:
        query_index: int64 :math:`(N_q,)` place of every packed query in the flattened :math:`(n_b L_q)` blocks.
        key_index: int64 :math:`(N_k,)` place of every packed key in the flattened :math:`(n_b L)` blocks.
        key_mask: bool :math:`(n_b, L)`, True at the keys present.
        query_length: padded query length :math:`L_q`; ``None`` for :math:`L` (self-attention).
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    key_mask: torch.Tensor
    query_length: int | None = None


def image_blocks(
    grid_thw: torch.Tensor, num_tokens: int, num_blocks: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where every patch of a packed batch sits, computed with tensor operations only (traceable, exportable).

    Args:
        grid_thw: :math:`(n, 3)` rows ``(t, h, w)``.
        num_tokens: :math:`N = \\sum t h w`.
        num_blocks: number of frames :math:`\\sum t` (attention blocks).
        max_length: padded block length :math:`L \\geq \\max h w`.

    Returns:
        - int64 :math:`(N,)` index of every patch in the flattened :math:`(n_b, L)` blocks,
        - bool :math:`(n_b, L)` mask of the positions holding a patch,
        - int64 :math:`(N, 4)` rows ``(h, w, row, column)``: the grid of every patch's frame and its place in it.

    Example:
        >>> index, mask, token_grid = image_blocks(torch.tensor([[1, 2, 3], [1, 1, 2]]), 8, 2, 6)
        >>> index.tolist(), mask.sum(-1).tolist(), token_grid[6].tolist()
        ([0, 1, 2, 3, 4, 5, 6, 7], [6, 2], [1, 2, 0, 0])
    """
    grid = grid_thw.long()
    frames, height, width = grid.unbind(-1)
    frame_length = height * width
    ends = (frames * frame_length).cumsum(0)
    positions = torch.arange(num_tokens, device=grid.device)
    # image of every patch: how many images end at or before it ([N, n] comparisons, no searchsorted op)
    image = (positions[:, None] >= ends[None, :]).sum(-1)
    offset = positions - (ends - frames * frame_length)[image]
    length = frame_length[image]
    frame = torch.div(offset, length, rounding_mode="floor")
    within = offset - frame * length
    columns = width[image]
    row = torch.div(within, columns, rounding_mode="floor")
    block = (frames.cumsum(0) - frames)[image] + frame
    token_index = block * max_length + within
    key_mask = torch.zeros(num_blocks * max_length, dtype=torch.bool, device=grid.device)
    key_mask = key_mask.index_put((token_index,), torch.ones_like(token_index, dtype=torch.bool))
    token_grid = torch.stack([height[image], columns, row, within - row * columns], -1)
    return token_index, key_mask.view(num_blocks, max_length), token_grid


@dataclass(frozen=True)
class VarlenLayout:
    """Which tokens of a packed sequence attend to which: one block per sequence, computed once per batch.

    Sequence ``i`` has ``seqlens_q[i]`` query tokens and ``seqlens_k[i]`` key tokens; its queries attend to its
    keys only (bidirectionally, or causally when ``causal[i]``). Every attention backend reads the same layout,
    so it is built once per forward (reading lengths on the host once) and shared by all layers.

    Attributes:
        cu_seqlens_q: int32 :math:`(n + 1,)` query boundaries.
        cu_seqlens_k: int32 :math:`(n + 1,)` key boundaries (after ``key_index``).
        seqlens_q: query length of each sequence (Python ints).
        seqlens_k: key length of each sequence (Python ints).
        causal: per sequence, whether query ``j`` sees only keys ``0 .. j`` of its block (top-left aligned,
            as ``scaled_dot_product_attention(is_causal=True)``).
        groups: ``(num_sequences, len_q, len_k, causal)`` per group of sequences sharing lengths and mask, in
            the order their tokens appear after ``gather_q`` / ``gather_k``.
        gather_q: :math:`(N_q,)` token order that makes each group contiguous, or ``None`` if the tokens are
            already in that order (no copy is made then).
        gather_k: the same for keys and values.
        scatter_q: inverse of ``gather_q`` (``None`` when ``gather_q`` is).
        key_index: :math:`(N_k,)` positions of the keys that take part, or ``None`` for all; keys left out
            (padding) are attended by nobody.
        causal_flags: optional bool :math:`(n,)` per-sequence causal flags on the device, overriding ``causal``
            without a host read (``torch.compile`` of a decoder whose mask is data); only the ``"dense"``
            backend reads them, so :func:`~kornia_siglip2.attention.varlen_attention` uses it then.
        blocks: optional :class:`BlockLayout`, the same pattern as tensors only; under ``torch.compile`` /
            ``torch.export`` the ``"auto"`` backend runs it (one graph for every batch composition).

    A layout traced with a symbolic number of sequences (:meth:`uniform` under ``torch.compile(dynamic=True)``
    or ``torch.export``) has empty ``seqlens_q`` / ``seqlens_k`` / ``causal``; its ``groups`` and boundaries
    describe it.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    causal: tuple[bool, ...]
    groups: tuple[tuple[int, int, int, bool], ...]
    gather_q: torch.Tensor | None
    gather_k: torch.Tensor | None
    scatter_q: torch.Tensor | None
    key_index: torch.Tensor | None = None
    causal_flags: torch.Tensor | None = None
    blocks: BlockLayout | None = None

    @property
    def num_sequences(self) -> int:
        """Number of sequences (read from the boundaries' shape: symbolic under tracing)."""
        return self.cu_seqlens_q.shape[0] - 1

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
        """Total number of key tokens taking part (``len(key_index)`` when keys are selected)."""
        return sum(self.seqlens_k)

    @classmethod
    def from_seqlens(
        cls,
        seqlens_q: Sequence[int],
        seqlens_k: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        *,
        causal: bool | Sequence[bool] = False,
    ) -> VarlenLayout:
        """Build the layout from per-sequence lengths.

        Args:
            seqlens_q: query length of each sequence.
            seqlens_k: key length of each sequence; defaults to ``seqlens_q`` (self-attention).
            device: device of the index tensors.
            causal: one flag for all sequences or one per sequence.

        Raises:
            ValueCheckError: lengths are not positive, or the query and key layouts disagree.

        Example:
            >>> layout = VarlenLayout.from_seqlens([4, 9, 4])
            >>> layout.groups, layout.gather_q is None
            (((2, 4, 4, False), (1, 9, 9, False)), False)
            >>> VarlenLayout.from_seqlens([16, 16, 16]).groups
            ((3, 16, 16, False),)
        """
        seqlens_q = tuple(int(length) for length in seqlens_q)
        seqlens_k = seqlens_q if seqlens_k is None else tuple(int(length) for length in seqlens_k)
        flags = (bool(causal),) * len(seqlens_q) if isinstance(causal, bool) else tuple(bool(c) for c in causal)
        check(
            len(seqlens_q) == len(seqlens_k) == len(flags),
            lambda: (
                f"Query, key and causal layouts have {len(seqlens_q)}, {len(seqlens_k)} and {len(flags)} "
                "sequences; they must match."
            ),
        )
        check(
            all(length > 0 for length in seqlens_q + seqlens_k),
            lambda: f"Sequence lengths must be positive, got q={seqlens_q}, k={seqlens_k}.",
        )
        for name, lengths in (("query", seqlens_q), ("key", seqlens_k)):
            total = sum(lengths)
            check(
                total < 2**31,
                lambda total=total, name=name: (
                    f"The batch has {total} {name} tokens, more than int32 cu_seqlens can index (2**31 - 1); "
                    "split it into smaller batches (or fewer / smaller images)."
                ),
            )
        members: dict[tuple[int, int, bool], list[int]] = {}
        for index, key in enumerate(zip(seqlens_q, seqlens_k, flags, strict=True)):
            members.setdefault(key, []).append(index)
        order = [index for indices in members.values() for index in indices]
        groups = tuple((len(indices), *key) for key, indices in members.items())
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
            causal=flags,
            groups=groups,  # type: ignore[arg-type]
            gather_q=gather_q,
            gather_k=gather_k,
            scatter_q=scatter_q,
        )

    @classmethod
    def uniform(
        cls,
        batch: int,
        length: int,
        key_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> VarlenLayout:
        """``batch`` sequences of ``length`` queries and ``key_length`` keys (default ``length``), from sizes only.

        With Python ints this is :meth:`from_seqlens`; with symbolic sizes (``torch.compile(dynamic=True)``,
        ``torch.export``) it is a layout that names no per-sequence number, so the traced graph holds for any
        batch size.

        Example:
            >>> VarlenLayout.uniform(3, 4).groups
            ((3, 4, 4, False),)
        """
        key_length = length if key_length is None else key_length
        if all(type(size) is int for size in (batch, length, key_length)):
            return cls.from_seqlens([length] * batch, [key_length] * batch, device=device)
        steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
        return cls(
            cu_seqlens_q=steps * length,
            cu_seqlens_k=steps * key_length,
            seqlens_q=(),
            seqlens_k=(),
            causal=(),
            groups=((batch, length, key_length, False),),
            gather_q=None,
            gather_k=None,
            scatter_q=None,
        )

    @classmethod
    def from_blocks(cls, blocks: BlockLayout, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> VarlenLayout:
        """A layout described by its tensors only (built inside a traced graph; see :class:`BlockLayout`)."""
        return cls(
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqlens_q=(),
            seqlens_k=(),
            causal=(),
            groups=(),
            gather_q=None,
            gather_k=None,
            scatter_q=None,
            blocks=blocks,
        )

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor | None = None,
        *,
        causal: bool | Sequence[bool] = False,
    ) -> VarlenLayout:
        """Build the layout from flash-attention style boundaries (reads them on the host once).

        Raises:
            ValueCheckError: the boundaries are not a 1-D integer tensor starting at 0 and increasing strictly.
        """
        check_cu_seqlens(cu_seqlens_q, "cu_seqlens")
        seqlens_q = torch.diff(cu_seqlens_q).tolist()
        seqlens_k = None
        if cu_seqlens_k is not None:
            check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
            seqlens_k = torch.diff(cu_seqlens_k).tolist()
        return cls.from_seqlens(seqlens_q, seqlens_k, device=cu_seqlens_q.device, causal=causal)

    @classmethod
    def from_key_padding_mask(cls, key_padding_mask: torch.Tensor) -> VarlenLayout:
        """Layout of a padded batch :math:`(B, L)` flattened to :math:`B L` tokens, keys limited by a mask.

        Every one of the ``B`` sequences keeps its ``L`` queries (padded positions too, as transformers
        computes them) and attends only to its keys where ``key_padding_mask`` is True.

        Args:
            key_padding_mask: bool or 0/1 :math:`(B, L)`, True for keys that may be attended.

        Raises:
            ValueCheckError: a row has no key to attend to.

        Example:
            >>> layout = VarlenLayout.from_key_padding_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]))
            >>> layout.seqlens_q, layout.seqlens_k, layout.key_index.tolist()
            ((3, 3), (2, 3), [0, 1, 3, 4, 5])
        """
        check_shape(key_padding_mask, ["B", "L"], "key_padding_mask must have shape (B, L).")
        mask = key_padding_mask.bool()
        if torch.compiler.is_compiling():  # no host read: the mask itself is the layout (a row with no key gives NaN)
            batch, length = mask.shape
            index = torch.arange(batch * length, device=mask.device)
            bounds = torch.arange(batch + 1, device=mask.device, dtype=torch.int32) * length
            return cls.from_blocks(BlockLayout(index, index, mask), bounds, bounds)
        counts = mask.sum(-1).tolist()
        check(all(count > 0 for count in counts), lambda: f"attention_mask rows must keep a token, got {counts}.")
        batch, length = mask.shape
        layout = cls.from_seqlens([length] * batch, counts, device=mask.device)
        return dataclasses.replace(layout, key_index=mask.flatten().nonzero().flatten())


@dataclass(frozen=True)
class ImageLayout:
    """Host-side layouts of a packed image batch: per-frame self-attention and per-frame MAP pooling.

    Attributes:
        grids: ``(t, h, w)`` per image as Python ints (the full grids, also when tokens are dropped).
        attention: self-attention layout, one block per frame: its ``h * w`` tokens, or its kept ones.
        pooling: MAP-head layout, one probe query per frame attending to that frame's tokens.
        position_index: with dropped tokens, int64 :math:`(N,)` place of every kept token in the full grids
            (index into the frames' ``h * w`` position tables laid end to end); ``None`` when every patch is
            present.
        token_grid: int64 :math:`(N, 4)` rows ``(h, w, row, column)`` of every patch (see :func:`image_blocks`),
            with which the NaFlex position embeddings are computed inside a traced graph; ``None`` for
            :meth:`uniform` layouts and with dropped tokens.

    The attention and pooling layouts of a packed batch carry their :class:`BlockLayout` too, so that a batch
    built outside a ``torch.compile`` region runs in it with no host read and no per-composition graph.

    Example:
        >>> layout = ImageLayout.from_grid_thw(torch.tensor([[1, 2, 3], [2, 1, 4]]))
        >>> layout.attention.seqlens_q, layout.pooling.seqlens_q, layout.num_tokens
        ((6, 4, 4), (1, 1, 1), 14)
        >>> keep_mask = torch.tensor([1, 0, 1, 1, 0, 0] + [1, 1, 0, 1] + [0, 0, 0, 1]).bool()
        >>> dropped = ImageLayout.from_grid_thw(torch.tensor([[1, 2, 3], [2, 1, 4]]), keep_mask=keep_mask)
        >>> dropped.attention.seqlens_q, dropped.position_index.tolist()
        ((3, 3, 1), [0, 2, 3, 6, 7, 9, 13])
    """

    grids: tuple[tuple[int, int, int], ...]
    attention: VarlenLayout
    pooling: VarlenLayout
    position_index: torch.Tensor | None = None
    token_grid: torch.Tensor | None = None

    @classmethod
    def uniform(cls, batch: int, height: int, width: int, device: torch.device | str | None = None) -> ImageLayout:
        """``batch`` images of one ``height x width`` grid, from sizes only (no tensor is read).

        With a symbolic ``batch`` (tracing) the batch is described as one grid of ``batch`` frames, which has
        the same attention blocks, pooled rows and position embeddings.

        Example:
            >>> layout = ImageLayout.uniform(2, 2, 3)
            >>> layout.grids, layout.attention.groups, layout.pooling.groups
            (((1, 2, 3), (1, 2, 3)), ((2, 6, 6, False),), ((2, 1, 6, False),))
        """
        length = height * width
        grids = ((1, height, width),) * batch if type(batch) is int else ((batch, height, width),)
        return cls(
            grids=grids,
            attention=VarlenLayout.uniform(batch, length, device=device),
            pooling=VarlenLayout.uniform(batch, 1, length, device=device),
        )

    @classmethod
    def from_tensors(cls, grid_thw: torch.Tensor, num_tokens: int, num_blocks: int, max_length: int) -> ImageLayout:
        """The layout of a packed batch computed with tensor operations only (inside a traced or exported graph).

        Args:
            grid_thw: :math:`(n, 3)` rows ``(t, h, w)``.
            num_tokens: :math:`N = \\sum t h w` (e.g. ``patches.shape[0]``).
            num_blocks: :math:`\\sum t` (``grid_thw.shape[0]`` for images).
            max_length: padded block length, at least the largest ``h * w``.

        Example:
            >>> layout = ImageLayout.from_tensors(torch.tensor([[1, 2, 3], [1, 1, 2]]), 8, 2, 6)
            >>> layout.attention.blocks.key_mask.sum(-1).tolist(), layout.pooling.cu_seqlens_k.tolist()
            ([6, 2], [0, 6, 8])
        """
        token_index, key_mask, token_grid = image_blocks(grid_thw, num_tokens, num_blocks, max_length)
        cu_seqlens = torch.nn.functional.pad(key_mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
        frames = torch.arange(num_blocks + 1, device=grid_thw.device, dtype=torch.int32)
        probe_index = torch.arange(num_blocks, device=grid_thw.device)
        return cls(
            grids=(),
            attention=VarlenLayout.from_blocks(BlockLayout(token_index, token_index, key_mask), cu_seqlens, cu_seqlens),
            pooling=VarlenLayout.from_blocks(BlockLayout(probe_index, token_index, key_mask, 1), frames, cu_seqlens),
            token_grid=token_grid,
        )

    @classmethod
    def from_grid_thw(
        cls,
        grid_thw: torch.Tensor | Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        keep_mask: torch.Tensor | None = None,
    ) -> ImageLayout:
        """Read ``grid_thw`` :math:`(n, 3)` (and ``keep_mask``) once and derive both attention layouts.

        Args:
            grid_thw: :math:`(n, 3)` rows ``(t, h, w)``.
            device: device of the index tensors (default: that of ``grid_thw``).
            keep_mask: optional bool :math:`(\\sum t h w,)`, True at the patches present (token dropping);
                every frame must keep at least one.

        Raises:
            ValueCheckError: ``grid_thw`` is not an :math:`(n, 3)` grid of positive integers (a list of floats
                such as ``[[1, 2.7, 3]]`` included), describes no image, or more tokens than int32
                ``cu_seqlens`` can index; ``keep_mask`` has the wrong length or keeps no patch of a frame.
            TypeCheckError: ``keep_mask`` is not a bool tensor.
        """
        if not isinstance(grid_thw, torch.Tensor):  # a list: the same checks as a tensor (no silent int())
            try:
                grid_thw = torch.tensor(grid_thw)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueCheckError(
                    f"grid_thw must be an (n, 3) grid of integers (t, h, w), got {grid_thw!r} ({error})."
                ) from error
        else:
            device = grid_thw.device if device is None else device
        check_grid_thw(grid_thw)
        check(
            grid_thw.shape[0] > 0,
            "grid_thw describes no image (shape (0, 3)); pass at least one image.",
        )
        position_index = None
        if keep_mask is not None:
            check_keep_mask(keep_mask, grid_thw)
        grid_thw = grid_thw.tolist()
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw)
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        if keep_mask is not None:
            # kept tokens per frame: differences of the running count at the frame boundaries (one host read)
            running = torch.nn.functional.pad(keep_mask.long().cumsum(0), (1, 0))
            boundaries = torch.tensor(_cumsum(seqlens), device=keep_mask.device)
            kept = torch.diff(running[boundaries]).tolist()
            empty = [frame for frame, count in enumerate(kept) if count == 0]
            check(
                not empty,
                lambda: f"keep_mask keeps no patch of frame(s) {empty}: keep at least one patch of every frame.",
            )
            seqlens = kept
            position_index = keep_mask.nonzero().flatten().to(device)
        attention = VarlenLayout.from_seqlens(seqlens, device=device)
        pooling = VarlenLayout.from_seqlens([1] * len(seqlens), seqlens, device=device)
        token_grid = None
        if keep_mask is None:  # the tensor form of the same layout, for a compiled tower
            token_index, key_mask, token_grid = _host_blocks(grids, device)
            frames = torch.arange(len(seqlens), device=device)
            attention = dataclasses.replace(attention, blocks=BlockLayout(token_index, token_index, key_mask))
            pooling = dataclasses.replace(pooling, blocks=BlockLayout(frames, token_index, key_mask, 1))
        return cls(
            grids=grids,
            attention=attention,
            pooling=pooling,
            position_index=position_index,
            token_grid=token_grid,
        )

    @property
    def num_tokens(self) -> int:
        """Total number of patches."""
        return self.attention.num_tokens_q

    @property
    def num_frames(self) -> int:
        """Total number of frames (attention blocks, pooled vectors)."""
        return len(self.attention.seqlens_q)


@dataclass(frozen=True)
class PackedImages:
    """A packed image batch, the model's native input: ``patches`` plus ``grid_thw``.

    The preprocessors return it and every image-taking API accepts it (the model, its towers, the losses,
    the zero-shot classifier and the logit lens). Its host-side :attr:`layout` is computed when the batch is
    built (outside any ``torch.compile`` region), so reading ``grid_thw`` from the device happens once per batch
    however often it is used, and a compiled tower reads no host value.

    With token dropping (NaViT), ``keep_mask`` marks which patches of the full grids are present: ``patches``
    holds only those (in grid order), ``grid_thw`` still gives the full grids, so that each kept patch gets the
    position embedding of its place.

    Attributes:
        patches: :math:`(N, p \\cdot p \\cdot C)` flattened patches, image after image.
        grid_thw: :math:`(n, 3)` integer rows ``(t, h, w)`` with :math:`\\sum t h w = N` (without ``keep_mask``).
        keep_mask: optional bool :math:`(\\sum t h w,)`, True at the :math:`N` patches present; every frame
            keeps at least one. ``None``: every patch is present.

    Example:
        >>> packed = PackedImages.from_images(torch.rand(2, 3, 8, 12), patch_size=4)
        >>> packed.patches.shape, packed.grid_thw.tolist(), packed.layout.num_frames
        (torch.Size([12, 48]), [[1, 2, 3], [1, 2, 3]], 2)
        >>> patches, grid_thw = packed  # unpacks like a (patches, grid_thw) pair
        >>> keep_mask = torch.tensor([True, False] * 6)
        >>> dropped = PackedImages(packed.patches[keep_mask], packed.grid_thw, keep_mask)
        >>> dropped.layout.attention.seqlens_q
        (3, 3)
    """

    patches: torch.Tensor
    grid_thw: torch.Tensor
    keep_mask: torch.Tensor | None = None
    prebuilt_layout: ImageLayout | None = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        check_type(isinstance(self.patches, torch.Tensor), "PackedImages.patches must be a tensor (N, p*p*C).")
        check(self.patches.ndim == 2, lambda: f"patches must be (N, p*p*C), got {tuple(self.patches.shape)}.")
        if self.keep_mask is None:
            check_grid_thw(self.grid_thw, self.patches.shape[0])
        else:
            check_keep_mask(self.keep_mask, self.grid_thw, self.patches.shape[0])
        if self.prebuilt_layout is None and not torch.compiler.is_compiling():
            # once per batch, here on the host: a compiled tower then reads tensors and Python ints only
            layout = ImageLayout.from_grid_thw(self.grid_thw, self.patches.device, self.keep_mask)
            object.__setattr__(self, "prebuilt_layout", layout)

    def __iter__(self):
        return iter((self.patches, self.grid_thw))

    @property
    def layout(self) -> ImageLayout:
        """Attention and pooling layouts, read from ``grid_thw`` once when the batch was built.

        A batch built inside a ``torch.compile`` region from a ``grid_thw`` tensor has none yet: it is read here,
        on every access (a graph break there; ``fullgraph=True`` refuses it: build the batch outside).
        """
        if self.prebuilt_layout is None:
            return ImageLayout.from_grid_thw(self.grid_thw, self.patches.device, self.keep_mask)
        return self.prebuilt_layout

    @property
    def num_images(self) -> int:
        """Number of grid rows :math:`n`."""
        return self.grid_thw.shape[0]

    def to(self, *args, **kwargs) -> PackedImages:
        """Move or cast ``patches`` (as ``Tensor.to``); ``grid_thw`` and ``keep_mask`` follow the device only."""
        patches = self.patches.to(*args, **kwargs)
        if patches.device == self.patches.device:  # same device: the layout holds as it is
            return PackedImages(patches, self.grid_thw, self.keep_mask, prebuilt_layout=self.prebuilt_layout)
        keep_mask = None if self.keep_mask is None else self.keep_mask.to(patches.device)
        return PackedImages(patches, self.grid_thw.to(patches.device), keep_mask)

    @classmethod
    def from_images(cls, images: torch.Tensor, patch_size: int, drop_remainder: bool = False) -> PackedImages:
        """Pack a :math:`(B, C, H, W)` batch of equal-size images (see :func:`patchify`).

        The layout comes from the image size alone (:meth:`ImageLayout.uniform`): no tensor is read, also
        inside ``torch.compile`` with a dynamic batch size.
        """
        patches, grid_thw = patchify(images, patch_size, drop_remainder)
        batch, height, width = images.shape[0], images.shape[-2] // patch_size, images.shape[-1] // patch_size
        layout = ImageLayout.uniform(batch, height, width, images.device)
        return cls(patches, grid_thw, prebuilt_layout=layout)

    @classmethod
    def from_padded(
        cls, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> PackedImages:
        """Pack transformers' padded NaFlex inputs (see :func:`padded_to_packed`)."""
        return cls(*padded_to_packed(pixel_values, pixel_attention_mask, spatial_shapes))


def check_cu_seqlens(cu_seqlens: torch.Tensor, name: str = "cu_seqlens", num_tokens: int | None = None) -> None:
    """Check flash-attention style boundaries: 1-D integers from 0, strictly increasing, ending at ``num_tokens``.

    Raises:
        TypeCheckError: not a tensor, or not an integer tensor.
        ValueCheckError: wrong shape, not starting at 0, not increasing strictly, or a wrong total.
    """
    check_type(
        isinstance(cu_seqlens, torch.Tensor),
        lambda: (
            f"{name} must be a 1-D integer tensor (n + 1,) of boundaries, got {type(cu_seqlens).__name__}: "
            "wrap it with torch.tensor(..., dtype=torch.int32)."
        ),
    )
    check_type(
        not cu_seqlens.dtype.is_floating_point and not cu_seqlens.dtype.is_complex and cu_seqlens.dtype != torch.bool,
        lambda: f"{name} must hold integers, got dtype {cu_seqlens.dtype}.",
    )
    check(
        cu_seqlens.ndim == 1 and cu_seqlens.numel() >= 2,
        lambda: f"{name} must be a 1-D tensor (n + 1,) of boundaries with n >= 1, got shape {tuple(cu_seqlens.shape)}.",
    )
    values = cu_seqlens.tolist()
    check(
        values[0] == 0 and all(b > a for a, b in itertools.pairwise(values)),
        lambda: f"{name} must start at 0 and increase strictly, got {values}.",
    )
    check(
        num_tokens is None or values[-1] == num_tokens,
        lambda: f"{name} ends at {values[-1]} but there are {num_tokens} tokens.",
    )


def _host_blocks(
    grids: Sequence[tuple[int, int, int]], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`image_blocks` from grids already on the host, in numpy (tens of microseconds, not milliseconds)."""
    heights = np.array([h for t, h, w in grids for _ in range(t)], dtype=np.int64)
    widths = np.array([w for t, h, w in grids for _ in range(t)], dtype=np.int64)
    lengths = heights * widths
    max_length = int(lengths.max())
    block = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = widths[block]
    token_grid = np.stack([heights[block], columns, within // columns, within % columns], -1)
    key_mask = np.arange(max_length)[None, :] < lengths[:, None]
    return tuple(torch.from_numpy(array).to(device) for array in (block * max_length + within, key_mask, token_grid))


def _cumsum(lengths: Sequence[int]) -> list[int]:
    boundaries = [0]
    for length in lengths:
        boundaries.append(boundaries[-1] + length)
    return boundaries


def _gather_index(order: list[int], boundaries: list[int], device: torch.device | str | None) -> torch.Tensor:
    ranges = [torch.arange(boundaries[index], boundaries[index + 1]) for index in order]
    return torch.cat(ranges).to(device)


def pack_inputs(
    pixel_values: torch.Tensor | PackedImages | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    *,
    patches: torch.Tensor | None = None,
    grid_thw: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    patch_size: int,
    drop_remainder: bool = False,
) -> PackedImages:
    """Bring any image input convention to one :class:`PackedImages`: the one place that rule is checked.

    Exactly one of these is given:

    - ``pixel_values`` :math:`(B, C, H, W)` images (fixed resolution; each image one grid),
    - ``pixel_values`` :math:`(B, L, p \\cdot p \\cdot C)` padded NaFlex patches with ``spatial_shapes``
      :math:`(B, 2)` (and ``pixel_attention_mask`` :math:`(B, L)`, derived from the shapes when absent),
    - ``pixel_values`` as a :class:`PackedImages`,
    - ``patches`` :math:`(N, p \\cdot p \\cdot C)` with ``grid_thw`` :math:`(n, 3)` (and ``keep_mask`` when
      tokens are dropped).

    Args:
        pixel_values: images, padded patches or a packed batch.
        pixel_attention_mask: valid-patch mask of padded input.
        spatial_shapes: patch grid ``(h, w)`` of each padded image.
        patches: packed patches.
        grid_thw: grid of each packed image.
        keep_mask: bool :math:`(\\sum t h w,)`, True at the patches present in ``patches`` (token dropping; see
            :class:`PackedImages`); packed patches only.
        patch_size: patch side :math:`p`, to cut 4-D images.
        drop_remainder: 4-D images whose sides ``p`` does not divide lose their last ``H % p`` rows and
            ``W % p`` columns (the Conv2d patch embedding of fixed-resolution checkpoints); ``False`` (NaFlex)
            rejects them. See :func:`patchify`.

    Returns:
        the packed batch.

    Raises:
        ValueCheckError: no input, two conventions at once, an input of the wrong rank, a padded input
            without ``spatial_shapes``, or ``keep_mask`` without packed patches.
        TypeCheckError: raw integer (e.g. ``uint8``) pixel values: preprocess them first.

    Example:
        >>> pack_inputs(torch.rand(2, 3, 8, 8), patch_size=4).grid_thw.tolist()
        [[1, 2, 2], [1, 2, 2]]
        >>> pack_inputs(patches=torch.rand(6, 48), grid_thw=torch.tensor([[1, 2, 3]]), patch_size=4).num_images
        1
    """
    if patches is not None or grid_thw is not None:
        check(
            patches is not None and grid_thw is not None,
            "Pass either images or patches with grid_thw: the packed path needs both patches and grid_thw.",
        )
        check(pixel_values is None, "Pass either images (pixel_values) or patches + grid_thw, not both.")
        return PackedImages(patches, grid_thw, keep_mask)
    check(
        keep_mask is None,
        "keep_mask (token dropping) goes with packed patches + grid_thw only (or a PackedImages that holds it).",
    )
    check(
        pixel_values is not None,
        "pixel_values is required. Pass either images (pixel_values) or patches (N, p*p*C) with grid_thw (n, 3).",
    )
    if isinstance(pixel_values, PackedImages):
        return pixel_values
    check_type(
        isinstance(pixel_values, torch.Tensor) and pixel_values.dtype.is_floating_point,
        lambda: (
            "pixel_values must be a floating tensor of preprocessed (normalized) images, got "
            f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}: run the image processor first."
        ),
    )
    if pixel_values.ndim == 4:
        return PackedImages.from_images(pixel_values, patch_size, drop_remainder)
    check(
        pixel_values.ndim == 3,
        lambda: (
            "pixel_values must be images (B, C, H, W) or padded NaFlex patches (B, L, p*p*C), "
            f"got shape {tuple(pixel_values.shape)}."
        ),
    )
    check(spatial_shapes is not None, "Padded NaFlex pixel_values (B, L, p*p*C) need spatial_shapes (B, 2).")
    if pixel_attention_mask is None:
        lengths = spatial_shapes.long().prod(-1)
        positions = torch.arange(pixel_values.shape[1], device=pixel_values.device)
        pixel_attention_mask = positions[None] < lengths[:, None].to(positions.device)
    return PackedImages.from_padded(pixel_values, pixel_attention_mask, spatial_shapes)


def packed_layout(
    pixel_values: torch.Tensor | PackedImages | None = None,
    grid_thw: torch.Tensor | ImageLayout | None = None,
    *,
    patches: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    patch_size: int,
    drop_remainder: bool = False,
) -> tuple[torch.Tensor, ImageLayout, str]:
    """A tower's input, in any convention, as packed patches, their layout and the convention it came in.

    The conventions of :func:`pack_inputs`, plus packed patches given as the first argument (``pixel_values``
    :math:`(N, p \\cdot p \\cdot C)` with ``grid_thw``) and a prebuilt :class:`ImageLayout` as ``grid_thw``
    (with packed patches only: it saves the host read of ``grid_thw`` and lets ``torch.compile`` trace the
    whole forward).

    Args:
        pixel_values: images, padded patches, packed patches or a packed batch.
        grid_thw: :math:`(n, 3)` grid of packed patches, or their prebuilt :class:`ImageLayout`.
        patches: packed patches (instead of ``pixel_values``).
        pixel_attention_mask: valid-patch mask of padded input.
        spatial_shapes: patch grid ``(h, w)`` of each padded image.
        keep_mask: kept patches of the full grids (token dropping), packed patches only.
        patch_size: patch side :math:`p`, to cut 4-D images.
        drop_remainder: as :func:`pack_inputs`.

    Returns:
        ``(patches, layout, convention)``: :math:`(N, p \\cdot p \\cdot C)` patches, their
        :class:`ImageLayout`, and ``"packed"``, ``"images"`` (4-D input) or ``"padded"`` (padded NaFlex input),
        the layout the caller's output should come back in.

    Raises:
        ValueCheckError: as :func:`pack_inputs`; an :class:`ImageLayout` with unpacked input or beside ``keep_mask``.
        TypeCheckError: as :func:`pack_inputs`.

    Example:
        >>> patches, layout, convention = packed_layout(torch.rand(2, 3, 8, 12), patch_size=4)
        >>> patches.shape, layout.attention.seqlens_q, convention
        (torch.Size([12, 48]), (6, 6), 'images')
    """
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 2 and patches is None:
        patches, pixel_values = pixel_values, None  # packed patches as the first argument
    if isinstance(grid_thw, ImageLayout):
        check(pixel_values is None and patches is not None, "An ImageLayout goes with patches only.")
        check(
            keep_mask is None,
            "keep_mask goes into the ImageLayout (ImageLayout.from_grid_thw(grid_thw, keep_mask=...)), not beside it.",
        )
        return patches, grid_thw, "packed"
    packed = pack_inputs(
        pixel_values,
        pixel_attention_mask,
        spatial_shapes,
        patches=patches,
        grid_thw=grid_thw,
        keep_mask=keep_mask,
        patch_size=patch_size,
        drop_remainder=drop_remainder,
    )
    if patches is not None or isinstance(pixel_values, PackedImages):
        convention = "packed"
    else:
        convention = "images" if pixel_values.ndim == 4 else "padded"
    return packed.patches, packed.layout, convention
