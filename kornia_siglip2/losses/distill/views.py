"""What the student sees: random local crops (SILC) and random patch masks (TIPS), both seeded."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import kornia.augmentation as K
import torch
from torch import nn

from kornia_siglip2.errors import check, check_shape

__all__ = [
    "GLOBAL_CROP_SCALE",
    "LOCAL_CROP_SCALE",
    "LocalViews",
    "global_view_augmentation",
    "local_view_size",
    "random_patch_mask",
]

#: Area fraction of the global view (DINO ``global_crops_scale``, used by SILC).
GLOBAL_CROP_SCALE = (0.4, 1.0)
#: Area fraction of the local views (DINO ``local_crops_scale``, used by SILC).
LOCAL_CROP_SCALE = (0.05, 0.4)
# DINO's aspect-ratio range (torchvision RandomResizedCrop) and local/global side ratio (96 / 224 pixels).
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOCAL_TO_GLOBAL_SIDE = 96.0 / 224.0


def local_view_size(global_size: int, patch_size: int) -> int:
    """Side of the local views: DINO's 96/224 of the global side, rounded to whole patches (at least one).

    Example:
        >>> local_view_size(224, 16), local_view_size(256, 16), local_view_size(384, 14)
        (96, 112, 168)
    """
    return max(1, round(global_size * _LOCAL_TO_GLOBAL_SIDE / patch_size)) * patch_size


def global_view_augmentation(size: int, scale: tuple[float, float] = GLOBAL_CROP_SCALE) -> nn.Module:
    """The global-view augmentation of SILC: random resized crop of 40-100 % of the area, random flip.

    SILC computes the image-text loss on the global view too, so this crop belongs in the data pipeline,
    before both the sigmoid loss and :class:`~kornia_siglip2.losses.distill.SelfDistillationLoss`, which
    takes the batch it is given as the global view. Photometric jitter is left out: inputs arrive already
    normalized to the model's range.

    Args:
        size: output side in pixels (the model's image size).
        scale: range of the crop's area fraction.

    Returns:
        a Kornia module mapping :math:`(B, C, H, W)` to :math:`(B, C, size, size)`.

    Example:
        >>> augment = global_view_augmentation(16)
        >>> augment(torch.rand(2, 3, 20, 24)).shape
        torch.Size([2, 3, 16, 16])
    """
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=scale, ratio=_CROP_RATIO, align_corners=False),
        K.RandomHorizontalFlip(),
    )


class LocalViews(nn.Module):
    """``num_views`` random local crops of every image at one small resolution (SILC, DINO multi-crop).

    Each view is a Kornia random resized crop covering ``scale`` of the image area with aspect ratio in
    ``[3/4, 4/3]``, resized bilinearly to ``size x size`` (half-pixel grid, like ``F.interpolate``), then
    flipped horizontally with probability 0.5. Images of different sizes (a NaFlex batch) are cropped in
    groups of equal size; all views come out at the same size, so they pack into equal grids.

    Args:
        size: view side in pixels; make it a multiple of the patch size (see :func:`local_view_size`).
        num_views: views per image (SILC and SigLIP 2: 8).
        scale: range of the crop's area fraction (DINO / SILC: ``(0.05, 0.4)``).

    Example:
        >>> views = LocalViews(8, num_views=4)
        >>> generator = torch.Generator().manual_seed(0)
        >>> views([torch.rand(3, 16, 16), torch.rand(3, 12, 20)], generator=generator).shape
        torch.Size([8, 3, 8, 8])
    """

    def __init__(self, size: int, num_views: int = 8, scale: tuple[float, float] = LOCAL_CROP_SCALE) -> None:
        super().__init__()
        check(size > 0 and num_views > 0, f"size and num_views must be positive, got {size}, {num_views}.")
        self.size = size
        self.num_views = num_views
        self.augment = nn.Sequential(
            K.RandomResizedCrop((size, size), scale=scale, ratio=_CROP_RATIO, align_corners=False),
            K.RandomHorizontalFlip(),
        )

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Crop the local views.

        Args:
            images: :math:`(B, C, H, W)`, or a sequence of :math:`B` images :math:`(C, H_i, W_i)`.
            generator: CPU generator that seeds the crops; ``None`` uses the global RNG as Kornia does.

        Returns:
            :math:`(B \\cdot V, C, S, S)` views, image-major (the views of image 0 first).

        Raises:
            ValueCheckError: an image is not 3-D :math:`(C, H, W)` (kornia check).
        """
        if isinstance(images, torch.Tensor):
            check_shape(images, ["B", "C", "H", "W"])
            groups = [(list(range(images.shape[0])), images)]
        else:
            check(len(images) > 0, "images must not be empty.")
            by_size: dict[tuple[int, ...], list[int]] = {}
            for index, image in enumerate(images):
                check_shape(image, ["C", "H", "W"])
                by_size.setdefault(tuple(image.shape), []).append(index)
            groups = [(indices, torch.stack([images[i] for i in indices])) for indices in by_size.values()]
        with _seeded(generator):
            # [G, V, C, S, S] per group of equal-size images
            views = [torch.stack([self.augment(batch) for _ in range(self.num_views)], 1) for _, batch in groups]
        order = torch.tensor([index for indices, _ in groups for index in indices], device=views[0].device)
        views = torch.cat(views)[order.argsort()]
        return views.flatten(0, 1)


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Run Kornia's sampling (global CPU RNG) from a seed drawn from ``generator``, leaving the global RNG as is."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def random_patch_mask(
    seqlens: torch.Tensor | Sequence[int], mask_ratio: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask exactly ``floor(mask_ratio * n)`` uniformly random patches of every frame of ``n`` patches.

    TIPS / SigLIP 2 replace 50 % of the student's patches with the mask token. The count is exact per
    frame rather than Bernoulli, so every image of a packed batch contributes the same fraction: half for
    even ``n``, ``(n - 1) / 2`` for odd ``n`` (floor), none for a one-patch frame.

    Args:
        seqlens: :math:`(F,)` patch count of each frame, in packed order (see
            :func:`~kornia_siglip2.packing.grid_thw_to_seqlens`).
        mask_ratio: fraction of each frame's patches to mask, in ``[0, 1]``.
        generator: CPU generator for reproducible masks.

    Returns:
        bool :math:`(\\sum n,)` on the device of ``seqlens``, True where the patch is masked.

    Raises:
        ValueCheckError: ``mask_ratio`` outside ``[0, 1]`` or ``seqlens`` not 1-D (kornia check).

    Example:
        >>> mask = random_patch_mask(torch.tensor([4, 6, 3]), generator=torch.Generator().manual_seed(0))
        >>> [int(chunk.sum()) for chunk in mask.split([4, 6, 3])]
        [2, 3, 1]
    """
    check(0.0 <= mask_ratio <= 1.0, f"mask_ratio must be in [0, 1], got {mask_ratio}.")
    device = seqlens.device if isinstance(seqlens, torch.Tensor) else torch.device("cpu")
    lengths = torch.as_tensor(seqlens, dtype=torch.long).cpu()
    check_shape(lengths, ["F"])
    total = int(lengths.sum())
    frame = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    starts = lengths.cumsum(0) - lengths
    # rank of each patch within its frame under a random order: sort by score, then stably by frame
    order = torch.rand(total, generator=generator).argsort()
    order = order[frame[order].argsort(stable=True)]
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - starts[frame]
    num_masked = torch.tensor([math.floor(mask_ratio * n) for n in lengths.tolist()], dtype=torch.long)
    return (rank < num_masked[frame]).to(device)
