"""Draw the documentation figures from real package calls (``make docs`` runs it; about 5 s on a CPU).

- ``_static/packing.png``: three images of different sizes -> their patch grids -> one packed token
  sequence -> the block-diagonal attention pattern, drawn from the ``cu_seqlens`` that
  :func:`kornia_siglip2.grid_thw_to_cu_seqlens` returns for the ``grid_thw`` of
  :func:`kornia_siglip2.patchify`.
- ``_static/naflex_resize.png``: generated images of five aspect ratios, resized by
  :class:`kornia_siglip2.preprocess.NaFlexImagePreprocessor` (sizes from :func:`naflex_target_size`) and shown
  from their packed patches with :func:`kornia_siglip2.unpatchify`.

The output is deterministic (fixed images, no timestamps in the PNG metadata), so re-running it leaves the
committed PNGs unchanged. Usage: ``python docs/make_figures.py [--out docs/_static]``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from kornia_siglip2 import grid_thw_to_cu_seqlens, patchify, unpatchify
from kornia_siglip2.preprocess import NaFlexImagePreprocessor, naflex_target_size

OUT = Path(__file__).resolve().parent / "_static"
COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
# PNG metadata without the matplotlib version or a date: the same input gives the same bytes
PNG_METADATA = {"Software": None}


def scene(height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth synthetic RGB image in :math:`[0, 1]` with a disc, so a resize is visible. :math:`(3, H, W)`."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    phase = seed * 1.3
    red = 0.5 + 0.4 * torch.sin(6 * x + phase) * torch.cos(4 * y)
    green = 0.5 + 0.4 * torch.cos(5 * y + phase)
    blue = 0.5 + 0.4 * torch.sin(3 * (x + y) + phase)
    image = torch.stack(torch.broadcast_tensors(red, green, blue)).clone()
    radius = 0.3 * min(height, width)
    disc = (torch.arange(height)[:, None] - height / 2) ** 2 + (torch.arange(width)[None, :] - width / 2) ** 2
    image[:, disc <= radius**2] = torch.tensor([0.95, 0.9, 0.2])[:, None]
    return image.clamp(0, 1)


def _show(ax: plt.Axes, image: torch.Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_lines(ax: plt.Axes, height: int, width: int, patch_size: int, colour: str, linewidth: float = 0.8) -> None:
    # segments, not axhline/axvline: the lines stop at the image border when the axes are larger
    for row in range(0, height + 1, patch_size):
        ax.plot([-0.5, width - 0.5], [row - 0.5, row - 0.5], color=colour, linewidth=linewidth)
    for col in range(0, width + 1, patch_size):
        ax.plot([col - 0.5, col - 0.5], [-0.5, height - 0.5], color=colour, linewidth=linewidth)


def packing_figure(path: Path) -> None:
    """Images -> patch grids -> packed tokens -> block-diagonal mask, from a real ``cu_seqlens``."""
    patch_size = 8
    sizes = [(24, 32), (40, 16), (16, 48)]  # (H, W): grids 3x4, 5x2, 2x6
    images = [scene(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    packed = [patchify(image[None], patch_size) for image in images]
    patches = torch.cat([item[0] for item in packed])
    grid_thw = torch.cat([item[1] for item in packed])
    cu_seqlens = grid_thw_to_cu_seqlens(grid_thw)
    bounds = cu_seqlens.tolist()
    num_tokens = patches.shape[0]
    # the attention pattern varlen_attention computes: token i sees token j iff both lie in one block
    block_of = torch.searchsorted(cu_seqlens[1:], torch.arange(num_tokens), right=True)
    mask = (block_of[:, None] == block_of[None, :]).numpy()

    figure = plt.figure(figsize=(11, 6.4))
    grid = figure.add_gridspec(3, 3, width_ratios=[1, 1, 1], height_ratios=[1.1, 0.35, 2.2], hspace=0.45)
    for index, (image, (height, width)) in enumerate(zip(images, sizes, strict=True)):
        ax = figure.add_subplot(grid[0, index])
        _show(ax, image)
        _grid_lines(ax, height, width, patch_size, "white", linewidth=1.2)
        for spine in ax.spines.values():
            spine.set_color(COLOURS[index])
            spine.set_linewidth(3)
        t, h, w = grid_thw[index].tolist()
        ax.set_title(f"image {index}: {height}x{width} px\ngrid_thw = ({t}, {h}, {w}), {h * w} tokens", fontsize=9)

    strip = figure.add_subplot(grid[1, :])
    strip.imshow(block_of[None].numpy(), cmap=ListedColormap(COLOURS[: len(sizes)]), aspect="auto")
    for start, end in itertools.pairwise(bounds):
        strip.text((start + end - 1) / 2, 0, f"{end - start}", ha="center", va="center", color="white", fontsize=8)
    for token in range(1, num_tokens):
        strip.axvline(token - 0.5, color="white", linewidth=0.6)
    strip.set_yticks([])
    strip.set_xticks([bound - 0.5 for bound in bounds], [str(bound) for bound in bounds], fontsize=8)
    strip.set_title(
        f"packed patches [{num_tokens}, p*p*C = {patches.shape[1]}]; cu_seqlens = {bounds} (grid_thw_to_cu_seqlens)",
        fontsize=9,
    )

    ax = figure.add_subplot(grid[2, 1])
    colour_index = np.where(mask, block_of.numpy()[:, None] + 1, 0)
    ax.imshow(colour_index, cmap=ListedColormap(["#f2f2f2", *COLOURS[: len(sizes)]]), interpolation="nearest")
    for bound in bounds[1:-1]:
        ax.axhline(bound - 0.5, color="grey", linewidth=0.5)
        ax.axvline(bound - 0.5, color="grey", linewidth=0.5)
    ax.set_xticks([bound - 0.5 for bound in bounds], [str(bound) for bound in bounds], fontsize=7)
    ax.set_yticks([bound - 0.5 for bound in bounds], [str(bound) for bound in bounds], fontsize=7)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    ax.set_title("block-diagonal attention: a token sees its own image only", fontsize=9)
    note = figure.add_subplot(grid[2, 2])
    note.axis("off")
    note.text(
        0.0,
        0.5,
        f"{int(mask.sum())} of {num_tokens**2} pairs attend\n"
        f"({100 * mask.mean():.0f} %); no padding token exists.\n\n"
        "The default CPU backend never builds\nthis mask: it groups blocks of equal\n"
        "length into batched SDPA calls.",
        fontsize=9,
        va="center",
    )
    figure.savefig(path, dpi=110, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(figure)


def naflex_figure(path: Path) -> None:
    """Generated images of several aspect ratios, resized to the largest grid within the patch budget."""
    patch_size, budget = 16, 256
    sizes = [(480, 640), (224, 224), (1000, 100), (300, 900), (640, 360)]
    images = [scene(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    preprocess = NaFlexImagePreprocessor(patch_size=patch_size, max_num_patches=budget)
    packed = preprocess(images)
    resized = [frames[0] * 0.5 + 0.5 for frames in unpatchify(packed.patches, packed.grid_thw, patch_size)]

    figure, axes = plt.subplots(2, len(sizes), figsize=(14, 6.6), gridspec_kw={"wspace": 0.25, "hspace": 0.35})
    longest = max(max(size) for size in sizes)
    for column, ((height, width), image, out, grid) in enumerate(
        zip(sizes, images, resized, packed.grid_thw.tolist(), strict=True)
    ):
        target = naflex_target_size(height, width, patch_size, budget)
        assert tuple(out.shape[-2:]) == target  # the figure shows what the preprocessor returned
        _, h, w = grid
        top, bottom = axes[0, column], axes[1, column]
        _show(top, image)
        top.set_xlim(-0.5, longest - 0.5)
        top.set_ylim(longest - 0.5, -0.5)
        top.set_title(f"input {height}x{width}\naspect {width / height:.2f}", fontsize=9)
        _show(bottom, out.clamp(0, 1))
        _grid_lines(bottom, target[0], target[1], patch_size, "white", linewidth=0.4)
        side = max(target)
        bottom.set_xlim(-0.5, side - 0.5)
        bottom.set_ylim(side - 0.5, -0.5)
        bottom.set_title(
            f"resized {target[0]}x{target[1]}, aspect {target[1] / target[0]:.2f}\ngrid {h}x{w} = {h * w} patches",
            fontsize=9,
        )
    axes[0, 0].set_ylabel("input, one scale for all", fontsize=9)
    axes[1, 0].set_ylabel("NaFlex output", fontsize=9)
    figure.suptitle(
        "NaFlexImagePreprocessor: the largest patch grid with h*w <= 256 that keeps the aspect ratio "
        f"(patch {patch_size}); {packed.patches.shape[0]} tokens packed, 0 padded",
        fontsize=10,
    )
    figure.savefig(path, dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Write both figures into ``--out``."""
    parser = argparse.ArgumentParser(description="Draw the documentation figures.")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: docs/_static)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    packing_figure(args.out / "packing.png")
    naflex_figure(args.out / "naflex_resize.png")
    for name in ("packing.png", "naflex_resize.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
