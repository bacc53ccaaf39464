"""Reading images: files, bytes, PIL images, numpy arrays and tensors to one :math:`(3, H, W)` tensor.

The one decoder of the package: inference (:class:`~kornia_siglip2.zero_shot.ZeroShotClassifier`, the CLI),
the ``embed`` pipeline and training (:class:`~kornia_siglip2.training.data.ImageTextDataset`) all read pixels
here, so a model is trained on the pixels it is used on. Files and PIL images are read as the image is seen:

- the EXIF orientation is applied (as transformers' ``load_image``);
- transparency (an alpha channel, ``LA``, a palette or ``tRNS`` colour key) is composited on white (as
  transformers' ``convert_to_rgb``, which its SigLIP processors run on PIL input);
- CMYK, grey and palette images are converted to RGB; an animation is read at its first frame;
- 16-bit grey images (PIL modes ``I;16`` / ``I``) are clipped to 255, as Pillow and transformers do, with a
  ``UserWarning`` naming the file and saying how to scale it to 8 bits.

Pillow is imported on first use only: ``import kornia_siglip2`` does not load it.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "DRAFT_OVERSAMPLING",
    "ImageSource",
    "image_size",
    "image_tensor",
    "load_image",
    "load_image_reduced",
]

# One image: a path, encoded bytes, a :math:`(C, H, W)` tensor (float in :math:`[0, 1]` or uint8), a PIL image,
# or a numpy array (:math:`(H, W, 3)` / :math:`(3, H, W)` / :math:`(H, W)`, uint8 or float in :math:`[0, 1]`).
ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | torch.Tensor | PILImage | np.ndarray"

#: :func:`load_image_reduced` decodes at least this many times the target size before the exact resize
DRAFT_OVERSAMPLING = 2

# PIL modes holding more than 8 bits per sample: converting them to RGB clips every value above 255
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: height and width swap


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("Reading image files needs pillow: pip install pillow.") from error
    return Image


def _open(source: str | os.PathLike[str] | bytes) -> tuple[Any, str]:
    """Open a file or encoded bytes with PIL (lazily: the header only); ``(image, name for messages)``."""
    pil_image = _pillow()
    from PIL import UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        name = f"<{len(source)} bytes>"
        stream: Any = io.BytesIO(source)
    else:
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"No image file at {name}.")
        stream = source
    try:
        return pil_image.open(stream), name
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read image {name}: {error}") from error


def _to_rgb_tensor(image: Any, name: str) -> torch.Tensor:
    """A loaded, upright PIL image as uint8 :math:`(3, H, W)`: transparency on white, any mode to RGB."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        warnings.warn(
            f"{name} is a high-bit-depth image (PIL mode {image.mode}): converting it to RGB clips every value "
            "above 255 (as Pillow and transformers do). Scale it to 8 bits first, e.g. "
            "Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) for 16-bit data.",
            UserWarning,
            stacklevel=4,
        )
    if image.mode != "RGB" or image.info.get("transparency") is not None:
        pil_image = _pillow()
        # transformers' convert_to_rgb: transparent pixels (alpha or a tRNS colour key) become white, not black
        rgba = image.convert("RGBA")
        image = pil_image.alpha_composite(pil_image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def load_image(source: str | os.PathLike[str] | bytes | PILImage) -> torch.Tensor:
    """Read an image file, encoded bytes or a PIL image to an RGB uint8 tensor :math:`(3, H, W)`.

    Applies the EXIF orientation to files and PIL images alike (as transformers' ``load_image``), and
    composites transparent images on white (as transformers' ``convert_to_rgb``). Deliberate difference:
    transformers' ``load_image(path)`` drops the alpha channel (``convert("RGB")`` keeps whatever colour the
    transparent pixels hold, often black), so ``processor(path)`` and ``processor(Image.open(path))`` disagree
    there; we composite on white for both, as the image is seen. To reproduce transformers' path behaviour,
    pass ``Image.open(path).convert("RGB")``. transformers' processors also leave the EXIF orientation of a PIL
    image passed to them directly unapplied (only ``load_image`` applies it); we apply it. See the module
    docstring for CMYK, palette, 16-bit and animated files.

    Args:
        source: image file path, encoded file bytes, or a ``PIL.Image.Image``.

    Returns:
        uint8 :math:`(3, H, W)`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image PIL can read (the message names the file).
        ImportError: pillow is not installed.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "grey.png"
        >>> Image.new("L", (5, 3), 128).save(path)
        >>> image = load_image(path)
        >>> image.shape, image.dtype, image.unique().tolist()
        (torch.Size([3, 3, 5]), torch.uint8, [128])
    """
    from PIL import ImageOps, UnidentifiedImageError

    if _is_pil(source):
        return _to_rgb_tensor(ImageOps.exif_transpose(source), "image")  # a copy without an orientation tag
    opened, name = _open(source)
    try:
        with opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read image {name}: {error}") from error
    return _to_rgb_tensor(image, name)


def load_image_reduced(
    source: str | os.PathLike[str] | bytes,
    target_size: Callable[[int, int], tuple[int, int] | None],
    oversampling: int = DRAFT_OVERSAMPLING,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`load_image`, but a JPEG is decoded at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8).

    ``target_size(height, width)`` gives the size the image will be resized to next. libjpeg decodes the
    largest reduction whose size is at least ``oversampling`` times that in both sides (``PIL.Image.draft``),
    which skips most of the inverse DCT and shrinks the input of the resize. Not pixel-exact: the reduced
    decode is a box-like filter in the DCT domain, so after the final resize pixels differ from the full
    decode's (``tests/test_embed_cli.py`` measures it). Other files than plain RGB JPEGs without EXIF rotation,
    and images ``target_size`` returns ``None`` for, are decoded in full by :func:`load_image`.

    Args:
        source: image file path or encoded bytes.
        target_size: ``(height, width) -> (height, width)`` of the resize that follows, or ``None``.
        oversampling: the reduced decode keeps at least this many times the target size.

    Returns:
        ``(pixels, (height, width) of the full image)``: uint8 :math:`(3, h, w)` and the size the target size
        must be computed from (the reduced one would round to another NaFlex grid).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image PIL can read.
    """
    opened, name = _open(source)
    with opened:
        width, height = opened.size
        if opened.format == "JPEG" and opened.mode == "RGB" and opened.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            target = target_size(height, width)
            if target is not None:
                opened.draft("RGB", (oversampling * target[1], oversampling * target[0]))
                return _to_rgb_tensor(opened, name), (height, width)
    pixels = load_image(source)
    return pixels, tuple(pixels.shape[-2:])


def image_size(source: str | os.PathLike[str] | bytes) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`load_image` returns it (EXIF orientation applied).

    Reads the header only.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image PIL can read.
    """
    opened, _ = _open(source)
    with opened:
        width, height = opened.size
        if opened.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
            return width, height
        return height, width


def image_tensor(image: Any, name: str = "image") -> torch.Tensor:
    """One image of any supported kind as a :math:`(3, H, W)` tensor (uint8, or float as given).

    - path, encoded bytes or PIL image: :func:`load_image` (EXIF orientation applied, transparency on white;
      16-bit grey images warn);
    - numpy array: :math:`(H, W, C)` or :math:`(C, H, W)` with :math:`C \\in \\{1, 3\\}` (channels inferred as
      transformers' ``infer_channel_dimension_format`` does: channels first when both ends could be channels), or
      :math:`(H, W)` grey; uint8, or float in :math:`[0, 1]`;
    - tensor: :math:`(3, H, W)` or :math:`(1, H, W)` / :math:`(H, W)` grey (repeated to 3 channels, as
      transformers' ``convert_to_rgb`` does).

    Args:
        image: the image.
        name: how the image is named in error messages (``images[2]``).

    Returns:
        :math:`(3, H, W)` tensor.

    Raises:
        ValueError: an unsupported shape, channel count or dtype (the message says what to pass).
        TypeError: an object that is not an image.

    Example:
        >>> image_tensor(np.zeros((4, 6, 3), dtype=np.uint8)).shape  # HWC, as transformers takes numpy images
        torch.Size([3, 4, 6])
        >>> image_tensor(torch.rand(1, 4, 6)).shape  # grey
        torch.Size([3, 4, 6])
    """
    if isinstance(image, torch.Tensor):
        return _tensor_image(image, name)
    if isinstance(image, np.ndarray):
        return _numpy_image(image, name)
    if _is_pil(image):
        from PIL import ImageOps

        return _to_rgb_tensor(ImageOps.exif_transpose(image), name)
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return load_image(image)
    raise TypeError(
        f"{name} must be a path, a PIL image, a numpy array or a (3, H, W) tensor (or encoded file bytes), "
        f"got {type(image).__name__}."
    )


def _tensor_image(image: torch.Tensor, name: str) -> torch.Tensor:
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if image.ndim == 3 and image.shape[0] == 3:
        return image
    if image.ndim == 3 and image.shape[-1] in (1, 3):
        raise ValueError(
            f"{name} is a tensor of shape {tuple(image.shape)}: tensors are channels first (3, H, W); for an "
            "(H, W, 3) tensor pass image.permute(2, 0, 1)."
        )
    if image.ndim == 3 and 4 in (image.shape[0], image.shape[-1]):
        raise ValueError(
            f"{name} has 4 channels (shape {tuple(image.shape)}): drop or composite the alpha channel first "
            "(image[:3]), or pass the file / PIL image, which is converted to RGB."
        )
    raise ValueError(f"{name} must be a (3, H, W) tensor, got shape {tuple(image.shape)}.")


def _numpy_image(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
    else:
        raise ValueError(
            f"{name} is a numpy array of dtype {array.dtype}: pass uint8 (0-255) or float in [0, 1] "
            "(for 16-bit data: (array / 65535).astype(np.float32))."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be an (H, W, 3) numpy array, got shape {array.shape}.")
    # transformers' infer_channel_dimension_format: channels first when the first axis could be channels
    if array.shape[0] in (1, 3):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif array.shape[-1] in (1, 3):
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif 4 in (array.shape[0], array.shape[-1]):
        raise ValueError(
            f"{name} has 4 channels (shape {array.shape}): drop or composite the alpha channel first "
            "(array[..., :3]), or pass a PIL image, which is converted to RGB."
        )
    else:
        raise ValueError(f"{name} must be an (H, W, 3) numpy array, got shape {array.shape}.")
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _is_pil(image: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(image, pil.Image)
