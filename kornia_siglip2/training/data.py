"""Image-text data for training: manifests, NaFlex preprocessing in the workers, token-budget packing.

A manifest lists ``(image path, caption)`` pairs (:func:`read_manifest`: a folder of images with ``.txt``
captions beside them, a JSONL file or a CSV file), and in JSONL optionally region boxes with their texts for
LocCa. :class:`ImageTextDataset` loads and preprocesses one
image per item, in the ``DataLoader`` workers. :class:`TokenBudgetBatchSampler` packs images into batches of
at most ``token_budget`` patch tokens (NaViT-style greedy packing, Dehghani et al. 2023, section 2.2): no
batch is padded, so every step sees a near-constant number of tokens. :func:`collate_packed` concatenates
the items into one :class:`~kornia_siglip2.packing.PackedImages` and a block of token ids.

Token dropping (NaViT's "continuous token dropping", section 2.2): with ``token_drop`` the sampler counts each
image's *kept* tokens in the budget (:func:`num_kept_tokens`), so more images fit in a batch, and
:func:`drop_tokens` then keeps a random subset of that size of every image's patches, drawn from the image's own
generator (:func:`sample_generator` of ``(seed, epoch, index)``), whichever rank or batch the image lands in.

Distributed, every rank builds the same plan from the seed and the epoch and takes every ``W``-th batch, so
each image is seen exactly once per epoch across the ranks and every rank takes the same number of steps.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kornia_siglip2.errors import check, check_type
from kornia_siglip2.images import image_size, load_image
from kornia_siglip2.packing import PackedImages
from kornia_siglip2.preprocess import NaFlexImagePreprocessor, naflex_target_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "ByteTokenizer",
    "ImageTextDataset",
    "ImageTextRecord",
    "PackedBatch",
    "Region",
    "TokenBudgetBatchSampler",
    "collate_packed",
    "drop_tokens",
    "naflex_num_tokens",
    "num_kept_tokens",
    "read_manifest",
    "sample_generator",
    "training_example",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# the random streams of one image: LocCa, SILC views and TIPS mask in objective.py are 0, 1, 2
_TOKEN_DROP_STREAM = 3


def sample_generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one image of one epoch, from ``numpy.random.SeedSequence([seed, epoch, index, stream])``.

    Example:
        >>> a = torch.rand(2, generator=sample_generator(0, 1, 7, 0))
        >>> torch.equal(a, torch.rand(2, generator=sample_generator(0, 1, 7, 0)))
        True
        >>> torch.equal(a, torch.rand(2, generator=sample_generator(0, 1, 8, 0)))
        False
    """
    high, low = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2).tolist()
    return torch.Generator().manual_seed((high << 32 | low) & (2**63 - 1))


def num_kept_tokens(num_tokens: int, token_drop: float) -> int:
    """Tokens a frame of ``num_tokens`` patches keeps at drop rate ``token_drop``: at least one.

    ``num_tokens - floor(num_tokens * token_drop)``, so that rate 0 keeps every token.

    Example:
        >>> num_kept_tokens(256, 0.5), num_kept_tokens(7, 0.5), num_kept_tokens(3, 0.9), num_kept_tokens(5, 0.0)
        (128, 4, 1, 5)
    """
    return max(1, num_tokens - math.floor(num_tokens * token_drop))


@dataclass(frozen=True)
class Region:
    """A box of an image and the text that describes it (a LocCa referring expression / grounded caption).

    Attributes:
        box: ``(x0, y0, x1, y1)`` normalized to :math:`[0, 1]` by the image width and height, ``x0 <= x1``,
            ``y0 <= y1``. NaFlex resizing keeps the whole image, so the box stays valid after preprocessing.
        text: the region's text.
    """

    box: tuple[float, float, float, float]
    text: str


@dataclass(frozen=True)
class ImageTextRecord:
    """One training pair.

    Attributes:
        image: path of the image file.
        caption: its caption.
        size: ``(height, width)`` in pixels if the manifest gives it (:meth:`ImageTextDataset.sizes` checks it
            against the file's header).
        regions: boxes with their texts, for LocCa's referring-expression and grounded-captioning tasks
            (empty: the image trains LocCa's captioning task only).
        origin: where the record comes from (``"manifest.jsonl line 7"``, or the caption file), for messages.
    """

    image: Path
    caption: str
    size: tuple[int, int] | None = None
    regions: tuple[Region, ...] = ()
    origin: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        """``image (origin)`` for error messages."""
        return f"{self.image} ({self.origin})" if self.origin else str(self.image)


def read_manifest(source: str | Path, image_key: str = "image", caption_key: str = "caption") -> list[ImageTextRecord]:
    """Read the ``(image, caption)`` pairs of a folder, a JSONL file or a CSV file.

    - folder: every image (:data:`IMAGE_EXTENSIONS`, recursively, sorted by path) with a caption file of the
      same name and a ``.txt`` suffix beside it.
    - ``.jsonl``: one JSON object per line with ``image_key`` and ``caption_key`` (optional ``width`` and
      ``height``, and ``regions``: a list of ``{"box": [x0, y0, x1, y1], "text": "..."}`` with the box
      normalized to :math:`[0, 1]`, see :class:`Region`).
    - ``.csv``: a header row naming ``image_key`` and ``caption_key`` (optional ``width`` and ``height``; no
      regions).

    Relative image paths are relative to the manifest's folder. Text is UTF-8 (a CSV may start with the byte
    order mark Excel writes). Every error names the manifest (or caption file) and the line.

    Args:
        source: the folder or the manifest file.
        image_key: name of the image path field.
        caption_key: name of the caption field.

    Returns:
        the records, in manifest order.

    Raises:
        FileNotFoundError: ``source`` or a folder image's caption file does not exist.
        ValueError: text that is not UTF-8, a line that is not JSON, or a CSV that cannot be parsed (with the line).
        ValueCheckError: an unknown manifest suffix, a line that is not a JSON object, a missing field, an image
            path that is not a string or names a folder, a caption that is not a string or is empty / only
            whitespace, a width / height that is not a positive integer (``true`` is not one), a malformed region
            (box not 4 numbers with ``0 <= x0 <= x1 <= 1`` and ``0 <= y0 <= y1 <= 1``, or no text), or an empty
            manifest; each names the file and the line.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"No image folder or manifest at {source}.")
    if source.is_dir():
        records = []
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            caption_file = path.with_suffix(".txt")
            if not caption_file.is_file():
                raise FileNotFoundError(f"Image {path} has no caption file {caption_file}: write one beside it.")
            caption = _decode(caption_file.read_bytes(), caption_file).strip()
            check(
                bool(caption),
                lambda caption_file=caption_file: f"{caption_file} line 1: the caption is empty or only whitespace.",
            )
            records.append(ImageTextRecord(path, caption, origin=str(caption_file)))
    else:
        suffix = source.suffix.lower()
        check(suffix in (".jsonl", ".csv"), lambda: f"Manifest {source} must be .jsonl or .csv, got {suffix!r}.")
        rows = _read_rows(source, suffix)
        records = [_record(row, line, source, image_key, caption_key) for line, row in rows]
    check(len(records) > 0, lambda: f"{source} lists no image-caption pair.")
    return records


def _decode(data: bytes, source: Path) -> str:
    """UTF-8 text (a leading byte order mark dropped); an error names the file and the line of the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{source} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}): save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)."
        ) from error


def _read_rows(source: Path, suffix: str) -> list[tuple[int, dict[str, Any]]]:
    text = _decode(source.read_bytes(), source)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as error:
            raise ValueError(f"{source} line {reader.line_num} is not valid CSV: {error}") from error
        return rows
    rows = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{source} line {line} is not valid JSON: {error}") from error
        check(isinstance(row, dict), lambda line=line: f"{source} line {line} must be a JSON object.")
        rows.append((line, row))
    return rows


def _dimension(value: Any, name: str, where: str) -> int:
    """A positive integer width / height from JSON (an int, not a bool) or CSV (its digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        lambda: f"{where}: {name} must be a positive integer number of pixels, got {value!r}.",
    )
    return value


def _record(row: dict[str, Any], line: int, source: Path, image_key: str, caption_key: str) -> ImageTextRecord:
    where = f"{source} line {line}"
    for key in (image_key, caption_key):
        check(key in row and row[key] not in (None, ""), lambda key=key: f"{source} line {line} has no {key!r}.")
    image, caption = row[image_key], row[caption_key]
    check(
        isinstance(image, str) and image.strip() != "",
        lambda: f"{where}: {image_key!r} must be an image path (a string), got {image!r}.",
    )
    check(
        isinstance(caption, str),
        lambda: f"{where}: {caption_key!r} must be a string, got {type(caption).__name__} {caption!r}.",
    )
    check(caption.strip() != "", lambda: f"{where}: {caption_key!r} is empty or only whitespace.")
    size = None
    width, height = row.get("width"), row.get("height")
    if width not in (None, "") or height not in (None, ""):
        check(
            width not in (None, "") and height not in (None, ""),
            lambda: f"{where}: give both width and height, or neither.",
        )
        size = (_dimension(height, "height", where), _dimension(width, "width", where))
    regions = _regions(row.get("regions"), line, source)
    path = Path(image) if Path(image).is_absolute() else source.parent / image
    check(not path.is_dir(), lambda: f"{where}: image {path} is a folder, not an image file.")
    return ImageTextRecord(path, caption, size, regions, origin=where)


def _regions(value: Any, line: int, source: Path) -> tuple[Region, ...]:
    if value in (None, ""):
        return ()
    where = f"{source} line {line}"
    check(isinstance(value, list), lambda: f"{where}: regions must be a list of {{'box': [...], 'text': ...}}.")
    regions = []
    for entry in value:
        check(
            isinstance(entry, dict)
            and "box" in entry
            and isinstance(entry.get("text"), str)
            and entry["text"].strip() != "",
            lambda entry=entry: f"{where}: every region needs a 'box' and a non-empty 'text', got {entry!r}.",
        )
        box = entry["box"]
        check(
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box),
            lambda box=box: f"{where}: a region box must be 4 numbers [x0, y0, x1, y1], got {box!r}.",
        )
        x0, y0, x1, y1 = (float(v) for v in box)
        check(
            0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0,
            lambda box=box: f"{where}: box {box} must be normalized xyxy: 0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1.",
        )
        regions.append(Region((x0, y0, x1, y1), str(entry["text"])))
    return tuple(regions)


@lru_cache(maxsize=65536)
def naflex_num_tokens(height: int, width: int, patch_size: int, max_num_patches: int) -> int:
    """Patch tokens of an image after NaFlex resizing (:func:`~kornia_siglip2.preprocess.naflex_target_size`).

    Example:
        >>> naflex_num_tokens(480, 640, 16, 256), naflex_num_tokens(1000, 100, 16, 256)
        (252, 250)
    """
    target_height, target_width = naflex_target_size(height, width, patch_size, max_num_patches)
    return (target_height // patch_size) * (target_width // patch_size)


class ByteTokenizer:
    """A dependency-free tokenizer for from-scratch runs: UTF-8 bytes + 1, then EOS, padded with 0 to a length.

    Use a real tokenizer (:class:`~kornia_siglip2.tokenizer.SigLipTokenizer`) to fine-tune a checkpoint.

    Args:
        max_length: the fixed length :math:`L` (SigLIP's text tower uses 64).

    Example:
        >>> ByteTokenizer(max_length=6)(["ab"]).tolist()
        [[98, 99, 257, 0, 0, 0]]
    """

    vocab_size = 258  # 0 pad, 1..256 bytes, 257 EOS
    pad_token_id = 0
    eos_token_id = 257

    def __init__(self, max_length: int = 64) -> None:
        check(max_length >= 1, lambda: f"max_length must be positive, got {max_length}.")
        self.max_length = int(max_length)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids :math:`(n, L)` of the texts (truncated to ``L - 1`` bytes, then EOS)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [byte + 1 for byte in text.encode()[: self.max_length - 1]] + [self.eos_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def _text_ids(ids: torch.Tensor, tokenizer: Any) -> list[int]:
    """The ids before the first EOS or padding id (LocCa appends its own EOS)."""
    ends = {getattr(tokenizer, name, None) for name in ("eos_token_id", "pad_token_id")} - {None}
    text = []
    for token in ids.tolist():
        if token in ends:
            break
        text.append(token)
    return text


def training_example(
    packed: PackedImages, input_ids: torch.Tensor, boxes: Sequence[Sequence[float]], *, index: int, tokenizer: Any
) -> dict[str, Any]:
    """One image-text example as the collate function takes it, from whichever reader decoded it.

    Args:
        packed: the image's patches, one grid row.
        input_ids: :math:`(1 + R, L)` token ids of the caption, then of each region's text.
        boxes: ``R`` region boxes ``(x0, y0, x1, y1)`` in ``[0, 1]``.
        index: the sample's index in its epoch (seeds its per-image random streams).
        tokenizer: the tokenizer that made ``input_ids`` (its EOS / padding ids end each text).

    Returns:
        ``patches`` (float32), ``grid_thw``, ``input_ids`` (the caption's), ``index``, ``caption_ids`` and
        ``regions`` (a ``(box [4] float64, text ids)`` pair per region).
    """
    return {
        "patches": packed.patches.float(),
        "grid_thw": packed.grid_thw,
        "input_ids": input_ids[0],
        "index": index,
        "caption_ids": _text_ids(input_ids[0], tokenizer),
        "regions": [
            (torch.tensor(box, dtype=torch.float64), _text_ids(ids, tokenizer))
            for box, ids in zip(boxes, input_ids[1:], strict=True)
        ],
    }


class ImageTextDataset(Dataset):
    """Preprocessed ``(image, caption)`` pairs; runs in the ``DataLoader`` workers.

    Args:
        records: the pairs (see :func:`read_manifest`).
        tokenizer: maps a list of captions to :math:`(n, L)` token ids (e.g. :class:`ByteTokenizer` or
            :class:`~kornia_siglip2.tokenizer.SigLipTokenizer`).
        patch_size: patch side :math:`p` of the model.
        max_num_patches: the default NaFlex patch budget of an image; the sampler may choose another per image.
        loader: reads an image path into a :math:`(C, H, W)` tensor (default:
            :func:`kornia_siglip2.images.load_image`, RGB ``uint8``, the pixels inference reads).

    Items are indexed by ``index`` or by ``(index, max_num_patches)`` (what :class:`TokenBudgetBatchSampler`
    yields) and are dicts with ``patches`` :math:`(t, p \\cdot p \\cdot C)` float32, ``grid_thw`` :math:`(1, 3)`,
    ``input_ids`` :math:`(L,)`, ``index``, and for LocCa ``caption_ids`` (the caption's ids up to the first
    EOS / padding id) and ``regions`` (a list of ``(box (4,), text ids)``).
    """

    def __init__(
        self,
        records: Sequence[ImageTextRecord],
        tokenizer: Callable[[list[str]], torch.Tensor],
        patch_size: int = 16,
        max_num_patches: int = 256,
        loader: Callable[[Path], torch.Tensor] = load_image,
    ) -> None:
        check(len(records) > 0, "records must hold at least one image-caption pair.")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.patch_size = int(patch_size)
        self.max_num_patches = int(max_num_patches)
        self.loader = loader
        self._preprocessors: dict[int, NaFlexImagePreprocessor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image, read from its file's header (Pillow reads no pixels).

        A size the manifest gives must agree: the token budget is only kept if the sampler counts the tokens the
        images really have.

        Raises:
            ValueError: an image that cannot be opened, or whose size disagrees with the manifest (both named).
        """
        sizes = []
        for record in self.records:
            try:
                size = image_size(record.image)
            except Exception as error:  # Pillow raises its own types for files that are not images
                raise ValueError(f"Cannot read the size of image {record.where}: {error}") from error
            check(
                record.size is None or tuple(record.size) == size,
                lambda record=record, size=size: (
                    f"Image {record.where}: the manifest gives height x width {record.size[0]} x {record.size[1]}, "
                    f"the file is {size[0]} x {size[1]}: fix the manifest (or drop width / height: sizes are read "
                    "from the files)."
                ),
            )
            sizes.append(size)
        return sizes

    def _preprocessor(self, max_num_patches: int) -> NaFlexImagePreprocessor:
        if max_num_patches not in self._preprocessors:
            self._preprocessors[max_num_patches] = NaFlexImagePreprocessor(self.patch_size, max_num_patches)
        return self._preprocessors[max_num_patches]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, max_num_patches = key if isinstance(key, tuple) else (key, self.max_num_patches)
        record = self.records[index]
        try:
            image = self.loader(record.image)
        except Exception as error:  # the message must say which image of which manifest line
            # the decoder's message names the file already (images.load_image); add the manifest line
            named = str(record.image) in str(error)
            message = f"{record.origin}: {error}" if named else f"Cannot read image {record.where}: {error}"
            try:
                renamed = type(error)(message)  # the same kind of error (OSError, DecompressionBombError, ...)
            except Exception:
                renamed = OSError(message)
            raise renamed from error
        with torch.no_grad():
            packed = self._preprocessor(max_num_patches)(image[None] if image.ndim == 3 else image)
        input_ids = self.tokenizer([record.caption, *(region.text for region in record.regions)])
        boxes = [region.box for region in record.regions]
        return training_example(packed, input_ids, boxes, index=index, tokenizer=self.tokenizer)


@dataclass
class PackedBatch:
    """A packed training batch: the images with no padding token, their captions and dataset indices.

    Attributes:
        images: :class:`~kornia_siglip2.packing.PackedImages` of the :math:`n` images.
        input_ids: :math:`(n, L)` token ids; row ``i`` is the caption of image ``i``.
        indices: :math:`(n,)` dataset indices.
        caption_ids: per image, the caption's text ids without EOS or padding (LocCa targets).
        regions: per image, its ``(box (4,), text ids)`` regions (LocCa targets; empty lists without regions).
    """

    images: PackedImages
    input_ids: torch.Tensor
    indices: torch.Tensor
    caption_ids: list[list[int]] = field(default_factory=list)
    regions: list[list[tuple[torch.Tensor, list[int]]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Patch tokens of the batch (all real: there is no padding; the kept ones when tokens are dropped)."""
        return self.images.patches.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move to ``device``, casting the patches to ``dtype`` if given."""
        images = self.images.to(device=device, dtype=dtype) if dtype else self.images.to(device)
        return PackedBatch(images, self.input_ids.to(device), self.indices.to(device), self.caption_ids, self.regions)


def collate_packed(items: Sequence[dict[str, Any]]) -> PackedBatch:
    """Concatenate dataset items (see :class:`ImageTextDataset`) into one :class:`PackedBatch`.

    Example:
        >>> items = [{"patches": torch.rand(t, 12), "grid_thw": torch.tensor([[1, 1, t]]),
        ...           "input_ids": torch.zeros(4, dtype=torch.long), "index": i} for i, t in enumerate((2, 3))]
        >>> batch = collate_packed(items)
        >>> batch.num_tokens, batch.images.grid_thw.tolist(), batch.input_ids.shape
        (5, [[1, 1, 2], [1, 1, 3]], torch.Size([2, 4]))
    """
    check(len(items) > 0, "collate_packed needs at least one item.")
    images = PackedImages(
        torch.cat([item["patches"] for item in items]), torch.cat([item["grid_thw"] for item in items])
    )
    input_ids = torch.stack([item["input_ids"] for item in items])
    indices = torch.tensor([item["index"] for item in items], dtype=torch.long)
    caption_ids = [list(item.get("caption_ids", ())) for item in items]
    regions = [list(item.get("regions", ())) for item in items]
    return PackedBatch(images, input_ids, indices, caption_ids, regions)


def drop_tokens(batch: PackedBatch, token_drop: float, *, epoch: int, seed: int) -> PackedBatch:
    """Keep a random :func:`num_kept_tokens` subset of every frame's patches (NaViT token dropping).

    Every image draws from its own generator (:func:`sample_generator` of ``(seed, epoch, index)``): the subset
    does not depend on the rank, the batch or the position in it, so a resumed or re-sharded run drops the same
    patches. The kept patches stay in grid order; ``grid_thw`` keeps the full grids and the result's
    :attr:`~kornia_siglip2.packing.PackedImages.keep_mask` says which patches are present (see
    :class:`~kornia_siglip2.vision.VisionTransformer`).

    Args:
        batch: a batch of full grids from :func:`collate_packed`.
        token_drop: fraction of each frame's patches to drop, in :math:`[0, 1)`; ``0`` returns ``batch`` as is.
        epoch: the epoch of the batch.
        seed: the run's seed.

    Returns:
        the batch with :math:`N' = \\sum_f` ``num_kept_tokens(h_f w_f, token_drop)`` patches
        :math:`(N', p \\cdot p \\cdot C)` and ``keep_mask`` :math:`(\\sum t h w,)`.

    Raises:
        ValueCheckError: ``token_drop`` outside :math:`[0, 1)`, or a batch whose tokens are already dropped.

    Example:
        >>> items = [{"patches": torch.rand(t, 12), "grid_thw": torch.tensor([[1, 1, t]]),
        ...           "input_ids": torch.zeros(4, dtype=torch.long), "index": i} for i, t in enumerate((4, 3))]
        >>> dropped = drop_tokens(collate_packed(items), 0.5, epoch=0, seed=0)
        >>> dropped.num_tokens, dropped.images.keep_mask.sum().item(), dropped.images.grid_thw.tolist()
        (4, 4, [[1, 1, 4], [1, 1, 3]])
    """
    check(0.0 <= token_drop < 1.0, lambda: f"token_drop must be in [0, 1), got {token_drop}.")
    images = batch.images
    check(images.keep_mask is None, "drop_tokens got a batch whose tokens are already dropped (keep_mask is set).")
    if token_drop == 0.0:
        return batch
    masks = []
    for (frames, height, width), index in zip(images.grid_thw.tolist(), batch.indices.tolist(), strict=True):
        generator = sample_generator(seed, epoch, index, _TOKEN_DROP_STREAM)
        kept = num_kept_tokens(height * width, token_drop)
        for _ in range(frames):
            mask = torch.zeros(height * width, dtype=torch.bool)
            mask[torch.randperm(height * width, generator=generator)[:kept]] = True
            masks.append(mask)
    keep_mask = torch.cat(masks).to(images.patches.device)
    dropped = PackedImages(images.patches[keep_mask], images.grid_thw, keep_mask)
    return PackedBatch(dropped, batch.input_ids, batch.indices, batch.caption_ids, batch.regions)


Batch = list[tuple[int, int]]


class TokenBudgetBatchSampler(Sampler[Batch]):
    """Batches of ``(index, max_num_patches)`` whose NaFlex tokens sum to at most ``token_budget``.

    Each epoch the images are shuffled (a generator seeded from ``seed`` and the epoch), each is given a patch
    budget (``max_num_patches``, or one of several drawn per image, as timm's NaFlex loader varies the
    sequence length), and they are packed greedily: an image goes into the first of up to ``max_open_batches``
    open batches it fits in, else opens a new one; when too many are open, the fullest is emitted.

    Distributed, every rank computes the same plan and takes batches ``rank, rank + W, ...``. If the number of
    batches is not a multiple of ``W``, the batches with the most images are split in two (splitting never
    exceeds the budget) until it is, so every rank takes the same number of steps and each image is used exactly
    once per epoch across the ranks (the distributed sigmoid loss accepts the uneven ``n_local``).

    With ``token_drop`` an image counts only the tokens it keeps (:func:`num_kept_tokens`) against the
    budget, so more images fill a batch; apply :func:`drop_tokens` with the same rate to the collated batch.

    Args:
        sizes: ``(height, width)`` of every image (:meth:`ImageTextDataset.sizes`).
        token_budget: most patch tokens of a batch on one rank.
        patch_size: patch side :math:`p`.
        max_num_patches: patch budget of an image, or a sequence of budgets to draw from per image.
        num_replicas: number of ranks :math:`W`.
        rank: this rank.
        seed: seed of the shuffling and of the budget draws.
        shuffle: shuffle each epoch (else manifest order).
        max_open_batches: open batches the greedy packing keeps (more: fuller batches, more reordering).
        token_drop: fraction of every image's tokens :func:`drop_tokens` drops, in :math:`[0, 1)`; the budget
            counts the kept ones (``0``: no dropping, the same plan as without).

    Raises:
        ValueCheckError: a non-positive budget, a rank outside ``[0, W)``, an image budget above
            ``token_budget`` (in kept tokens), fewer images than ranks, or ``token_drop`` outside ``[0, 1)``.

    Example:
        >>> sampler = TokenBudgetBatchSampler([(64, 64)] * 5 + [(32, 64)] * 3, token_budget=40, patch_size=16,
        ...                                   max_num_patches=16, num_replicas=2, rank=0, seed=0)
        >>> [sum(sampler.num_tokens(item) for item in batch) <= 40 for batch in sampler]
        [True, True]
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        token_budget: int,
        patch_size: int = 16,
        max_num_patches: int | Sequence[int] = 256,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        max_open_batches: int = 8,
        token_drop: float = 0.0,
    ) -> None:
        choices = (max_num_patches,) if isinstance(max_num_patches, int) else tuple(max_num_patches)
        check(token_budget >= 1, lambda: f"token_budget must be positive, got {token_budget}.")
        check(num_replicas >= 1 and 0 <= rank < num_replicas, lambda: f"rank {rank} not in [0, {num_replicas}).")
        check(len(choices) > 0 and min(choices) >= 1, lambda: f"max_num_patches must be positive: {choices}.")
        check(0.0 <= token_drop < 1.0, lambda: f"token_drop must be in [0, 1), got {token_drop}.")
        check(
            num_kept_tokens(max(choices), token_drop) <= token_budget,
            lambda: (
                f"max_num_patches {max(choices)} exceeds token_budget {token_budget}"
                f"{f' (keeping {num_kept_tokens(max(choices), token_drop)})' if token_drop else ''}: raise the budget."
            ),
        )
        check(
            len(sizes) >= num_replicas,
            lambda: f"{len(sizes)} images cannot give each of {num_replicas} ranks a batch.",
        )
        check(max_open_batches >= 1, lambda: f"max_open_batches must be positive, got {max_open_batches}.")
        self.sizes = [(int(height), int(width)) for height, width in sizes]
        self.token_budget = int(token_budget)
        self.patch_size = int(patch_size)
        self.choices = choices
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.max_open_batches = int(max_open_batches)
        self.token_drop = float(token_drop)
        self.epoch = 0
        self.start_batch = 0
        self._plan_cache: tuple[int, list[Batch]] | None = None

    def num_tokens(self, item: tuple[int, int]) -> int:
        """Tokens of one ``(index, max_num_patches)`` item (the kept ones with ``token_drop``)."""
        height, width = self.sizes[item[0]]
        tokens = naflex_num_tokens(height, width, self.patch_size, item[1])
        return num_kept_tokens(tokens, self.token_drop) if self.token_drop else tokens

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use the plan of ``epoch`` and start at this rank's batch ``start_batch`` (a resumed run)."""
        check(0 <= start_batch <= self._rank_length(epoch), lambda: f"start_batch {start_batch} out of range.")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def plan(self, epoch: int | None = None) -> list[Batch]:
        """Every batch of the epoch, all ranks together: rank ``r`` takes ``plan[r::W]``."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._build_plan(epoch))
        return self._plan_cache[1]

    def _build_plan(self, epoch: int) -> list[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        count = len(self.sizes)
        order = torch.randperm(count, generator=generator).tolist() if self.shuffle else list(range(count))
        picks = torch.randint(len(self.choices), (count,), generator=generator).tolist()
        batches: list[Batch] = []
        open_batches: list[tuple[list[tuple[int, int]], int]] = []  # (items, tokens)
        for index in order:
            item = (index, self.choices[picks[index]])
            tokens = self.num_tokens(item)
            for position, (items, used) in enumerate(open_batches):
                if used + tokens <= self.token_budget:
                    items.append(item)
                    open_batches[position] = (items, used + tokens)
                    break
            else:
                open_batches.append(([item], tokens))
                if len(open_batches) > self.max_open_batches:
                    fullest = max(range(len(open_batches)), key=lambda position: open_batches[position][1])
                    batches.append(open_batches.pop(fullest)[0])
        # the batches still open at the end: repack their images first-fit decreasing into as few as possible
        tail = sorted((item for items, _ in open_batches for item in items), key=self.num_tokens, reverse=True)
        tail_batches: list[tuple[list[tuple[int, int]], int]] = []
        for item in tail:
            tokens = self.num_tokens(item)
            for position, (items, used) in enumerate(tail_batches):
                if used + tokens <= self.token_budget:
                    items.append(item)
                    tail_batches[position] = (items, used + tokens)
                    break
            else:
                tail_batches.append(([item], tokens))
        batches.extend(items for items, _ in tail_batches)
        # split the batches with the most images until every rank has as many batches
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda position: (len(batches[position]), position))
            items = batches[largest]
            check(len(items) > 1, "Too few images to give every rank a batch: lower token_budget.")
            batches[largest : largest + 1] = [items[: len(items) // 2], items[len(items) // 2 :]]
        return batches

    def _rank_length(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.num_replicas

    def __len__(self) -> int:
        return self._rank_length(self.epoch) - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        mine = self.plan()[self.rank :: self.num_replicas]
        yield from (list(batch) for batch in mine[self.start_batch :])

    def fill(self, epoch: int | None = None) -> float:
        """Mean fraction of ``token_budget`` the batches of an epoch use (all ranks; kept tokens)."""
        plan = self.plan(epoch)
        return sum(sum(self.num_tokens(item) for item in batch) for batch in plan) / (len(plan) * self.token_budget)

    def state_dict(self) -> dict[str, int]:
        """Epoch and start batch (the training loop stores the position it consumed up to)."""
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        check_type(isinstance(state, dict), "state must be a dict from TokenBudgetBatchSampler.state_dict().")
        check(int(state["seed"]) == self.seed, lambda: f"checkpoint seed {state['seed']} != sampler seed {self.seed}.")
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
