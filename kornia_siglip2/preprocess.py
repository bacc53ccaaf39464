"""Image preprocessing for SigLIP (fixed resolution) and SigLIP 2 NaFlex as differentiable tensor ops.

Both preprocessors take float images in :math:`[0, 1]` or ``uint8`` images as one :math:`(B, C, H, W)`
tensor or a list of :math:`(C, H, W)` tensors of different sizes, and reproduce transformers'
``SiglipImageProcessor`` / ``Siglip2ImageProcessor`` (``image_processing_siglip.py``, ``image_processing_siglip2.py``).
Float images outside :math:`[0, 1]` by more than rounding (:data:`UNIT_RANGE_TOLERANCE`, one uint8 level), or
holding NaN / inf, are an error that says how to pass 0-255 data (as ``uint8``), never a silent rescale or clamp:

- ``uint8`` images (decoded files) are resized with Pillow's own integer arithmetic
  (:func:`~kornia_siglip2.resample.pil_resize`), so the output equals transformers' PIL backend exactly
  (``tests/test_preprocess.py``: zero differing uint8 levels).
- float images are resized with ``torch.nn.functional.interpolate`` (PIL's filters, full precision), so
  gradients flow back to the pixels on any device. Against PIL this is within one uint8 level for bilinear
  (NaFlex) and 1.125 levels for bicubic: PIL rounds to uint8 after each of its two 1-D passes.

transformers 5 has two backends for each image processor, which differ by up to 2 uint8 levels: PIL
(``SiglipImageProcessorPil``, used when torchvision is not installed) and torchvision (``SiglipImageProcessor``,
used whenever torchvision imports). ``backend="pil"`` (the default) reproduces the first, ``backend="torchvision"``
the second exactly for ``uint8`` input: torchvision resizes ``uint8`` tensors on the CPU with
``F.interpolate(..., antialias=True)`` on ``uint8`` itself, then transformers normalizes with the mean and std
scaled by 255 (``tests/test_preprocess.py`` holds hashes of transformers' outputs; torchvision itself is never
imported). PIL images and numpy arrays are accepted beside tensors and read as transformers reads them.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.errors import check, check_shape, check_type
from kornia_siglip2.hub import download_file, read_json
from kornia_siglip2.packing import PackedImages, check_grid_thw, packed_to_padded, patchify
from kornia_siglip2.resample import pil_resize, pil_resizes_height_first

__all__ = [
    "RESIZE_BACKENDS",
    "PREPROCESSOR_CONFIG_NAME",
    "PROCESSOR_CONFIG_NAME",
    "NaFlexImagePreprocessor",
    "PackedImages",
    "PaddedImages",
    "SigLip2ImagePreprocessor",
    "SigLipImagePreprocessor",
    "naflex_target_size",
    "to_padded",
]

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
#: transformers 5's ``processor.save_pretrained`` file: the image processor's config under ``"image_processor"``
PROCESSOR_CONFIG_NAME = "processor_config.json"
#: ``backend=`` choices: transformers' PIL image processors, or its torchvision ones
RESIZE_BACKENDS = ("pil", "torchvision")

#: A :math:`(B, C, H, W)` batch, or one image or a list of images of any sizes: :math:`(C, H, W)` tensors, PIL
#: images, numpy arrays (:math:`(H, W, C)` or :math:`(C, H, W)`, as transformers' processors take them).
ImageInput = torch.Tensor | Any | Sequence[Any]

# ``resample`` of preprocessor_config.json is a PIL code; only these two have a PIL-equivalent torch op
# (interpolate with antialias=True is PIL's separable filter: triangle, and cubic with a = -0.5).
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_PIL_NAMES = {0: "NEAREST", 1: "LANCZOS", 4: "BOX", 5: "HAMMING"}

_Preprocessor = TypeVar("_Preprocessor", bound="SigLip2ImagePreprocessor")


class PaddedImages(NamedTuple):
    """transformers' NaFlex inputs: ``pixel_values``, ``pixel_attention_mask`` (int32) and ``spatial_shapes``."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    spatial_shapes: torch.Tensor


def naflex_target_size(height: int, width: int, patch_size: int = 16, max_num_patches: int = 256) -> tuple[int, int]:
    """Resized size of a NaFlex image: the largest patch grid within ``max_num_patches``, aspect ratio kept.

    Reproduces transformers' ``get_image_size_for_max_num_patches`` bit for bit (same binary search over
    the scale in :math:`[10^{-6}, 100]` down to an interval of :math:`10^{-5}`, same float operations).

    Args:
        height: input height :math:`H` in pixels.
        width: input width :math:`W` in pixels.
        patch_size: patch side :math:`p`.
        max_num_patches: patch budget :math:`N`.

    Returns:
        ``(H', W')``, multiples of ``patch_size`` of at least one patch, with :math:`(H'/p)(W'/p) \\le N`
        (for sides below :math:`10^6 p`, where the search's smallest scale still fits).

    Raises:
        ValueError: a non-positive size, patch size or budget.

    Example:
        >>> naflex_target_size(480, 640), naflex_target_size(224, 224), naflex_target_size(1000, 100)
        ((224, 288), (256, 256), (800, 80))
        >>> naflex_target_size(480, 640, max_num_patches=1024)
        (432, 576)
    """
    if min(height, width, patch_size, max_num_patches) < 1:
        raise ValueError(
            f"height, width, patch_size and max_num_patches must be positive, got height={height}, "
            f"width={width}, patch_size={patch_size}, max_num_patches={max_num_patches}."
        )
    eps = 1e-5  # transformers' default search tolerance

    def scaled(size: int, scale: float) -> int:
        # same operation order as transformers: ceil((size * scale) / p) * p, at least one patch
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    scale_min, scale_max = eps / 10, 100.0
    while (scale_max - scale_min) >= eps:
        scale = (scale_min + scale_max) / 2
        num_patches = (scaled(height, scale) / patch_size) * (scaled(width, scale) / patch_size)
        if num_patches <= max_num_patches:
            scale_min = scale
        else:
            scale_max = scale
    return scaled(height, scale_min), scaled(width, scale_min)


def to_padded(packed: PackedImages, max_num_patches: int) -> PaddedImages:
    """Pad packed NaFlex images to transformers' ``Siglip2ImageProcessor`` outputs.

    Args:
        packed: ``patches`` :math:`(N, p \\cdot p \\cdot C)` and ``grid_thw`` :math:`(n, 3)` with ``t = 1``.
        max_num_patches: padded length :math:`L`, at least the largest ``h * w``.

    Returns:
        - pixel_values :math:`(n, L, p \\cdot p \\cdot C)`, zeros after the valid patches.
        - pixel_attention_mask :math:`(n, L)` int32, 1 for valid patches.
        - spatial_shapes :math:`(n, 2)` int64 patch grids ``(h, w)``.

    Raises:
        ValueCheckError: a frame count ``t != 1`` or an image with more than ``max_num_patches`` patches.
        ValueError: ``grid_thw`` is malformed or does not describe ``N`` patches.

    Example:
        >>> packed = NaFlexImagePreprocessor(patch_size=4, max_num_patches=8)([torch.rand(3, 8, 8)])
        >>> padded = to_padded(packed, max_num_patches=8)
        >>> padded.pixel_values.shape, padded.pixel_attention_mask.tolist(), padded.spatial_shapes.tolist()
        (torch.Size([1, 8, 48]), [[1, 1, 1, 1, 0, 0, 0, 0]], [[2, 2]])
    """
    patches, grid_thw = packed
    check_shape(patches, ["N", "D"], "packed.patches must be (N, p*p*C).")
    check_grid_thw(grid_thw, patches.shape[0])
    check(
        bool((grid_thw[:, 0] == 1).all()),
        lambda: f"to_padded takes images, i.e. grid_thw rows (1, h, w), got {grid_thw.tolist()}.",
    )
    pixel_values, mask = packed_to_padded(patches, grid_thw[:, 1] * grid_thw[:, 2], max_length=max_num_patches)
    # int32 mask and int64 shapes: the dtypes transformers returns
    return PaddedImages(pixel_values, mask.to(torch.int32), grid_thw[:, 1:].to(torch.int64))


def _resample_mode(resample: str | int) -> str:
    if isinstance(resample, str) and resample.lower() in _PIL_RESAMPLE.values():
        return resample.lower()
    if isinstance(resample, int) and not isinstance(resample, bool) and resample in _PIL_RESAMPLE:
        return _PIL_RESAMPLE[resample]
    name = _PIL_NAMES.get(resample, "") if isinstance(resample, int) else ""
    raise ValueError(
        f"resample must be 'bilinear' (PIL 2) or 'bicubic' (PIL 3), got {resample!r} {name}".rstrip()
        + ": other PIL filters have no PIL-equivalent torch op."
    )


class SigLip2ImagePreprocessor(nn.Module):
    """Common base of the SigLIP image preprocessors: input checks, resize, normalize, ``from_pretrained``.

    Use :meth:`from_pretrained` to build the right preprocessor from a checkpoint's
    ``preprocessor_config.json``: ``SiglipImageProcessor`` gives :class:`SigLipImagePreprocessor`,
    ``Siglip2ImageProcessor`` gives :class:`NaFlexImagePreprocessor`.

    Args:
        resample: ``"bilinear"``/``"bicubic"`` or the PIL code (2/3) of ``preprocessor_config.json``.
        antialias: widen the filter when downscaling, as PIL does (torch's ``interpolate(antialias=True)``);
            ``False`` is torch's plain interpolation (its bicubic uses :math:`a = -0.75`, not PIL's -0.5).
        image_mean: per-channel mean :math:`C` subtracted after rescaling to :math:`[0, 1]`.
        image_std: per-channel std :math:`C`.
        pil_exact: resize ``uint8`` input with Pillow's integer arithmetic (bit-identical to transformers'
            PIL processors; needs ``antialias=True``). ``False`` converts it to float first and takes the
            float path. Float input always takes the differentiable float path.
        backend: which of transformers' image processors ``uint8`` input reproduces exactly: ``"pil"`` (the
            default; transformers' PIL backend, with ``pil_exact``) or ``"torchvision"`` (transformers 5's default
            where torchvision is installed: ``uint8`` resized by ``F.interpolate`` on ``uint8``, as torchvision
            does on the CPU). The two differ by up to 2 uint8 levels.
    """

    def __init__(
        self,
        resample: str | int,
        antialias: bool = True,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        pil_exact: bool = True,
        backend: str = "pil",
    ) -> None:
        super().__init__()
        if backend not in RESIZE_BACKENDS:
            raise ValueError(
                f"backend must be one of {RESIZE_BACKENDS} (transformers' image processors), got {backend!r}."
            )
        self.resample = _resample_mode(resample)
        self.antialias = antialias
        self.backend = backend
        # Pillow always antialiases; without antialias there is no Pillow result to match
        self.pil_exact = pil_exact and antialias and backend == "pil"
        if len(image_mean) == 0 or len(image_mean) != len(image_std):
            raise ValueError(f"image_mean and image_std need one value per channel, got {image_mean} and {image_std}.")
        # [C, 1, 1]; not persistent: they come from the config, not from a state dict
        self.register_buffer(
            "image_mean", torch.tensor(image_mean, dtype=torch.float32)[:, None, None], persistent=False
        )
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32)[:, None, None], persistent=False)

    def _repr_tail(self) -> str:
        if self.backend != "pil":
            return f", backend={self.backend!r}"
        return "" if self.pil_exact else ", pil_exact=False"

    @property
    def num_channels(self) -> int:
        """Image channels :math:`C` expected in the input."""
        return self.image_mean.shape[0]

    @classmethod
    def from_config(cls: type[_Preprocessor], config: dict[str, Any], **overrides: Any) -> _Preprocessor:
        """Build a preprocessor from a ``preprocessor_config.json`` dict.

        Args:
            config: the parsed JSON; ``image_processor_type`` picks the class.
            overrides: constructor arguments replacing the config's (e.g. ``max_num_patches=1024``).

        Returns:
            :class:`SigLipImagePreprocessor` or :class:`NaFlexImagePreprocessor`.

        Raises:
            ValueError: an unknown ``image_processor_type``, an unsupported setting, or a type that is
                not ``cls`` when called on a subclass.

        Example:
            >>> config = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 16}
            >>> SigLip2ImagePreprocessor.from_config(config, max_num_patches=1024)
            NaFlexImagePreprocessor(patch_size=16, max_num_patches=1024, resample='bilinear', antialias=True)
        """
        raw_type = config.get("image_processor_type")
        # "...Fast" (torchvision) and "...Pil" backends share one config
        kind = str(raw_type).removesuffix("Fast").removesuffix("Pil")
        if kind == "SiglipImageProcessor":
            target: type[SigLip2ImagePreprocessor] = SigLipImagePreprocessor
            size = config.get("size", {"height": 224, "width": 224})
            if not isinstance(size, dict) or "height" not in size or "width" not in size:
                raise ValueError(f"SiglipImageProcessor size must be {{'height': H, 'width': W}}, got {size!r}.")
            kwargs: dict[str, Any] = {"image_size": (size["height"], size["width"])}
            default_resample = 3  # SiglipImageProcessor's class default: bicubic
        elif kind == "Siglip2ImageProcessor":
            target = NaFlexImagePreprocessor
            kwargs = {
                "patch_size": config.get("patch_size", 16),
                "max_num_patches": config.get("max_num_patches", 256),
            }
            default_resample = 2  # Siglip2ImageProcessor's class default: bilinear
        else:
            raise ValueError(
                f"Unknown image_processor_type {raw_type!r}: expected 'SiglipImageProcessor' (fixed resolution) "
                "or 'Siglip2ImageProcessor' (NaFlex)."
            )
        if not issubclass(target, cls):
            raise ValueError(f"This config ({raw_type}) builds a {target.__name__}, not a {cls.__name__}.")
        _check_supported(config)
        mean = config.get("image_mean", (0.5, 0.5, 0.5))
        std = config.get("image_std", (0.5, 0.5, 0.5))
        if not config.get("do_normalize", True):
            mean, std = [0.0] * len(mean), [1.0] * len(std)
        kwargs.update(resample=config.get("resample", default_resample), image_mean=mean, image_std=std)
        kwargs.update(overrides)
        return target(**kwargs)  # type: ignore[return-value]

    @classmethod
    def from_pretrained(
        cls: type[_Preprocessor],
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> _Preprocessor:
        """Read ``preprocessor_config.json`` or ``processor_config.json`` from a folder, a JSON file or the hub.

        ``processor_config.json`` is what transformers 5's ``processor.save_pretrained`` writes (the image
        processor's config nested under ``"image_processor"``); it is read when there is no
        ``preprocessor_config.json``.

        Only JSON is read, never pickles. Hub ids go through :func:`kornia_siglip2.hub.download_file`, which
        honours ``local_files_only`` and ``HF_HUB_OFFLINE``.

        Args:
            name_or_path: local folder, path of the JSON file, or hub id such as
                ``"google/siglip2-base-patch16-naflex"``.
            revision: hub revision (branch, tag or commit).
            cache_dir: hub cache folder.
            local_files_only: never reach the network.
            overrides: constructor arguments replacing the config's.

        Returns:
            :class:`SigLipImagePreprocessor` or :class:`NaFlexImagePreprocessor`, see :meth:`from_config`.

        Raises:
            FileNotFoundError: neither file in the folder, cache or repository.
            ValueError: invalid JSON or a config :meth:`from_config` rejects.

        Example:
            >>> import json, tempfile
            >>> folder = tempfile.mkdtemp()
            >>> config = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}}
            >>> _ = (Path(folder) / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(config))
            >>> SigLip2ImagePreprocessor.from_pretrained(folder)
            SigLipImagePreprocessor(image_size=(384, 384), resample='bicubic', antialias=True)
        """
        check(
            str(name_or_path).strip() != "",
            "name_or_path is empty: pass a checkpoint folder (use '.' for the current directory), a JSON file "
            "or a hub id.",
        )
        path = Path(name_or_path)
        if path.is_dir():
            config_file = path / PREPROCESSOR_CONFIG_NAME
            if not config_file.is_file() and (path / PROCESSOR_CONFIG_NAME).is_file():
                config_file = path / PROCESSOR_CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(
                    f"{path} has no {PREPROCESSOR_CONFIG_NAME} or {PROCESSOR_CONFIG_NAME} (is it a model checkpoint?)."
                )
        elif path.is_file():
            config_file = path
        else:
            try:
                config_file = download_file(
                    str(name_or_path),
                    PREPROCESSOR_CONFIG_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            except FileNotFoundError:
                config_file = download_file(
                    str(name_or_path),
                    PROCESSOR_CONFIG_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
        config = read_json(config_file)
        if "image_processor_type" not in config and isinstance(config.get("image_processor"), dict):
            # transformers 5's processor.save_pretrained: one processor_config.json, the image processor nested
            config = config["image_processor"]
        return cls.from_config(config, **overrides)

    def _prepare(self, images: ImageInput) -> list[torch.Tensor]:
        """Check the input and return uint8 or float :math:`(B, C, H, W)` groups (one per distinct tensor)."""
        if _is_pil(images) or isinstance(images, np.ndarray):  # one image
            images = [images]
        if not isinstance(images, torch.Tensor) and isinstance(images, Sequence):
            images = [_tensor_image(image, f"images[{index}]") for index, image in enumerate(images)]
        if isinstance(images, torch.Tensor):
            check_shape(
                images,
                ["B", str(self.num_channels), "H", "W"],
                f"images must be a (B, {self.num_channels}, H, W) tensor or a list of "
                f"({self.num_channels}, H, W) tensors.",
            )
            check(images.shape[0] > 0, "images must hold at least one image, got an empty batch.")
            groups = [images]
        else:
            check(
                isinstance(images, Sequence) and len(images) > 0,
                "images must be a (B, C, H, W) tensor or a non-empty list of (C, H, W) tensors, "
                f"got {type(images).__name__}.",
            )
            groups = []
            for index, image in enumerate(images):
                check_type(isinstance(image, torch.Tensor), f"images[{index}] must be a tensor.")
                check_shape(
                    image,
                    [str(self.num_channels), "H", "W"],
                    f"images[{index}] must be a ({self.num_channels}, H, W) tensor.",
                )
                check(
                    image.dtype == images[0].dtype and image.device == images[0].device,
                    f"images[{index}] is {image.dtype} on {image.device} but images[0] is {images[0].dtype} on "
                    f"{images[0].device}: all images must share dtype and device.",
                )
                groups.append(image[None])
        first = groups[0]
        check(
            first.dtype == torch.uint8 or first.is_floating_point(),
            f"images must be uint8 or float in [0, 1], got {first.dtype}.",
        )
        check(
            all(group.shape[-1] > 0 and group.shape[-2] > 0 for group in groups),
            "images must have a positive height and width.",
        )
        if first.is_floating_point() and not torch.compiler.is_compiling():
            _check_unit_range(groups)
        return groups

    def _resize_normalize(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize :math:`(B, C, H, W)` to ``size`` like PIL, then normalize; float input keeps its dtype.

        uint8 input returns the module's float dtype (float32 by default), rescaled by 1/255 as transformers'
        ``rescale_factor``.
        """
        if images.dtype == torch.uint8:
            float_dtype = self.image_mean.dtype
            if self.backend == "torchvision":
                resized = _torchvision_resize(images, size, self.resample, self.antialias)
                # transformers fuses rescale and normalize: (x - 255 mean) / (255 std), in float32
                scale = 1.0 / (1 / 255)
                mean, std = self.image_mean.float() * scale, self.image_std.float() * scale
                return ((resized.to(torch.float32) - mean.to(resized.device)) / std.to(resized.device)).to(float_dtype)
            if self.pil_exact:
                return self._normalize(pil_resize(images, size, self.resample).to(float_dtype) / 255)
            images = images.to(float_dtype) / 255
        dtype = images.dtype
        # CPU antialiased interpolate has no half kernels; float32 is also what transformers computes in
        work = images.float() if dtype in (torch.float16, torch.bfloat16) else images
        height, width = work.shape[-2:]
        kwargs: dict[str, Any] = {"mode": self.resample, "align_corners": False, "antialias": self.antialias}
        if self.resample == "bilinear":
            if (height, width) != size:  # PIL returns an unchanged copy for the same size
                work = _interpolate(work, size, kwargs)
        else:
            # PIL runs one 1-D pass per axis and clips each to [0, 255]; the cubic's negative lobes overshoot,
            # so a single 2-D pass (or the other pass order) differs by up to ~30 levels on sharp edges.
            passes = [(height, size[1]), size]
            if pil_resizes_height_first(height, width, *size):
                passes = [(size[0], width), size]
            for pass_size in passes:
                if pass_size != tuple(work.shape[-2:]):
                    work = _interpolate(work, pass_size, kwargs).clamp(0, 1)
        return self._normalize(work).to(dtype)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per channel, in the dtype and on the device of ``images``."""
        return (images - self.image_mean.to(images)) / self.image_std.to(images)


class SigLipImagePreprocessor(SigLip2ImagePreprocessor):
    """Fixed-resolution preprocessing of SigLIP v1 and SigLIP 2 (``SiglipImageProcessor``).

    Resize to ``image_size`` (bicubic with antialias, as transformers' default), rescale to
    :math:`[0, 1]`, normalize with mean = std = 0.5 (transformers' ``SiglipImageProcessor``). No crop.

    Args:
        image_size: output side :math:`S`, or ``(height, width)``.
        resample: ``"bicubic"`` (PIL 3, the default) or ``"bilinear"`` (PIL 2).
        antialias: PIL-style antialiasing when downscaling.
        image_mean: per-channel mean.
        image_std: per-channel std.
        pil_exact: resize ``uint8`` input exactly as Pillow (transformers' PIL processors) does.
        backend: ``"pil"`` (default) or ``"torchvision"``: which transformers image processor ``uint8`` input
            equals exactly (see :class:`SigLip2ImagePreprocessor`).

    Returns:
        ``forward`` returns pixel_values :math:`(B, C, S, S)` in the input float dtype (the module's dtype,
        float32 by default, for uint8 input).

    Raises:
        ValueError: an invalid ``image_size``, ``resample``, ``image_mean`` or ``image_std``.
        ValueCheckError: from ``forward``: a wrong channel count, an empty batch, or a non-image dtype.

    Example:
        >>> preprocess = SigLipImagePreprocessor(image_size=32)
        >>> preprocess(torch.rand(2, 3, 40, 50)).shape
        torch.Size([2, 3, 32, 32])
        >>> preprocess([torch.rand(3, 10, 20), torch.rand(3, 64, 48)]).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        resample: str | int = "bicubic",
        antialias: bool = True,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        pil_exact: bool = True,
        backend: str = "pil",
    ) -> None:
        super().__init__(resample, antialias, image_mean, image_std, pil_exact, backend)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))

    def extra_repr(self) -> str:
        """Constructor arguments shown in ``repr``."""
        return (
            f"image_size={self.image_size}, resample={self.resample!r}, antialias={self.antialias}" + self._repr_tail()
        )

    def forward(self, images: ImageInput) -> torch.Tensor:
        """Preprocess a batch or a list of images into pixel_values :math:`(B, C, S, S)`."""
        groups = self._prepare(images)
        return torch.cat([self._resize_normalize(group, self.image_size) for group in groups])


class NaFlexImagePreprocessor(SigLip2ImagePreprocessor):
    """SigLIP 2 NaFlex preprocessing (``Siglip2ImageProcessor``), packed without padding.

    Each image is resized (bilinear with antialias, as transformers' default) to
    :func:`naflex_target_size`, normalized with mean = std = 0.5 and cut into patches in
    transformers' order (``Siglip2ImageProcessor``). :func:`to_padded` gives transformers' padded tensors.

    Args:
        patch_size: patch side :math:`p`.
        max_num_patches: patch budget :math:`N` per image.
        resample: ``"bilinear"`` (PIL 2, the default) or ``"bicubic"`` (PIL 3).
        antialias: PIL-style antialiasing when downscaling.
        image_mean: per-channel mean.
        image_std: per-channel std.
        pil_exact: resize ``uint8`` input exactly as Pillow (transformers' PIL processors) does.
        backend: ``"pil"`` (default) or ``"torchvision"``: which transformers image processor ``uint8`` input
            equals exactly (see :class:`SigLip2ImagePreprocessor`).

    Returns:
        ``forward`` returns :class:`PackedImages`: patches :math:`(\\sum_i h_i w_i, p \\cdot p \\cdot C)`
        in the input float dtype (the module's dtype for uint8 input) and grid_thw :math:`(B, 3)` rows
        ``(1, h_i, w_i)``.

    Raises:
        ValueError: a non-positive ``patch_size``/``max_num_patches`` or an invalid ``resample``.
        ValueCheckError: from ``forward``: a wrong channel count, an empty list, or a non-image dtype.

    Example:
        >>> preprocess = NaFlexImagePreprocessor(patch_size=16, max_num_patches=256)
        >>> packed = preprocess([torch.rand(3, 480, 640), torch.rand(3, 1000, 100)])
        >>> packed.patches.shape, packed.grid_thw.tolist()
        (torch.Size([502, 768]), [[1, 14, 18], [1, 50, 5]])
    """

    def __init__(
        self,
        patch_size: int = 16,
        max_num_patches: int = 256,
        resample: str | int = "bilinear",
        antialias: bool = True,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        pil_exact: bool = True,
        backend: str = "pil",
    ) -> None:
        super().__init__(resample, antialias, image_mean, image_std, pil_exact, backend)
        if patch_size < 1 or max_num_patches < 1:
            raise ValueError(
                f"patch_size and max_num_patches must be positive, got {patch_size} and {max_num_patches}."
            )
        self.patch_size = int(patch_size)
        self.max_num_patches = int(max_num_patches)

    def extra_repr(self) -> str:
        """Constructor arguments shown in ``repr``."""
        return (
            f"patch_size={self.patch_size}, max_num_patches={self.max_num_patches}, "
            f"resample={self.resample!r}, antialias={self.antialias}" + self._repr_tail()
        )

    def forward(self, images: ImageInput) -> PackedImages:
        """Preprocess a batch or a list of images into packed patches and their grids."""
        patches, grids = [], []
        # a (B, C, H, W) batch shares one target size, so it is resized in one call
        for group in self._prepare(images):
            size = naflex_target_size(group.shape[-2], group.shape[-1], self.patch_size, self.max_num_patches)
            group_patches, grid_thw = patchify(self._resize_normalize(group, size), self.patch_size)
            patches.append(group_patches)
            grids.append(grid_thw)
        return PackedImages(torch.cat(patches), torch.cat(grids))


# float images may leave [0, 1] by rounding (a uint8 level), not by more: 0-255 data or normalized [-1, 1] images
# would otherwise be taken silently (NaFlex outputs up to ~470; the fixed path clamped 62 % of values to 1).
UNIT_RANGE_TOLERANCE = 1 / 255


def _check_unit_range(groups: list[torch.Tensor]) -> None:
    """Float images must be finite and in :math:`[0, 1]` up to :data:`UNIT_RANGE_TOLERANCE` (one host read)."""
    bounds = torch.stack([torch.stack(torch.aminmax(group.detach())) for group in groups]).float()
    finite = bool(torch.isfinite(bounds).all())
    low, high = float(bounds[:, 0].min()), float(bounds[:, 1].max())
    check(
        finite,
        "images hold NaN or inf values; float images must be finite, in [0, 1].",
    )
    check(
        low >= -UNIT_RANGE_TOLERANCE and high <= 1 + UNIT_RANGE_TOLERANCE,
        lambda: (
            f"Float images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]. For 0-255 data pass a uint8 "
            "tensor (images.round().clamp(0, 255).to(torch.uint8)) or divide by 255; images that are already "
            "normalized (e.g. to [-1, 1]) skip the preprocessor: pass them to the model as pixel_values; values "
            "a resampling pushed slightly out of range: images.clamp(0, 1)."
        ),
    )


def _interpolate(images: torch.Tensor, size: tuple[int, int], kwargs: dict[str, Any]) -> torch.Tensor:
    """``F.interpolate`` to ``size``, resizing the transposed image when the output is one pixel wide.

    torch 2.13's CPU antialiased kernel returns one value per column when the output width is 1 (e.g. a
    1-pixel-wide strip resized height first); the transposed problem is correct (checked against PIL mode F).
    """
    if size[1] == 1 and size[0] != 1 and kwargs["antialias"]:
        return F.interpolate(images.mT, (size[1], size[0]), **kwargs).mT
    return F.interpolate(images, size, **kwargs)


def _torchvision_resize(images: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """``uint8`` :math:`(B, C, H, W)` resized as torchvision's ``resize`` (v2 functional, 0.29) does it.

    On the CPU torchvision hands ``uint8`` to ``F.interpolate`` as is (bicubic always; bilinear where the CPU has
    AVX2 / AVX-512 or is ARM, torch's ``uint8`` kernels); elsewhere it interpolates in float32, clamps bicubic to
    [0, 255], rounds and casts back. An unchanged size returns the input.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    native = images.device.type == "cpu" and (
        mode == "bicubic"
        or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    if native:
        return F.interpolate(images, size, mode=mode, align_corners=False, antialias=antialias)
    resized = F.interpolate(images.float(), size, mode=mode, align_corners=False, antialias=antialias)
    if mode == "bicubic":
        resized = resized.clamp_(0, 255)
    return resized.round_().to(torch.uint8)


def _is_pil(image: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(image, pil.Image)


def _tensor_image(image: Any, name: str) -> torch.Tensor:
    """A tensor as is; a PIL image or numpy array as the :math:`(C, H, W)` tensor transformers' processors make of it.

    PIL images are converted to RGB as transformers' ``convert_to_rgb`` does (transparent pixels on white); numpy
    arrays are channels first when their first axis could be channels (1 or 3), else channels last (transformers'
    ``infer_channel_dimension_format``); grey arrays are repeated to 3 channels.
    """
    if isinstance(image, torch.Tensor):
        return image
    if _is_pil(image):
        from PIL import Image

        if image.mode != "RGB":
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    check_type(
        isinstance(image, np.ndarray),
        lambda: f"{name} must be a tensor, a PIL image or a numpy array, got {type(image).__name__}.",
    )
    check(
        image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating),
        lambda: f"{name} is a numpy array of dtype {image.dtype}: pass uint8 (0-255) or float in [0, 1].",
    )
    array = image[None] if image.ndim == 2 else image
    check(array.ndim == 3, lambda: f"{name} must be an (H, W, C) or (C, H, W) numpy array, got shape {image.shape}.")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if array.shape[0] not in (1, 3) and array.shape[-1] in (1, 3):
        tensor = tensor.permute(2, 0, 1)
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _check_supported(config: dict[str, Any]) -> None:
    """Reject preprocessor settings the tensor preprocessors do not implement (rather than ignore them)."""
    unsupported = []
    if config.get("do_resize", True) is False:
        unsupported.append("do_resize=false")
    if config.get("do_rescale", True) is False:
        unsupported.append("do_rescale=false")
    if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
        unsupported.append(f"rescale_factor={config['rescale_factor']}")
    if config.get("do_center_crop") or config.get("do_pad"):
        unsupported.append("do_center_crop/do_pad")
    if unsupported:
        raise ValueError(
            f"Unsupported preprocessor settings {', '.join(unsupported)}: the preprocessors always resize and "
            "map uint8 images to [0, 1] (float images are taken as already in [0, 1])."
        )
