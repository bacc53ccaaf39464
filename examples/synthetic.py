"""Reusable parts of the synthetic SigLIP 2 training example: data, word tokenizer, model, training, evaluation.

Everything is generated: images of one coloured shape on a dark, noisy background, captioned
``"<size> <colour> <shape>"`` (e.g. ``"small red circle"``), with the box of what was drawn. A word-level
tokenizer maps the few words to ids, so nothing is downloaded. ``train_synthetic.py`` is the command line;
``tests/test_losses_siglip2.py`` imports this file to run a shortened training.

This lives in ``examples/`` rather than in the package: it is teaching material (a toy data set and a toy
tokenizer), not library API, and the wheel should not ship it. Import it with ``examples/`` on ``sys.path``
(a script run from ``examples/`` has it) or load it by path.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kornia_siglip2 import SigLip2, SigLip2Config, TextConfig, VisionConfig
from kornia_siglip2.decoders import LocCaTargets, LocCaVocabulary, generate_boxes, generate_captions
from kornia_siglip2.losses.siglip2 import LOSS_TERMS, SigLip2Loss, SigLip2LossSchedule
from kornia_siglip2.packing import pack_inputs

__all__ = [
    "CAPTIONS",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "WORDS",
    "EvalResult",
    "ShapesBatch",
    "TrainConfig",
    "TrainResult",
    "WordTokenizer",
    "build_loss",
    "build_model",
    "evaluate",
    "make_shapes",
    "train",
    "window_means",
]

#: Shape colours (RGB in [0, 1]): bright, so that they stand out from the dark backgrounds.
COLOURS = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "purple": (0.75, 0.2, 0.95),
    "cyan": (0.15, 0.9, 0.95),
}
SHAPES = ("circle", "square", "triangle")
#: Side ranges in pixels of a 32-pixel image, ``[low, high)``; scaled with the image size. Disjoint, so the
#: size word is never ambiguous.
SIZES = {"small": (7, 12), "large": (17, 27)}
#: Every caption, in class order: size, colour, shape.
CAPTIONS = tuple(" ".join(words) for words in itertools.product(SIZES, COLOURS, SHAPES))
#: The word-level vocabulary; ids 0 and 1 are padding and end-of-sequence (the LocCa layout's defaults).
WORDS = ("<pad>", "<eos>", *SIZES, *COLOURS, *SHAPES)


class WordTokenizer:
    """Word-level tokenizer over a fixed word list: one id per word, then EOS, then padding.

    SigLIP tokenizes with ``padding="max_length"`` and pools the last position, so every sequence has the
    same length.

    Args:
        words: the vocabulary; ``words[0]`` is padding, ``words[1]`` end-of-sequence.
        max_length: length :math:`L` of :meth:`encode`'s rows.

    Example:
        >>> tokenizer = WordTokenizer(max_length=6)
        >>> tokenizer.encode(["small red circle"]).tolist()
        [[2, 4, 10, 1, 0, 0]]
        >>> tokenizer.decode([2, 4, 10, 1, 0, 0])
        'small red circle'
    """

    def __init__(self, words: Sequence[str] = WORDS, max_length: int = 8) -> None:
        self.words = tuple(words)
        self.index = {word: position for position, word in enumerate(self.words)}
        self.max_length = max_length
        self.pad_token_id, self.eos_token_id = 0, 1

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.words)

    def ids(self, text: str) -> list[int]:
        """Word ids of ``text`` without EOS or padding (the form LocCa targets take).

        Raises:
            KeyError: a word is not in the vocabulary.
        """
        return [self.index[word] for word in text.split()]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """int64 :math:`(B, L)` ids: words, EOS, padding.

        Raises:
            ValueError: a text does not fit in ``max_length`` with its EOS.
        """
        rows = []
        for text in texts:
            ids = [*self.ids(text), self.eos_token_id]
            if len(ids) > self.max_length:
                raise ValueError(f"{text!r} needs {len(ids)} ids, more than max_length {self.max_length}.")
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first EOS, without padding."""
        words = []
        for token in ids:
            if token == self.eos_token_id:
                break
            if token != self.pad_token_id:
                words.append(self.words[token])
        return " ".join(words)


@dataclass
class ShapesBatch:
    """Generated images with their captions and boxes.

    Attributes:
        images: :math:`(B, 3, S, S)` in :math:`[-1, 1]` (SigLIP's normalization: mean 0.5, std 0.5).
        captions: :math:`B` captions, e.g. ``"small red circle"``.
        boxes: :math:`(B, 4)` normalized ``xyxy`` box of the shape.
        labels: int64 :math:`(B,)` index of each caption in :data:`CAPTIONS`.
    """

    images: torch.Tensor
    captions: list[str]
    boxes: torch.Tensor
    labels: torch.Tensor


def make_shapes(
    num_images: int, generator: torch.Generator, image_size: int = 32, distinct: bool = False
) -> ShapesBatch:
    """Draw ``num_images`` images, each one shape of a random size, colour, kind and place.

    Backgrounds are a random dark colour (each channel in [0, 0.4]) with Gaussian noise (std 0.04), so that
    colour alone does not separate shape from background everywhere and the model must find the object.

    Args:
        num_images: batch size :math:`B`.
        generator: CPU random source (reproducible data).
        image_size: side :math:`S` in pixels.
        distinct: draw distinct captions (``B`` at most ``len(CAPTIONS)``): a batch then has no second image
            with the same caption, which the sigmoid loss would score as a negative pair.

    Returns:
        :class:`ShapesBatch`.

    Raises:
        ValueError: ``distinct`` with more images than captions.

    Example:
        >>> batch = make_shapes(4, torch.Generator().manual_seed(0), distinct=True)
        >>> batch.images.shape, len(set(batch.captions)), bool((batch.boxes[:, 2:] > batch.boxes[:, :2]).all())
        (torch.Size([4, 3, 32, 32]), 4, True)
    """
    if distinct:
        if num_images > len(CAPTIONS):
            raise ValueError(f"distinct needs num_images <= {len(CAPTIONS)}, got {num_images}.")
        labels = torch.randperm(len(CAPTIONS), generator=generator)[:num_images]
    else:
        labels = torch.randint(len(CAPTIONS), (num_images,), generator=generator)
    scale = image_size / 32
    coordinates = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    ys, xs = torch.meshgrid(coordinates, coordinates, indexing="ij")
    images = torch.rand(num_images, 3, 1, 1, generator=generator) * 0.4
    images = images + 0.04 * torch.randn(num_images, 3, image_size, image_size, generator=generator)
    boxes, captions = [], []
    for index, label in enumerate(labels.tolist()):
        caption = CAPTIONS[label]
        size_word, colour, shape = caption.split()
        low, high = SIZES[size_word]
        side = float(torch.randint(round(low * scale), round(high * scale), (1,), generator=generator))
        left, top = (torch.rand(2, generator=generator) * (image_size - side)).tolist()
        if shape == "square":
            inside = (xs >= left) & (xs < left + side) & (ys >= top) & (ys < top + side)
        elif shape == "circle":
            inside = (xs - left - side / 2) ** 2 + (ys - top - side / 2) ** 2 <= (side / 2) ** 2
        else:  # upright isosceles triangle filling its box
            depth = (ys - top) / side
            inside = (depth >= 0) & (depth <= 1) & ((xs - left - side / 2).abs() <= depth * side / 2)
        images[index, :, inside] = torch.tensor(COLOURS[colour])[:, None]
        boxes.append([left / image_size, top / image_size, (left + side) / image_size, (top + side) / image_size])
        captions.append(caption)
    images = images.clamp(0, 1) * 2 - 1
    return ShapesBatch(images, captions, torch.tensor(boxes).clamp(0, 1), labels)


def build_model(
    tokenizer: WordTokenizer, image_size: int = 32, patch_size: int = 4, width: int = 64, layers: int = 2
) -> SigLip2:
    """A tiny fixed-resolution SigLIP 2, randomly initialised: both towers ``width`` wide, ``layers`` deep.

    Example:
        >>> model = build_model(WordTokenizer())
        >>> sum(p.numel() for p in model.parameters()) < 300_000
        True
    """
    heads = max(1, width // 16)
    config = SigLip2Config(
        model_type="siglip",  # SigLIP 2 fixed resolution: the setting SILC / TIPS were trained in
        vision_config=VisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch_size,
            image_size=image_size,
        ),
        text_config=TextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.max_length,
            projection_size=width,
            pad_token_id=tokenizer.pad_token_id,
        ),
    )
    return SigLip2(config)


def build_loss(
    model: SigLip2,
    vocabulary: LocCaVocabulary,
    distill_start: float = 0.8,
    size_factor: float = 0.25,
    num_local_views: int = 8,
    seed: int = 0,
) -> SigLip2Loss:
    """The full SigLIP 2 loss with small self-distillation heads (128 hidden, 32 bottleneck, 256 prototypes)."""
    schedule = SigLip2LossSchedule(size_factor=size_factor, distill_start=distill_start)
    options = dict(hidden_dim=128, bottleneck_dim=32, num_prototypes=256, num_local_views=num_local_views, seed=seed)
    return SigLip2Loss.from_model(model, vocabulary, schedule, distillation_options=options)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (the defaults are the documented full run).

    Attributes:
        steps: optimizer steps.
        batch_size: images per step, each with a distinct caption (at most ``len(CAPTIONS)``).
        learning_rate: AdamW peak learning rate, after a linear warmup, then cosine decay to 10 %.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of the steps spent warming up.
        distill_start: progress at which SILC / TIPS switch on (SigLIP 2: 0.8).
        size_factor: factor on the self-distillation weights (0.25, B's: the smallest SigLIP 2 size).
        image_size: image side in pixels.
        patch_size: patch side in pixels.
        width: width of both towers.
        layers: depth of both towers (the LocCa decoder has half).
        num_local_views: SILC local views per image (SigLIP 2: 8).
        num_bins: LocCa box-coordinate bins.
        seed: seed of the model, the data and the views.
        device: where to train.
        threads: CPU threads during training (restored afterwards), ``None`` to leave torch's setting; one
            thread is fastest for ops this small, and much faster than two on cores shared with other jobs.
        log_every: steps between printed log lines (0: silent).
    """

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    distill_start: float = 0.8
    size_factor: float = 0.25
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 2
    num_local_views: int = 8
    num_bins: int = 32
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    log_every: int = 100


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (eval mode).
        loss_fn: the :class:`~kornia_siglip2.losses.siglip2.SigLip2Loss` with its LocCa decoder and teacher.
        tokenizer: the word tokenizer.
        vocabulary: the LocCa token layout.
        history: per step: ``step``, ``progress``, ``loss`` and each term of :data:`LOSS_TERMS`
            (``nan`` where a term was not computed, before the switch), and ``seconds`` since the start.
        seconds: wall time of the training loop.
    """

    model: SigLip2
    loss_fn: SigLip2Loss
    tokenizer: WordTokenizer
    vocabulary: LocCaVocabulary
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def train(config: TrainConfig, log: Callable[[str], None] | None = print) -> TrainResult:
    """Train a tiny SigLIP 2 from scratch with the full SigLIP 2 loss on freshly generated batches.

    Args:
        config: hyper-parameters.
        log: called with a line every ``config.log_every`` steps; ``None`` for silence.

    Returns:
        :class:`TrainResult`.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, log)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, log: Callable[[str], None] | None) -> TrainResult:
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    tokenizer = WordTokenizer()
    vocabulary = LocCaVocabulary(tokenizer.vocab_size, config.num_bins, tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = build_model(tokenizer, config.image_size, config.patch_size, config.width, config.layers).to(device)
    loss_fn = build_loss(
        model, vocabulary, config.distill_start, config.size_factor, config.num_local_views, config.seed
    ).to(device)
    # the teacher's parameters are frozen (requires_grad=False): only the student side is optimized
    parameters = [*model.parameters(), *(p for p in loss_fn.parameters() if p.requires_grad)]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]  # biases, norms, logit scale/bias, mask token
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    warmup = max(1, round(config.warmup_fraction * config.steps))

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))
        return 0.1 + 0.9 * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    data_generator = torch.Generator().manual_seed(config.seed)
    targets_generator = torch.Generator().manual_seed(config.seed + 1)
    history: dict[str, list[float]] = {key: [] for key in ("step", "progress", "loss", *LOSS_TERMS, "seconds")}
    model.train()
    loss_fn.train()
    start = time.perf_counter()
    for step in range(config.steps):
        progress = step / config.steps
        batch = make_shapes(config.batch_size, data_generator, config.image_size, distinct=True)
        ids = [tokenizer.ids(caption) for caption in batch.captions]
        # one shape per image: the region caption of the referring / grounded tasks is the caption itself
        targets = LocCaTargets.build(
            ids, ids, batch.boxes, vocabulary, tokenizer.max_length, generator=targets_generator, device=device
        )
        output = loss_fn(
            model,
            tokenizer.encode(batch.captions).to(device),
            targets,
            progress=progress,
            images=batch.images.to(device),
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        scheduler.step()
        loss_fn.update_teacher(model)

        history["step"].append(step)
        history["progress"].append(progress)
        history["loss"].append(output.loss.item())
        for name, value in output.terms().items():
            computed = output.distillation_active or name in ("sigmoid", "locca")
            history[name].append(value.item() if computed else math.nan)
        history["seconds"].append(time.perf_counter() - start)
        if log is not None and config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
            terms = "  ".join(f"{name} {history[name][-1]:7.4f}" for name in LOSS_TERMS)
            log(f"step {step:5d}  progress {progress:.3f}  loss {output.loss.item():7.4f}  {terms}")
    seconds = time.perf_counter() - start
    return TrainResult(model.eval(), loss_fn.eval(), tokenizer, vocabulary, history, seconds)


@dataclass
class EvalResult:
    """Zero-shot results on held-out generated images.

    Attributes:
        retrieval_accuracy: top-1 accuracy of image -> caption retrieval among the held-out captions.
        chance: accuracy of a uniform guess, ``1 / num_captions``.
        num_images: held-out images.
        num_captions: distinct held-out captions ranked for each image.
        caption_accuracy: fraction of greedy LocCa captions equal to the true caption.
        box_iou: mean IoU of the LocCa referring-expression box (given the caption) with the true box.
    """

    retrieval_accuracy: float
    chance: float
    num_images: int
    num_captions: int
    caption_accuracy: float
    box_iou: float


@torch.no_grad()
def evaluate(result: TrainResult, num_images: int = 720, seed: int = 12345, batch_size: int = 240) -> EvalResult:
    """Zero-shot retrieval (and LocCa decoding) on images the model never saw, from a separate seed.

    Each image is scored against every distinct caption of the held-out set by the model's sigmoid logits;
    the top-1 caption is correct when it is the image's caption.

    Args:
        result: the output of :func:`train`.
        num_images: held-out images.
        seed: seed of the held-out data (different from every training seed used here).
        batch_size: images per forward.

    Returns:
        :class:`EvalResult`.
    """
    model, tokenizer, vocabulary = result.model, result.tokenizer, result.vocabulary
    decoder = result.loss_fn.locca.decoder
    device = next(model.parameters()).device
    image_size = model.config.vision_config.image_size
    held_out = make_shapes(num_images, torch.Generator().manual_seed(seed), image_size)
    captions = sorted(set(held_out.captions))
    text_embeds = model.encode_text(tokenizer.encode(captions).to(device), normalize=True)
    correct = generated_correct = 0
    ious = []
    for start in range(0, num_images, batch_size):
        images = held_out.images[start : start + batch_size].to(device)
        truth = held_out.captions[start : start + batch_size]
        packed = pack_inputs(images, patch_size=model.patch_size, drop_remainder=not model.config.is_naflex)
        vision = model.get_image_features(packed)  # packed in, packed out: tokens (N, D) and cu_seqlens
        image_embeds = torch.nn.functional.normalize(vision.pooler_output, dim=-1)
        best = model.logits(image_embeds, text_embeds).argmax(0).tolist()  # logits are (captions, images)
        correct += sum(captions[index] == caption for index, caption in zip(best, truth, strict=True))
        tokens, cu_seqlens = vision.last_hidden_state, vision.cu_seqlens
        generated = generate_captions(decoder, vocabulary, tokens, cu_seqlens)
        generated_correct += sum(
            tokenizer.decode(ids) == caption for ids, caption in zip(generated, truth, strict=True)
        )
        boxes = generate_boxes(decoder, vocabulary, tokens, cu_seqlens, [tokenizer.ids(c) for c in truth])
        ious.append(_box_iou(boxes.cpu(), held_out.boxes[start : start + batch_size]))
    return EvalResult(
        retrieval_accuracy=correct / num_images,
        chance=1 / len(captions),
        num_images=num_images,
        num_captions=len(captions),
        caption_accuracy=generated_correct / num_images,
        box_iou=torch.cat(ious).mean().item(),
    )


def window_means(history: dict[str, list[float]], name: str, window: int) -> tuple[float, float]:
    """Mean of the first and of the last ``window`` computed values of a term (``nan`` steps skipped).

    Example:
        >>> window_means({"masked": [math.nan, math.nan, 4.0, 3.0, 2.0, 1.0]}, "masked", 2)
        (3.5, 1.5)
    """
    values = [value for value in history[name] if not math.isnan(value)]
    if len(values) < 2 * window:
        raise ValueError(f"{name} has {len(values)} computed values, fewer than two windows of {window}.")
    return sum(values[:window]) / window, sum(values[-window:]) / window


def _box_iou(boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two :math:`(B, 4)` ``xyxy`` boxes."""
    low = torch.maximum(boxes[:, :2], reference[:, :2])
    high = torch.minimum(boxes[:, 2:], reference[:, 2:])
    intersection = (high - low).clamp(min=0).prod(-1)
    union = (boxes[:, 2:] - boxes[:, :2]).prod(-1) + (reference[:, 2:] - reference[:, :2]).prod(-1) - intersection
    return intersection / union.clamp(min=1e-12)
