"""Zero-shot classification and retrieval embeddings: images and texts in, sigmoid probabilities or embeddings out.

One pipeline for every checkpoint: files / tensors -> preprocess (NaFlex: packed without padding) -> encode ->
L2-normalize -> ``logits = s * <image, text> + b`` -> ``sigmoid`` (SigLIP scores each pair independently, so
the probabilities of one image need not sum to 1; Zhai et al. 2023, arXiv:2303.15343).

Images may be paths, encoded bytes, PIL images, numpy arrays (:math:`(H, W, 3)` uint8 as transformers' processors
take them, or :math:`(3, H, W)`, or :math:`(H, W)` grey) and :math:`(C, H, W)` tensors (uint8, or float in
:math:`[0, 1]`), all read by :mod:`kornia_siglip2.images`.

Inference records no autograd graph unless asked: every method takes ``grad``; the default ``None`` records one
only when an input tensor requires grad (attribution, adversarial examples), ``True`` always records (fine-tuning
through the classifier), ``False`` never does.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kornia_siglip2.hub import resolve_checkpoint
from kornia_siglip2.images import ImageSource, image_tensor
from kornia_siglip2.model import SigLip2
from kornia_siglip2.preprocess import (
    PREPROCESSOR_CONFIG_NAME,
    PROCESSOR_CONFIG_NAME,
    NaFlexImagePreprocessor,
    SigLip2ImagePreprocessor,
    SigLipImagePreprocessor,
)
from kornia_siglip2.tokenizer import SigLipTokenizer

__all__ = ["DEFAULT_TEMPLATE", "ZeroShotClassifier"]

#: Prompt of the SigLIP / SigLIP 2 model cards.
DEFAULT_TEMPLATE = "This is a photo of {label}."


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
        # the attention mask too where the checkpoint's tokenizer returns one (transformers' processor and
        # pipeline pass it to the model, and it changes the pooled feature)
        inputs = {key: value.to(self.device) for key, value in self.tokenizer.encode(texts).items()}
        with _autograd(grad, inputs["input_ids"]):
            return _text_embeddings(self.model, inputs["input_ids"], inputs.get("attention_mask"))

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


def _text_embeddings(
    model: SigLip2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalized text embeddings of token ids :math:`(T, L)`: the one place that calls the text tower.

    Args:
        model: the dual-tower model.
        input_ids: :math:`(T, L)` token ids.
        attention_mask: :math:`(T, L)` mask, where the checkpoint's tokenizer returns one.

    Returns:
        :math:`(T, D)` unit-norm embeddings.
    """
    return model.encode_text(input_ids, attention_mask, normalize=True)


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
    if (folder / PREPROCESSOR_CONFIG_NAME).is_file() or (folder / PROCESSOR_CONFIG_NAME).is_file():
        return SigLip2ImagePreprocessor.from_pretrained(folder, **overrides)
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
