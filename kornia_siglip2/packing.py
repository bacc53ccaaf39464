"""Packed patch sequences: patchify images, describe them with ``grid_thw``, convert to and from padding.

A packed batch is ``patches [N, p*p*C]`` plus ``grid_thw [n, 3]``: row ``(t, h, w)`` is ``t`` frames of
``h x w`` patches, stored frame after frame, patches row-major, each patch flattened in ``(py, px, c)``
order (the order of transformers' ``Siglip2ImageProcessor``). Each frame is one attention block.
"""

from __future__ import annotations

import torch
from kornia.core.check import KORNIA_CHECK, KORNIA_CHECK_SHAPE

__all__ = [
    "check_grid_thw",
    "grid_thw_to_cu_seqlens",
    "grid_thw_to_seqlens",
    "packed_to_padded",
    "padded_to_packed",
    "patchify",
    "unpatchify",
]


def patchify(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch of images into one packed sequence of flattened patches.

    Args:
        images: images :math:`(B, C, H, W)` with ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: patch side :math:`p` in pixels.

    Returns:
        - patches :math:`(B \\cdot h \\cdot w, p \\cdot p \\cdot C)`, image after image, patches row-major,
          each patch in ``(py, px, c)`` order.
        - grid_thw :math:`(B, 3)` int64 rows ``(1, h, w)`` with ``h = H / p``, ``w = W / p``.

    Raises:
        ValueError: the image size is not divisible by ``patch_size``.

    Example:
        >>> patches, grid_thw = patchify(torch.rand(2, 3, 32, 48), patch_size=16)
        >>> patches.shape, grid_thw.tolist()
        (torch.Size([12, 768]), [[1, 2, 3], [1, 2, 3]])
    """
    KORNIA_CHECK_SHAPE(images, ["B", "C", "H", "W"])
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by patch_size {patch_size}: "
            "resize or crop the images first (the preprocessors do this)."
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    # [B, C, h, p, w, p] -> [B, h, w, p, p, C]
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch * grid_h * grid_w, -1)
    grid_thw = torch.tensor([[1, grid_h, grid_w]], device=images.device).expand(batch, 3).clone()
    return patches, grid_thw


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
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


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
    KORNIA_CHECK_SHAPE(pixel_values, ["B", "L", "P"])
    KORNIA_CHECK_SHAPE(pixel_attention_mask, ["B", "L"])
    KORNIA_CHECK_SHAPE(spatial_shapes, ["B", "2"])
    KORNIA_CHECK(
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
    """
    KORNIA_CHECK(
        int(seqlens.sum()) == tokens.shape[0],
        f"seqlens sum to {int(seqlens.sum())} but tokens has {tokens.shape[0]} rows.",
    )
    longest = int(seqlens.max()) if seqlens.numel() else 0
    max_length = longest if max_length is None else max_length
    KORNIA_CHECK(max_length >= longest, f"max_length {max_length} is shorter than a sequence ({longest}).")
    positions = torch.arange(max_length, device=tokens.device)
    mask = positions[None, :] < seqlens.to(tokens.device)[:, None]
    padded = tokens.new_full((seqlens.shape[0], max_length, *tokens.shape[1:]), padding_value)
    padded = padded.masked_scatter(mask.reshape(*mask.shape, *([1] * (tokens.ndim - 1))), tokens)
    return padded, mask
