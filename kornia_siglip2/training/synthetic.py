"""Generated image-text data for tests, docs and smoke runs: coloured rectangles of many sizes and shapes.

:func:`photo_like_sizes` draws image sizes from a mix like a web image-text corpus (short side 200-1024
pixels, aspect ratios from 1:3 to 3:1, mostly near 4:3); :func:`write_synthetic_dataset` writes PNG files
and a JSONL manifest that :func:`~kornia_siglip2.training.data.read_manifest` reads, with the rectangle's box
and name as a LocCa region.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["COLORS", "photo_like_sizes", "write_synthetic_dataset"]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}


def photo_like_sizes(count: int, seed: int = 0, min_side: int = 200, max_side: int = 1024) -> list[tuple[int, int]]:
    """``count`` ``(height, width)`` sizes: log-uniform short side, log-normal aspect ratio clipped to [1/3, 3].

    Example:
        >>> sizes = photo_like_sizes(100, seed=0)
        >>> len(sizes), all(200 <= min(size) <= 1024 for size in sizes)
        (100, True)
    """
    generator = torch.Generator().manual_seed(seed)
    short = torch.exp(
        torch.empty(count).uniform_(0, 1, generator=generator) * torch.log(torch.tensor(max_side / min_side))
    )
    short = (short * min_side).round().clamp(min_side, max_side)
    aspect = torch.exp(torch.randn(count, generator=generator) * 0.35).clamp(1 / 3, 3)
    sizes = []
    for side, ratio in zip(short.tolist(), aspect.tolist(), strict=True):
        long = round(side * max(ratio, 1 / ratio))
        sizes.append((int(side), long) if ratio >= 1 else (long, int(side)))
    return sizes


def write_synthetic_dataset(
    folder: str | Path, count: int, seed: int = 0, min_side: int = 24, max_side: int = 96
) -> Path:
    """Write ``count`` PNG images (a coloured rectangle on a coloured background) and ``manifest.jsonl``.

    Args:
        folder: output folder (created).
        count: number of images.
        seed: seed of sizes, colours and positions.
        min_side: smallest short side in pixels.
        max_side: largest short side in pixels.

    Returns:
        the manifest path; each line holds ``image``, ``caption``, ``width``, ``height`` and ``regions``: the
        rectangle's normalized box with the text ``"a <colour> rectangle"``, and the background's with
        ``"a <colour> background"`` (the whole image).
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    lines = []
    for index, (height, width) in enumerate(photo_like_sizes(count, seed, min_side, max_side)):
        fg, bg = torch.randperm(len(names), generator=generator)[:2].tolist()
        image = torch.tensor(COLORS[names[bg]], dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
        top, left = (torch.rand(2, generator=generator) * 0.5).tolist()
        rows = slice(int(top * height), int((top + 0.5) * height))
        cols = slice(int(left * width), int((left + 0.5) * width))
        image[:, rows, cols] = torch.tensor(COLORS[names[fg]], dtype=torch.uint8).view(3, 1, 1)
        name = f"{index:06d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
        caption = f"a {names[fg]} rectangle on a {names[bg]} background"
        box = [
            cols.start / width,
            rows.start / height,
            min(cols.stop, width) / width,
            min(rows.stop, height) / height,
        ]
        regions = [
            {"box": [round(value, 6) for value in box], "text": f"a {names[fg]} rectangle"},
            {"box": [0.0, 0.0, 1.0, 1.0], "text": f"a {names[bg]} background"},
        ]
        record = {"image": name, "caption": caption, "width": width, "height": height, "regions": regions}
        lines.append(json.dumps(record))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
