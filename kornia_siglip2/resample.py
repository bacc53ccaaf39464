"""Pillow's uint8 resize, bit for bit, as tensor ops: what transformers' PIL image processors compute.

Pillow resizes 8-bit images in two separable 1-D passes with fixed-point weights (22 fractional bits) and
rounds to uint8 after each pass. A float resize (``F.interpolate(..., antialias=True)``) uses the same filters
but keeps full precision, which leaves it up to 1.1 uint8 levels away from Pillow for bicubic (and moved the
tiny test models' logits by up to 7.5e-3). :func:`pil_resize` replays Pillow's integer arithmetic exactly
(same coefficients, same rounding, the installed Pillow's pass order), so ``uint8`` images preprocessed here
equal transformers' ``SiglipImageProcessor`` / ``Siglip2ImageProcessor`` (PIL backend) output exactly.

The arithmetic is integer gathers, products and sums, so it runs on any device; it is not differentiable
(the input is ``uint8``). Float images take the differentiable ``F.interpolate`` path of the preprocessors.
Cost on 2 CPU threads (``benchmarks/test_bench_preprocess.py``, bicubic to 224x224): 2.9 ms from 480x640
(Pillow 1.9 ms), 86 ms from a 12-megapixel photo (Pillow 55 ms).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import math
from functools import lru_cache

import torch

from kornia_siglip2.errors import check, check_shape

__all__ = ["installed_pillow_version", "pil_resize", "pil_resize_coefficients", "pil_resizes_height_first"]

# Pillow's fixed point: 32-bit accumulator = 8 bits of pixel + 2 bits of overshoot headroom + 22 fractional bits.
_PRECISION_BITS = 32 - 8 - 2
# the newest Pillow whose pass order is known; assumed when Pillow is not installed
_NEWEST_KNOWN_PILLOW = (13, 0)


def _bilinear(x: float) -> float:
    """Pillow's triangle filter, support 1."""
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    """Pillow's cubic convolution filter with :math:`a = -0.5`, support 2, in Pillow's operation order."""
    x = -x if x < 0.0 else x
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@lru_cache(maxsize=512)
def pil_resize_coefficients(in_size: int, out_size: int, resample: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Pillow's fixed-point resampling weights for one axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc``).

    Every float operation is done in Python doubles in Pillow's order, so the integer weights are Pillow's.

    Args:
        in_size: input length along the axis.
        out_size: output length along the axis.
        resample: ``"bilinear"`` or ``"bicubic"``.

    Returns:
        ``(starts, weights, ksize)``: output pixel ``i`` is
        :math:`\\lfloor (2^{21} + \\sum_k x[s_i + k]\\, w_{i,k}) / 2^{22} \\rfloor` clipped to :math:`[0, 255]`,
        with ``starts[i]`` :math:`= s_i` and ``weights[i * ksize + k]`` :math:`= w_{i,k}` (zero past the
        input's end).

    Example:
        >>> starts, weights, ksize = pil_resize_coefficients(4, 2, "bilinear")
        >>> starts, weights, ksize
        ((0, 1), (1797559, 1797559, 599186, 0, 0, 599186, 1797559, 1797559, 0, 0), 5)
        >>> sum(weights[:ksize]) == 2**22  # each row sums to one (up to its rounding)
        True
    """
    check(resample in _FILTERS, f"resample must be 'bilinear' or 'bicubic', got {resample!r}.")
    check(in_size > 0 and out_size > 0, f"sizes must be positive, got {in_size} -> {out_size}.")
    filter_fn, filter_support = _FILTERS[resample]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_support * filter_scale
    ksize = math.ceil(support) * 2 + 1
    inverse_scale = 1.0 / filter_scale
    one = float(1 << _PRECISION_BITS)
    starts: list[int] = []
    weights: list[int] = []
    for index in range(out_size):
        center = (index + 0.5) * scale
        # C's (int) cast truncates toward zero, as int() does
        start = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - start
        row = [filter_fn((offset + start - center + 0.5) * inverse_scale) for offset in range(count)]
        total = 0.0
        for value in row:  # sequential sum, as in C (Python >= 3.12's sum() compensates)
            total += value
        if total != 0.0:
            row = [value / total for value in row]
        weights += [int(-0.5 + value * one) if value < 0 else int(0.5 + value * one) for value in row]
        weights += [0] * (ksize - count)
        starts.append(start)
    return tuple(starts), tuple(weights), ksize


def _resample_first_axis(images: torch.Tensor, out_size: int, resample: str) -> torch.Tensor:
    """One Pillow 1-D pass along the first axis of uint8 :math:`(L, ...)`, giving uint8 :math:`(L', ...)`.

    The axis is the leading one so that each filter tap gathers whole contiguous rows: ``ksize`` passes of
    ``index_select`` + ``addcmul_`` over an int32 accumulator, the products and sums of Pillow's ``int``
    arithmetic (Pillow's weights keep every partial sum within 32 bits).
    """
    # under torch.compile the (pure) computation is traced directly: dynamo does not trust lru_cache wrappers
    coefficients = pil_resize_coefficients.__wrapped__ if torch.compiler.is_compiling() else pil_resize_coefficients
    starts_list, weights_list, ksize = coefficients(images.shape[0], out_size, resample)
    device = images.device
    starts = torch.tensor(starts_list, device=device)
    weights = torch.tensor(weights_list, dtype=torch.int32, device=device).view(out_size, ksize)
    rows = images.reshape(images.shape[0], -1)
    accumulator = torch.full((out_size, rows.shape[1]), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=device)
    last = images.shape[0] - 1
    for tap in range(ksize):
        # taps past the input's end have weight 0 (Pillow stops at the edge), so clamping their index is harmless
        taps = rows.index_select(0, (starts + tap).clamp_(max=last))
        accumulator.addcmul_(taps, weights[:, tap, None])
    # Pillow's clip8: arithmetic shift by the fraction bits, then clip to [0, 255]
    resized = torch.div(accumulator, 1 << _PRECISION_BITS, rounding_mode="floor").clamp_(0, 255).to(torch.uint8)
    return resized.view(out_size, *images.shape[1:])


def installed_pillow_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed Pillow, read from its metadata (not imported); ``(13, 0)`` without one.

    Example:
        >>> installed_pillow_version() >= (9, 0)
        True
    """
    return _INSTALLED_PILLOW


def _read_installed_pillow_version() -> tuple[int, int]:
    try:
        version = importlib.metadata.version("pillow")
    except importlib.metadata.PackageNotFoundError:
        return _NEWEST_KNOWN_PILLOW
    return _parse_version(version)


def _parse_version(version: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(version, tuple):
        return version
    major, _, rest = version.partition(".")
    minor = "".join(itertools.takewhile(str.isdigit, rest)) or "0"
    check(major.isdigit(), f"pillow_version must look like '13.0', got {version!r}.")
    return int(major), int(minor)


# read once at import: a constant for torch.compile, and no metadata lookup per resize
_INSTALLED_PILLOW = _read_installed_pillow_version()


def pil_resizes_height_first(
    height: int,
    width: int,
    new_height: int,
    new_width: int,
    pillow_version: str | tuple[int, int] | None = None,
) -> bool:
    r"""Whether Pillow's ``Image.resize`` runs its height pass before its width pass.

    The order shows through the rounding and clipping to uint8 between the passes: on 0/255 edges the two orders
    differ by up to 31 levels with bicubic. It changed between Pillow releases:

    - before 12.2: always the width first;
    - 12.2 and 12.3: the height first for images over 100 times taller than wide whose height shrinks;
    - 13.0: the height first when it shrinks by more than twice the width's change,
      :math:`H' < H` and :math:`H - H' > 2 (W - W')`.

    Checked against Pillow 12.1.1, 12.3.0 and 13.0.0 on 447 resizes each (random shapes, tall strips and 87
    cases at the 13.0 boundary :math:`(H - H') - 2 (W - W') \in \{-1, 0, 1\}`); 13.0 on 4,110 more.

    Args:
        height: input height :math:`H`.
        width: input width :math:`W`.
        new_height: output height :math:`H'`.
        new_width: output width :math:`W'`.
        pillow_version: the Pillow release to reproduce, e.g. ``"12.1"``; default: the installed Pillow
            (:func:`installed_pillow_version`), which is what transformers' PIL processors run.

    Example:
        >>> pil_resizes_height_first(1000, 100, 224, 224, "13.0"), pil_resizes_height_first(480, 640, 224, 224, "13.0")
        (True, False)
        >>> pil_resizes_height_first(1000, 100, 224, 224, "12.1")
        False
    """
    version = installed_pillow_version() if pillow_version is None else _parse_version(pillow_version)
    if version >= (13, 0):
        return new_height < height and (height - new_height) > 2 * (width - new_width)
    if version >= (12, 2):
        return new_height < height and height > 100 * width
    return False


def pil_resize(
    images: torch.Tensor,
    size: tuple[int, int],
    resample: str = "bicubic",
    pillow_version: str | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize uint8 images exactly as Pillow's ``Image.resize(size, resample)`` does (``reducing_gap=None``).

    Two 1-D passes, each rounded to uint8, in Pillow's order (:func:`pil_resizes_height_first`); an axis
    whose size does not change is not resampled, and an unchanged image is returned as is.

    Args:
        images: uint8 :math:`(B, C, H, W)`; every channel is resized independently, as Pillow does for
            ``"L"``/``"RGB"`` images.
        size: output ``(H', W')``.
        resample: ``"bilinear"`` (PIL 2) or ``"bicubic"`` (PIL 3).
        pillow_version: the Pillow release whose pass order to reproduce (it changed in 12.2 and 13.0);
            default: the installed one.

    Returns:
        uint8 :math:`(B, C, H', W')`, identical to Pillow's output.

    Raises:
        ValueCheckError: a non-uint8 or non-4-D input, or a non-positive size.

    Example:
        >>> image = torch.tensor([[[[0, 255, 0, 255]]]], dtype=torch.uint8)
        >>> pil_resize(image, (1, 2), "bilinear").tolist()
        [[[[109, 146]]]]
        >>> pil_resize(image, (1, 3), "bicubic").tolist()
        [[[[78, 128, 177]]]]
    """
    check_shape(images, ["B", "C", "H", "W"], "images must be a (B, C, H, W) uint8 tensor.")
    check(images.dtype == torch.uint8, f"pil_resize takes uint8 images, got {images.dtype}.")
    check(len(size) == 2 and min(size) > 0, f"size must be a positive (height, width), got {tuple(size)!r}.")
    height, width = images.shape[-2:]
    new_height, new_width = int(size[0]), int(size[1])
    if (height, width) == (new_height, new_width):
        return images
    passes = [(3, new_width), (2, new_height)]  # (dim, size): width first unless Pillow's rule says height
    if pil_resizes_height_first(height, width, new_height, new_width, pillow_version):
        passes.reverse()
    work = images
    for dim, new_size in passes:
        if work.shape[dim] != new_size:
            work = _resample_first_axis(work.movedim(dim, 0).contiguous(), new_size, resample).movedim(0, dim)
    return work.contiguous()
