"""Zero-shot classification and retrieval embeddings: images and texts in, sigmoid probabilities or embeddings out.

One pipeline for every checkpoint: files / tensors -> preprocess (NaFlex: packed without padding) -> encode ->
L2-normalize -> ``logits = s * <image, text> + b`` -> ``sigmoid`` (SigLIP scores each pair independently, so
the probabilities of one image need not sum to 1; Zhai et al. 2023, arXiv:2303.15343).

Images may be paths, PIL images, numpy arrays (:math:`(H, W, 3)` uint8 as transformers' processors take them, or
:math:`(3, H, W)`, or :math:`(H, W)` grey) and :math:`(C, H, W)` tensors (uint8, or float in :math:`[0, 1]`).

Inference records no autograd graph unless asked: every method takes ``grad``; the default ``None`` records one
only when an input tensor requires grad (attribution, adversarial examples), ``True`` always records (fine-tuning
through the classifier), ``False`` never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from torch import nn

from kornia_siglip2.model import SigLip2
from kornia_siglip2.preprocess import (
    PREPROCESSOR_CONFIG_NAME,
    NaFlexImagePreprocessor,
    SigLip2ImagePreprocessor,
    SigLipImagePreprocessor,
)
from kornia_siglip2.tokenizer import SigLipTokenizer

__all__ = ["DEFAULT_TEMPLATE", "ImageSource", "ZeroShotClassifier", "image_tensor", "load_image"]

#: Prompt of the SigLIP / SigLIP 2 model cards.
DEFAULT_TEMPLATE = "This is a photo of {label}."

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# One image: a path, a :math:`(C, H, W)` tensor (float in :math:`[0, 1]` or uint8), a PIL image, or a numpy
# array (:math:`(H, W, 3)` / :math:`(3, H, W)` / :math:`(H, W)`, uint8 or float in :math:`[0, 1]`).
ImageSource: TypeAlias = "str | os.PathLike[str] | torch.Tensor | PILImage | np.ndarray"

# PIL modes holding more than 8 bits per sample: converting them to RGB clips every value above 255
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def load_image(path: str | os.PathLike[str] | PILImage) -> torch.Tensor:
    """Read an image file (or convert a PIL image) to an RGB uint8 tensor :math:`(3, H, W)`.

    Applies the EXIF orientation to files and PIL images alike (as transformers' ``load_image``), and
    composites transparent images on white (as transformers' ``convert_to_rgb``, which its SigLIP processors
    run on PIL input). Deliberate difference: transformers' ``load_image(path)`` drops the alpha channel
    (``convert("RGB")`` keeps whatever colour the transparent pixels hold, often black), so
    ``processor(path)`` and ``processor(Image.open(path))`` disagree there; we composite on white for both,
    as the image is seen. To reproduce transformers' path behaviour, pass
    ``Image.open(path).convert("RGB")``. transformers' processors also leave the EXIF orientation of a PIL
    image passed to them directly unapplied (only ``load_image`` applies it); we apply it.

    Args:
        path: image file path, or a ``PIL.Image.Image``.

    Returns:
        uint8 :math:`(3, H, W)`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image PIL can read.
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
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as error:
        raise ImportError("Reading image files needs pillow: pip install pillow.") from error

    if isinstance(path, Image.Image):
        image = ImageOps.exif_transpose(path)  # a no-op (a copy) without an orientation tag
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"No image file at {path}.")
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"Cannot read image {path}: {error}") from error
    if image.mode != "RGB" or image.info.get("transparency") is not None:
        # transformers' convert_to_rgb: transparent pixels (alpha or a tRNS colour key) become white, not black
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


class ZeroShotClassifier(nn.Module):
    """SigLIP / SigLIP 2 zero-shot classifier and retrieval embedder (model + image preprocessor + tokenizer).

    Args:
        model: the dual-tower model.
        preprocessor: :class:`~kornia_siglip2.preprocess.NaFlexImagePreprocessor` for NaFlex models (images are
            packed, never padded), :class:`~kornia_siglip2.preprocess.SigLipImagePreprocessor` otherwise.
        tokenizer: text tokenizer; ``None`` for image-only use (``embed_texts`` and ``forward`` then raise).

    Example:
        >>> import tempfile
        >>> from kornia_siglip2.demo import build_tiny_checkpoint
        >>> classifier = ZeroShotClassifier.from_pretrained(build_tiny_checkpoint(tempfile.mkdtemp()))
        >>> images = [torch.rand(3, 64, 96), torch.rand(3, 200, 50)]  # any sizes
        >>> probabilities = classifier(images, ["red circle", "blue square", "a dog"])
        >>> probabilities.shape, bool(((probabilities > 0) & (probabilities < 1)).all())
        (torch.Size([2, 3]), True)
        >>> torch.allclose(classifier.embed_texts(["a dog", "a cat"]).norm(dim=-1), torch.ones(2))  # unit norm
        True
    """

    def __init__(
        self, model: SigLip2, preprocessor: SigLip2ImagePreprocessor, tokenizer: SigLipTokenizer | None = None
    ) -> None:
        super().__init__()
        if model.config.is_naflex != isinstance(preprocessor, NaFlexImagePreprocessor):
            raise ValueError(
                f"A {'NaFlex' if model.config.is_naflex else 'fixed-resolution'} model needs a "
                f"{'NaFlexImagePreprocessor' if model.config.is_naflex else 'SigLipImagePreprocessor'}, "
                f"got {type(preprocessor).__name__}."
            )
        self.model = model
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        load_tokenizer: bool = True,
        **preprocessor_overrides: Any,
    ) -> ZeroShotClassifier:
        """Load model, preprocessor and tokenizer of one checkpoint (folder or hub id), resolved once.

        The preprocessor comes from ``preprocessor_config.json`` (or the ``image_processor`` entry of
        ``processor_config.json``); without either it is derived from the model config: NaFlex with the
        checkpoint's ``patch_size`` and ``max_num_patches = num_patches``, or fixed resolution at ``image_size``.

        Args:
            name_or_path: checkpoint folder or hub id such as ``google/siglip2-base-patch16-naflex``.
            device: device of the model and preprocessor.
            dtype: model dtype (float32 by default); preprocessing stays float32.
            revision: hub revision.
            cache_dir: Hugging Face cache folder.
            local_files_only: never reach the network (``HF_HUB_OFFLINE=1`` does the same).
            load_tokenizer: also load the tokenizer (not needed to embed images).
            preprocessor_overrides: preprocessor arguments replacing the config's (e.g. ``max_num_patches=1024``).

        Returns:
            the classifier in eval mode.

        Raises:
            FileNotFoundError: no checkpoint, or no tokenizer files when ``load_tokenizer`` is set.
            ValueError: an unsupported checkpoint, preprocessor or tokenizer.
        """
        from kornia_siglip2.hub import resolve_checkpoint

        folder = resolve_checkpoint(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        # float32 unless asked (our API; SigLip2.from_pretrained's own default is transformers' 'auto')
        model = SigLip2.from_pretrained(folder, device=device, dtype=torch.float32 if dtype is None else dtype)
        preprocessor = _load_preprocessor(folder, model, preprocessor_overrides)
        if device is not None:
            preprocessor = preprocessor.to(device)
        tokenizer = SigLipTokenizer.from_pretrained(folder) if load_tokenizer else None
        return cls(model, preprocessor, tokenizer).eval()

    @property
    def device(self) -> torch.device:
        """Device of the model weights."""
        return self.model.logit_scale.device

    def image_features(self, images: ImageSource | Sequence[ImageSource], *, grad: bool | None = None) -> torch.Tensor:
        """Encode one batch of images into L2-normalized embeddings.

        Args:
            images: a :math:`(B, C, H, W)` tensor, or one image or a list of images of any sizes: paths, PIL
                images, numpy arrays (:math:`(H, W, 3)` uint8 as transformers takes them) or :math:`(C, H, W)`
                tensors (float in :math:`[0, 1]` or uint8).
            grad: record autograd (see the module docstring); by default only for inputs that require grad.

        Returns:
            :math:`(B, D)` unit-norm image embeddings, in the model dtype.

        Raises:
            ValueError: no images, an image of an unsupported shape or dtype, or a file that cannot be read.
            FileNotFoundError: a path that does not exist.
            TypeError: an object that is not an image.
        """
        batch = _to_batch(images, self.device)
        with _autograd(grad, batch):
            return _image_embeddings(self.model, self.preprocessor(batch))

    def text_features(self, texts: str | Sequence[str], *, grad: bool | None = None) -> torch.Tensor:
        """Tokenize and encode one batch of texts into L2-normalized embeddings.

        Args:
            texts: one string or :math:`T` strings.
            grad: record autograd (see the module docstring); by default not (token ids never require grad).

        Returns:
            :math:`(T, D)` unit-norm text embeddings, in the model dtype.

        Raises:
            ValueError: the classifier has no tokenizer.
        """
        if self.tokenizer is None:
            raise ValueError(
                "This classifier has no tokenizer (built with load_tokenizer=False, or the checkpoint has none)."
            )
        input_ids = self.tokenizer(texts).to(self.device)
        with _autograd(grad, input_ids):
            return _text_embeddings(self.model, input_ids)

    def embed_images(
        self,
        images: torch.Tensor | Sequence[ImageSource],
        batch_size: int = 32,
        progress: bool | None = None,
        *,
        grad: bool | None = None,
    ) -> torch.Tensor:
        """Retrieval embeddings of many images, ``batch_size`` at a time (files are read one batch at a time).

        Args:
            images: a :math:`(B, C, H, W)` tensor or a list of images of any sizes (as :meth:`image_features`).
            batch_size: images per forward (NaFlex: packed together).
            progress: progress bar on stderr; ``None`` shows it when there is more than one batch.
            grad: record autograd (see the module docstring).

        Returns:
            :math:`(B, D)` unit-norm embeddings on the model's device.

        Raises:
            ValueError: an empty input or a non-positive ``batch_size``; an unreadable image file.
        """
        items = _as_items(images)
        encode = lambda chunk: self.image_features(chunk, grad=grad)  # noqa: E731
        return torch.cat(list(_batched(items, batch_size, progress, "images", encode)))

    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = None, *, grad: bool | None = None
    ) -> torch.Tensor:
        """Retrieval embeddings of many texts, ``batch_size`` at a time.

        Args:
            texts: :math:`T` strings.
            batch_size: texts per forward.
            progress: progress bar on stderr; ``None`` shows it when there is more than one batch.
            grad: record autograd (see the module docstring).

        Returns:
            :math:`(T, D)` unit-norm embeddings on the model's device.

        Raises:
            ValueError: no tokenizer, an empty list or a non-positive ``batch_size``.
        """
        if isinstance(texts, str):
            texts = [texts]
        encode = lambda chunk: self.text_features(chunk, grad=grad)  # noqa: E731
        return torch.cat(list(_batched(list(texts), batch_size, progress, "texts", encode)))

    def logits(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        *,
        grad: bool | None = None,
    ) -> torch.Tensor:
        """Scaled and biased cosine similarities of every image with every label put in ``template``.

        Args:
            images: as :meth:`forward`.
            labels: :math:`K` class names.
            template: prompt with a ``{label}`` field.
            grad: record autograd (see the module docstring).

        Returns:
            ``logits_per_image`` :math:`(B, K)`.

        Raises:
            ValueError: as :meth:`forward`.
        """
        texts = _prompts(labels, template)
        batch = _to_batch(images, self.device)
        with _autograd(grad, batch):
            image_embeds = self.image_features(batch, grad=grad)
            text_embeds = self.text_features(texts, grad=grad)
            return self.model.logits(image_embeds, text_embeds).t()

    def forward(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        *,
        grad: bool | None = None,
    ) -> torch.Tensor:
        """Zero-shot probabilities: ``sigmoid(logits_per_image)`` (not softmax).

        Args:
            images: a :math:`(B, C, H, W)` tensor (float in :math:`[0, 1]` or uint8), or one image or a list of
                images of any sizes: paths (read with PIL, EXIF orientation applied), PIL images, numpy arrays
                (:math:`(H, W, 3)` uint8) or :math:`(C, H, W)` tensors.
            labels: :math:`K` class names.
            template: prompt with a ``{label}`` field.
            grad: record autograd (see the module docstring); by default only when an input tensor requires grad,
                so ``classifier(images, labels)`` builds no graph.

        Returns:
            :math:`(B, K)` probabilities, each in :math:`(0, 1)`, independent per pair.

        Raises:
            ValueError: no labels, a template without ``{label}``, no tokenizer, or bad images.
        """
        batch = _to_batch(images, self.device)
        with _autograd(grad, batch):
            return torch.sigmoid(self.logits(batch, labels, template, grad=grad))


def _image_embeddings(model: SigLip2, preprocessed: Any) -> torch.Tensor:
    """L2-normalized image embeddings of preprocessed images: the one place that calls the vision tower.

    Args:
        model: the dual-tower model.
        preprocessed: :class:`~kornia_siglip2.preprocess.PackedImages` (NaFlex) or :math:`(B, 3, H, W)` pixels.

    Returns:
        :math:`(B, D)` unit-norm embeddings.

    Example:
        >>> import tempfile
        >>> from kornia_siglip2._demo import build_tiny_checkpoint
        >>> classifier = ZeroShotClassifier.from_pretrained(build_tiny_checkpoint(tempfile.mkdtemp()))
        >>> _image_embeddings(classifier.model, classifier.preprocessor([torch.rand(3, 32, 48)])).shape
        torch.Size([1, 64])
    """
    return model.encode_image(preprocessed, normalize=True)


def _text_embeddings(model: SigLip2, input_ids: torch.Tensor) -> torch.Tensor:
    """L2-normalized text embeddings of token ids :math:`(T, L)`: the one place that calls the text tower.

    Args:
        model: the dual-tower model.
        input_ids: :math:`(T, L)` token ids.

    Returns:
        :math:`(T, D)` unit-norm embeddings.
    """
    return model.encode_text(input_ids, normalize=True)


def _requires_grad(inputs: Any) -> bool:
    if isinstance(inputs, torch.Tensor):
        return inputs.requires_grad
    if isinstance(inputs, (list, tuple)):
        return any(isinstance(item, torch.Tensor) and item.requires_grad for item in inputs)
    return False


def _autograd(grad: bool | None, inputs: Any) -> contextlib.AbstractContextManager[Any]:
    """``no_grad`` unless gradients were asked for (``grad=True``, or an input tensor that requires grad)."""
    if grad is None:
        grad = _requires_grad(inputs)
    return contextlib.nullcontext() if grad else torch.no_grad()


def _load_preprocessor(folder: Path, model: SigLip2, overrides: dict[str, Any]) -> SigLip2ImagePreprocessor:
    """The checkpoint's preprocessor, or one derived from the model config when the checkpoint has none."""
    if (folder / PREPROCESSOR_CONFIG_NAME).is_file():
        return SigLip2ImagePreprocessor.from_pretrained(folder, **overrides)
    processor_file = folder / "processor_config.json"
    if processor_file.is_file():
        # transformers 5 saves processors as one processor_config.json with the image processor nested
        nested = json.loads(processor_file.read_text(encoding="utf-8")).get("image_processor")
        if isinstance(nested, dict):
            return SigLip2ImagePreprocessor.from_config(nested, **overrides)
    vision = model.config.vision_config
    if model.config.is_naflex:
        kwargs: dict[str, Any] = {"patch_size": vision.patch_size, "max_num_patches": vision.num_patches}
        kwargs.update(overrides)
        return NaFlexImagePreprocessor(**kwargs)
    return SigLipImagePreprocessor(**{"image_size": vision.image_size, **overrides})


def _prompts(labels: Sequence[str], template: str) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}.")
    if not all(isinstance(label, str) for label in labels):
        raise ValueError("labels must be strings.")
    if "{label}" not in template:
        raise ValueError(f"template must contain '{{label}}', got {template!r}.")
    return [template.replace("{label}", label) for label in labels]


def _as_items(images: torch.Tensor | ImageSource | Sequence[ImageSource]) -> torch.Tensor | list[Any]:
    """Sliceable form of the input: a 4-D tensor stays one, anything else becomes a list of images."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return images
        if images.ndim == 3:
            return [images]
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}.")
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _to_batch(images: ImageSource | Sequence[ImageSource], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """Preprocessor input on ``device``: a 4-D tensor as is, every other image as a :math:`(C, H, W)` tensor."""
    items = _as_items(images)
    if isinstance(items, torch.Tensor):
        if items.shape[0] == 0:
            raise ValueError("images must hold at least one image, got an empty batch.")
        return items.to(device)
    if len(items) == 0:
        raise ValueError("images must hold at least one image, got an empty list.")
    return [image_tensor(item, f"images[{index}]").to(device) for index, item in enumerate(items)]


def image_tensor(image: Any, name: str = "image") -> torch.Tensor:
    """One image of any supported kind as a :math:`(3, H, W)` tensor (uint8, or float as given).

    - path or PIL image: :func:`load_image` (EXIF orientation applied; 16-bit grey images warn, see below);
    - numpy array: :math:`(H, W, C)` or :math:`(C, H, W)` with :math:`C \\in \\{1, 3\\}` (channels inferred as
      transformers' ``infer_channel_dimension_format`` does: channels first when both ends could be channels), or
      :math:`(H, W)` grey; uint8, or float in :math:`[0, 1]`;
    - tensor: :math:`(3, H, W)` or :math:`(1, H, W)` / :math:`(H, W)` grey (repeated to 3 channels, as
      transformers' ``convert_to_rgb`` does).

    16-bit grey files (PIL modes ``I;16`` / ``I``) are clipped to 255 on conversion to RGB, as Pillow and
    transformers do; that wrecks their contrast, so a ``UserWarning`` names the file and says how to convert it.

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
        _warn_if_high_bit_depth(image, name)
        return load_image(image)  # EXIF orientation applied there, as for paths
    if isinstance(image, (str, os.PathLike)):
        _warn_if_high_bit_depth(image, name)
        return load_image(image)
    raise TypeError(
        f"{name} must be a path, a PIL image, a numpy array or a (3, H, W) tensor, got {type(image).__name__}."
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


def _warn_if_high_bit_depth(image: Any, name: str) -> None:
    """Warn that a 16-bit grey image is about to be clipped to 8 bits (opening a file reads its header only)."""
    if _is_pil(image):
        mode, label = image.mode, name
    else:
        try:
            from PIL import Image

            with Image.open(image) as opened:
                mode = opened.mode
        except (OSError, ValueError, SyntaxError):  # load_image reports missing / unreadable files clearly
            return
        label = str(image)
    if mode in _HIGH_BIT_DEPTH_MODES:
        warnings.warn(
            f"{label} is a high-bit-depth image (PIL mode {mode}): converting it to RGB clips every value above "
            "255 (as Pillow and transformers do). Scale it to 8 bits first, e.g. "
            "Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) for 16-bit data.",
            UserWarning,
            stacklevel=4,
        )


def _batched(
    items: torch.Tensor | list[Any],
    batch_size: int,
    progress: bool | None,
    unit: str,
    encode: Callable[[Any], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """Encode ``items`` in slices of ``batch_size`` with an optional progress bar on stderr."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    total = len(items)
    if total == 0:
        raise ValueError(f"{unit} must hold at least one element, got none.")
    show = progress if progress is not None else total > batch_size
    # tqdm comes with huggingface_hub (a dependency); it only draws on stderr and goes silent when disabled
    from tqdm import tqdm

    with tqdm(total=total, unit=unit[:-1], desc=f"embedding {unit}", file=sys.stderr, disable=not show) as bar:
        for start in range(0, total, batch_size):
            chunk = items[start : start + batch_size]
            yield encode(chunk)
            bar.update(len(chunk))
