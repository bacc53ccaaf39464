"""The multi-process training recipe: packed NaFlex batches, DDP or FSDP2, the sigmoid or full SigLIP 2 loss.

Run it with ``torchrun`` (one process per device; a single process without it)::

    torchrun --nproc_per_node 2 -m kornia_siglip2.train --data manifest.jsonl --out runs/a --parallel ddp

Each rank reads its share of every epoch from :class:`~kornia_siglip2.training.data.TokenBudgetBatchSampler`
(a token budget per rank and micro-batch, no padding), encodes it with the model wrapped in DDP or FSDP2
(``fully_shard`` on every encoder block, then on the model), and scores its images against the texts of every
rank (:func:`~kornia_siglip2.losses.sigmoid_loss` with ``distributed="all_gather"`` or ``"ring"``). Each rank's
loss is weighted by :math:`W n_r / n` so that the gradients the wrappers average are those of the dense loss on
the global batch, also with uneven ``n_r``. Gradient accumulation averages the micro-batch losses (negatives come
from the micro-batch, as open_clip accumulates). The learning rate warms up linearly and decays with a cosine;
metrics go to the terminal and to ``metrics.jsonl`` on rank 0; checkpoints are resumable
(:mod:`kornia_siglip2.training.checkpoint`); the final model is written with ``save_pretrained``.

``--objective siglip2`` trains the full SigLIP 2 objective instead
(:class:`~kornia_siglip2.losses.siglip2.SigLip2Loss`: sigmoid + LocCa, SILC + TIPS self-distillation from
``distill_start`` of the steps on), wrapped with the model in one
:class:`~kornia_siglip2.training.objective.SigLip2Objective`. Every term is a mean over images, so the same
:math:`W n_r / n` weight makes each of them the global batch's; the teacher centers average the teacher
outputs of all ranks; the random views, masks and LocCa draws come from each image's index and epoch. Under
FSDP2 the EMA teacher is sharded like the student, so that its EMA update is local to each shard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from kornia_siglip2.config import SigLip2Config, validate_hf_config
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import check
from kornia_siglip2.locks import exclusive_lock
from kornia_siglip2.losses.distill.ema import EMATeacher
from kornia_siglip2.losses.siglip2 import LOSS_TERMS, SigLip2Loss, SigLip2LossSchedule
from kornia_siglip2.losses.sigmoid import SigmoidLoss, sigmoid_loss
from kornia_siglip2.model import SigLip2
from kornia_siglip2.packing import PackedImages
from kornia_siglip2.training.checkpoint import (
    find_resume_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from kornia_siglip2.training.data import (
    ByteTokenizer,
    ImageTextDataset,
    PackedBatch,
    TokenBudgetBatchSampler,
    collate_packed,
    drop_tokens,
    read_manifest,
)
from kornia_siglip2.training.objective import SigLip2Objective, distillation_inputs, locca_targets
from kornia_siglip2.training.shards import is_shard_data, parse_sources
from kornia_siglip2.training.stream import SKIP_REASONS, Cursor, ShardStream, StreamFeed, StreamSpec

__all__ = [
    "OBJECTIVES",
    "PARALLEL_MODES",
    "PRECISIONS",
    "ContrastiveForward",
    "RecipeConfig",
    "build_objective",
    "build_model",
    "parameter_groups",
    "retrieval_metrics",
    "main",
    "run_lock",
    "train",
    "warmup_cosine",
    "wrap_model",
]

PARALLEL_MODES = ("none", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16", "fp64")
OBJECTIVES = ("sigmoid", "siglip2")
CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class RecipeConfig:
    """Everything a run needs; the command-line flags of ``python -m kornia_siglip2.train`` are its fields.

    Attributes:
        data: tar shards by brace pattern (``'shards/train-{000000..000099}.tar'``, local or an fsspec URL such as
            ``s3://...``; several sources joined with ``::``, see :mod:`~kornia_siglip2.training.stream`), or for small
            local data a manifest (JSONL / CSV) or an image folder (see
            :func:`~kornia_siglip2.training.data.read_manifest`).
        out: run folder: ``metrics.jsonl``, ``run.json``, ``checkpoints/``, ``final/`` (``save_pretrained`` layout).
        data_weights: with tar shards, ``::``-separated sampling weights of the ``::``-separated sources (a
            mixture; needs ``data_resampled``).
        data_resampled: with tar shards, draw shards with replacement (by source weight, then uniformly) without
            end, instead of reading every shard once per epoch.
        shuffle_buffer: with tar shards, samples each reader holds to shuffle within and across its shards.
        checkpoint_format: ``"full"`` (the full state gathered on rank 0, safetensors + JSON, nothing unpickled) or
            ``"sharded"`` (every rank writes its own shards with ``torch.distributed.checkpoint``: for FSDP2 at
            scale; its metadata file is a pickle, see
            :func:`~kornia_siglip2.training.checkpoint.save_sharded_checkpoint`). The final export is the full
            ``save_pretrained`` model either way.
        eval_data: a held-out set (tar shards or a manifest, as ``data``) to evaluate on during training: zero-shot
            top-1 over its distinct captions as class prompts, and image-to-text / text-to-image recall@1
            (``eval_*`` in the metrics; see :func:`retrieval_metrics`). Decoded once, kept in memory: keep it small.
        eval_every: with ``eval_data``, steps between evaluations (0: at the end only).
        tensorboard: write the metrics for TensorBoard under ``out/tensorboard`` too, when ``tensorboard`` is
            installed (it is not a dependency).
        max_skip_fraction: stop the run when more than this fraction of the samples read (all ranks, since the
            start; checked from 100 samples on and at every epoch end) were skipped as bad (undecodable image,
            no image, no or empty caption, bad json).
        model: a checkpoint ``SigLip2.from_pretrained`` loads, to fine-tune; or ``None`` to train from scratch.
        model_config: with ``model=None``, a ``config.json`` (transformers layout) of the model to initialise.
        tokenizer: ``"bytes"`` (:class:`~kornia_siglip2.training.data.ByteTokenizer`, from scratch) or a folder
            with a tokenizer (:class:`~kornia_siglip2.tokenizer.SigLipTokenizer`).
        text_length: token ids per caption (and the LocCa decoder length, up to the text tower's position table).
        objective: ``"sigmoid"`` (the image-text loss only: fine-tuning) or ``"siglip2"`` (pre-training with
            :class:`~kornia_siglip2.losses.siglip2.SigLip2Loss`: sigmoid + LocCa from the start, SILC + TIPS
            self-distillation against an EMA teacher from ``distill_start`` of the steps on; LocCa uses the
            manifest's ``regions``; an image without regions
            trains its captioning task only).
        distill_start: with ``objective="siglip2"``, the fraction of ``steps`` (progress ``step / steps``) from
            which SILC + TIPS are on and the teacher starts as a copy of the student (SigLIP 2: 0.8).
        size_factor: with ``objective="siglip2"``, the factor on both self-distillation weights (SigLIP 2:
            0.25 B, 0.5 L, 1.0 So400m, 0.5 g); ``None``: from the vision width, which must be one of these sizes.
        locca_num_bins: box coordinate bins of the LocCa vocabulary (text ids, then the bins).
        distill_heads: hidden, bottleneck and output widths of the two DINO heads of self-distillation.
        num_local_views: SILC local views per image.
        teacher_momentum: EMA momentum of the self-distillation teacher (fixed, as SILC).
        parallel: ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``).
        distributed_loss: ``"all_gather"`` or ``"ring"`` (see :func:`~kornia_siglip2.losses.sigmoid_loss`).
        precision: ``"fp32"``, ``"bf16"`` (autocast; weights and loss in float32) or ``"fp64"`` (tests).
        token_budget: patch tokens per rank and micro-batch.
        token_drop: NaViT token dropping: the fraction of every image's patch tokens dropped at random (drawn
            per image from the seed, the epoch and its index), in [0, 1); the token budget counts the kept
            tokens, so more images fill a batch. 0: off. With objective "sigmoid" only (SigLIP 2's LocCa,
            SILC and TIPS terms use each image's full grid).
        max_num_patches: NaFlex patch budgets drawn per image.
        steps: optimizer steps.
        accumulation: micro-batches per optimizer step. With objective ``"sigmoid"`` every micro-batch is scored
            against the features of all of them (open_clip's ``--accum-freq``: the step's contrastive batch is
            the ``accumulation`` micro-batches of every rank; features are computed once without gradient, then
            each micro-batch again with it); with ``"siglip2"`` the micro-batch losses are averaged.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay of the weight matrices; biases, norms, position embeddings, the probe,
            ``logit_scale`` and ``logit_bias`` are not decayed (see :func:`parameter_groups`).
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine decays to ``learning_rate * min_lr_ratio``.
        grad_clip: clip the global gradient norm to this (``None`` or 0: no clipping).
        grad_checkpointing: recompute every encoder block in backward (``Encoder.set_grad_checkpointing``).
        ema_momentum: keep an EMA copy of the model with this momentum (``None``: none; sharded like the model
            under FSDP).
        seed: seed of the initialisation and of the data order.
        num_workers: ``DataLoader`` workers per rank.
        log_every: steps between metric lines.
        progress: show a ``tqdm`` progress bar on rank 0 (with the loss and tokens/s).
        save_every: steps between checkpoints (``None``: only at the end).
        resume: continue from ``out/checkpoints/latest`` if there is one.
        device: ``"auto"`` (CUDA device ``LOCAL_RANK`` if available, else CPU), or a torch device.
        threads: CPU threads per process (``None``: torch's default).
    """

    data: str
    out: str
    data_weights: str | None = None
    data_resampled: bool = False
    shuffle_buffer: int = 1000
    max_skip_fraction: float = 0.1
    tensorboard: bool = True
    checkpoint_format: Literal["full", "sharded"] = "full"
    eval_data: str | None = None
    eval_every: int = 0
    model: str | None = None
    model_config: str | None = None
    tokenizer: str = "bytes"
    text_length: int = 64
    objective: Literal["sigmoid", "siglip2"] = "sigmoid"
    distill_start: float = 0.8
    size_factor: float | None = None
    locca_num_bins: int = 1000
    distill_heads: Sequence[int] = field(default_factory=lambda: (2048, 256, 4096))
    num_local_views: int = 8
    teacher_momentum: float = 0.996
    parallel: Literal["none", "ddp", "fsdp"] = "ddp"
    distributed_loss: Literal["all_gather", "ring"] = "all_gather"
    precision: Literal["fp32", "bf16", "fp64"] = "fp32"
    token_budget: int = 8192
    token_drop: float = 0.0
    max_num_patches: Sequence[int] = field(default_factory=lambda: (256,))
    steps: int = 1000
    accumulation: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_checkpointing: bool = False
    ema_momentum: float | None = None
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    progress: bool = False
    save_every: int | None = None
    resume: bool = True
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        check(self.parallel in PARALLEL_MODES, lambda: f"parallel must be one of {PARALLEL_MODES}: {self.parallel!r}")
        check(self.precision in PRECISIONS, lambda: f"precision must be one of {PRECISIONS}: {self.precision!r}")
        check(self.objective in OBJECTIVES, lambda: f"objective must be one of {OBJECTIVES}: {self.objective!r}")
        check(0.0 <= self.distill_start <= 1.0, lambda: f"distill_start must be in [0, 1]: {self.distill_start}.")
        check(0.0 <= self.token_drop < 1.0, lambda: f"token_drop must be in [0, 1): {self.token_drop}.")
        check(
            self.token_drop == 0.0 or self.objective == "sigmoid",
            lambda: (
                f"token_drop {self.token_drop} needs objective 'sigmoid': the 'siglip2' objective's LocCa decoder, "
                "SILC local views and TIPS masked patches are defined on each image's full grid. Use "
                "--token-drop 0 with --objective siglip2."
            ),
        )
        self.distill_heads = tuple(int(value) for value in self.distill_heads)
        check(len(self.distill_heads) == 3, lambda: f"distill_heads needs 3 widths, got {self.distill_heads}.")
        check(self.steps >= 1 and self.accumulation >= 1, "steps and accumulation must be positive.")
        check(
            self.model is not None or self.model_config is not None,
            "Give model (a checkpoint to fine-tune) or model_config (a config.json to train from scratch).",
        )
        self.max_num_patches = tuple(int(value) for value in self.max_num_patches)
        check(
            0.0 <= self.max_skip_fraction <= 1.0,
            lambda: f"max_skip_fraction must be in [0, 1]: {self.max_skip_fraction}.",
        )
        check(
            self.checkpoint_format in CHECKPOINT_FORMATS,
            lambda: f"checkpoint_format must be one of {CHECKPOINT_FORMATS}: {self.checkpoint_format!r}",
        )
        check(
            self.eval_data is None or self.objective == "sigmoid" or self.parallel != "fsdp",
            "eval_data with objective 'siglip2' needs parallel 'none' or 'ddp' (FSDP2 shards the objective as one).",
        )
        check(self.shuffle_buffer >= 1, lambda: f"shuffle_buffer must be positive: {self.shuffle_buffer}.")
        _check_ranges(self)
        if self.grad_clip is not None and self.grad_clip <= 0:
            self.grad_clip = None


#: AdamW learning rates above this diverge at once; a typo (``1e3`` for ``1e-3``) is refused up front
MAX_LEARNING_RATE = 1.0


def _check_ranges(config: RecipeConfig) -> None:
    """Refuse option values that cannot train (NaN, negative rates, a device that is not there), up front."""

    def finite(name: str, low: float, high: float = math.inf, *, optional: bool = False) -> None:
        value = getattr(config, name)
        if value is None and optional:
            return
        flag = "--" + name.replace("_", "-")
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            lambda: f"{name} ({flag}) must be a finite number, got {value!r}.",
        )
        check(low <= value <= high, lambda: f"{name} ({flag}) must be in [{low}, {high}], got {value}.")

    finite("learning_rate", 0.0, MAX_LEARNING_RATE)
    finite("weight_decay", 0.0)
    finite("min_lr_ratio", 0.0, 1.0)
    finite("grad_clip", 0.0, optional=True)
    finite("teacher_momentum", 0.0, 1.0)
    finite("ema_momentum", 0.0, 1.0, optional=True)
    finite("size_factor", 0.0, optional=True)
    for name, low in (("warmup_steps", 0), ("token_budget", 1), ("text_length", 1), ("log_every", 1)):
        finite(name, low)
    finite("num_workers", 0)
    finite("save_every", 0, optional=True)  # 0 or None: only at the end
    finite("threads", 1, optional=True)
    if config.device != "auto":
        try:
            device = torch.device(config.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device (--device) {config.device!r} is not a torch device: {error}") from error
        check(
            device.type != "cuda" or torch.cuda.is_available(),
            lambda: f"device (--device) {config.device!r}: CUDA is not available here; use --device cpu or auto.",
        )


def _check_launch(config: RecipeConfig) -> None:
    """``--parallel none`` under a multi-process launcher would train one independent model per process."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    check(
        config.parallel != "none" or world_size == 1,
        lambda: (
            f"--parallel none under a launcher with WORLD_SIZE={world_size}: every process would train its own "
            "weights and only rank 0's would be exported. Use --parallel ddp or fsdp, or run one process."
        ),
    )


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.lock`` (rank 0 of a run): a second run on the same folder is refused.

    ``fcntl.flock`` on a local file system; on NFS it depends on the server (``lockd``), so give each run its
    own ``--out`` there. Other ranks (of the process group, or ``RANK`` > 0 before it exists) take no lock.
    """
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank != 0:
        yield
        return
    folder = Path(out)
    with exclusive_lock(
        folder / ".lock",
        lambda: (
            f"Another training run is using {folder} (it holds {folder / '.lock'}): wait for it to finish, or "
            "give this run another --out."
        ),
    ):
        yield


def _repair_metrics(path: Path, step: int) -> None:
    """Keep the whole metric lines of steps up to ``step`` (the resume point); drop a cut line and later steps.

    A run killed while writing (disk full, SIGKILL) may leave a half line; the steps after its last checkpoint
    are computed again, so their old lines would repeat.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        whole = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
        if whole and record["step"] <= step:
            kept.append(line)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)


def _check_finite_step(step: int, loss: float, grad_norm: float | None) -> None:
    """A non-finite loss or gradient norm stops the run (before the optimizer step spreads it to the weights)."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    raise FloatingPointError(
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm}: training diverged. Lower "
        "--learning-rate or set --grad-clip; the run stops without writing non-finite weights (resume from the last "
        "checkpoint with other options)."
    )


def _check_finite_weights(module: nn.Module, what: str) -> None:
    """Every parameter finite on every rank (one flag all-reduced, so that all ranks stop together)."""
    finite = True
    for parameter in module.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            finite = False
            break
    flag = torch.tensor([0.0 if finite else 1.0])
    if dist.is_initialized():
        flag = flag.to(next(module.parameters()).device)
        dist.all_reduce(flag)
    if float(flag.sum()) > 0:
        raise FloatingPointError(f"non-finite weights (NaN / inf) before {what}: training diverged; nothing written.")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear from ``1 / warmup`` to 1 over ``warmup_steps``, then a cosine to ``min_ratio``.

    Example:
        >>> [round(warmup_cosine(step, 10, 2), 3) for step in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ContrastiveForward(nn.Module):
    """The model's forward for the sigmoid loss: normalized embeddings plus :math:`t'` and :math:`b`.

    DDP and FSDP2 hook a module's ``forward``: wrapping this one (not calling ``get_image_features`` on the model)
    is what makes them synchronize gradients and gather shards.

    Args:
        model: the SigLIP 2 model.
    """

    def __init__(self, model: SigLip2) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        patches: torch.Tensor,
        grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_embeds (n, D), text_embeds (n, D), logit_scale (1,), logit_bias (1,))``.

        ``keep_mask`` marks the patches present when tokens are dropped (see
        :class:`~kornia_siglip2.packing.PackedImages`).
        """
        images = PackedImages(patches, grid_thw, keep_mask)
        image_embeds = self.model.get_image_features(images).pooler_output
        text_embeds = self.model.get_text_features(input_ids).pooler_output
        # under bf16 autocast the loss is computed in float32; float64 stays float64
        image_embeds = nn.functional.normalize(_at_least_float32(image_embeds), dim=-1)
        text_embeds = nn.functional.normalize(_at_least_float32(text_embeds), dim=-1)
        # new tensors, so that FSDP may reshard the parameters after forward
        return image_embeds, text_embeds, self.model.logit_scale * 1, self.model.logit_bias * 1


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _setup_distributed(config: RecipeConfig) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "auto" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else ("cpu" if config.device == "auto" else config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def build_model(config: RecipeConfig) -> SigLip2:
    """The model to train: ``from_pretrained(config.model)``, or ``config.model_config`` initialised from the seed."""
    if config.model is not None:
        model = SigLip2.from_pretrained(config.model)
    else:
        torch.manual_seed(config.seed)
        model = SigLip2(_read_model_config(config.model_config))
        model.init_weights()
    return model.double() if config.precision == "fp64" else model.float()


def _read_model_config(path: str) -> SigLip2Config:
    """``--model-config``, validated before the model is built; errors name the file and the field."""
    try:
        hf_config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"--model-config {path} is not a JSON config: {error}") from error
    return validate_hf_config(hf_config, str(path))


def build_objective(model: SigLip2, config: RecipeConfig, tokenizer: Any, world_size: int) -> SigLip2Objective:
    """The model with its :class:`~kornia_siglip2.losses.siglip2.SigLip2Loss` (``objective="siglip2"``), seeded.

    The LocCa vocabulary is the text tower's ids (with the tokenizer's padding and EOS ids) followed by
    ``locca_num_bins`` box bins; the decoder is sized from the model (:meth:`SigLip2Loss.from_model`). With
    several processes the sigmoid term is distributed (``distributed_loss``).

    Raises:
        ValueError: ``size_factor`` is ``None`` and the vision width is not a SigLIP 2 size.
    """
    vocabulary = LocCaVocabulary(
        text_vocab_size=model.config.text_config.vocab_size,
        num_bins=config.locca_num_bins,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    size_factor = config.size_factor
    if size_factor is None:
        try:
            size_factor = SigLip2LossSchedule.from_vision_width(model.config.vision_config.hidden_size).size_factor
        except ValueError as error:
            raise ValueError(f"{error} On the command line: --size-factor.") from error
    schedule = SigLip2LossSchedule(size_factor=size_factor, distill_start=config.distill_start)
    hidden_dim, bottleneck_dim, num_prototypes = config.distill_heads
    options = dict(
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
        num_prototypes=num_prototypes,
        num_local_views=config.num_local_views,
        teacher_momentum=config.teacher_momentum,
    )
    sigmoid = SigmoidLoss(None, None, distributed=config.distributed_loss if world_size > 1 else None)
    # the same initialisation on every rank: FSDP2 shards each rank's own copy, it does not broadcast
    torch.manual_seed(config.seed + 1)
    loss = SigLip2Loss.from_model(model, vocabulary, schedule, distillation_options=options, sigmoid=sigmoid)
    return SigLip2Objective(model, loss, vocabulary)


def _fsdp_units(model: SigLip2, loss: SigLip2Loss | None = None) -> list[nn.Module]:
    """The modules that get their own ``fully_shard``: every transformer block, and the frozen teacher."""
    units: list[nn.Module] = [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
    if loss is not None:
        units += list(loss.locca.decoder.layers)
        if loss.distillation is not None:
            # the teacher: the same shards as the student, so the EMA update is a local op on each shard; its
            # forward (no grad) all-gathers block by block like the student's
            teacher = loss.distillation.teacher.module
            units += [*teacher.vision.encoder.layers, teacher]
    return units


def wrap_model(module: nn.Module, parallel: str, device: torch.device, ema: EMATeacher | None = None) -> nn.Module:
    """DDP, FSDP2 (every transformer block, the teacher, then the root) or nothing, on ``device``.

    The full objective (:class:`SigLip2Objective`) leaves the distillation heads without gradient before the
    switch: DDP runs with ``find_unused_parameters=True``; FSDP2 reduces only the gradients that exist. An
    EMA copy of the model (``ema``) is sharded like the model under FSDP2.
    """
    module = module.to(device)
    if ema is not None:
        ema.to(device)
    if parallel == "ddp" and dist.is_initialized():
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=isinstance(module, SigLip2Objective),
        )
    if parallel == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for unit in _fsdp_units(module.model, getattr(module, "loss", None)):
            fully_shard(unit)
        if ema is not None:
            for unit in [*_fsdp_units(ema.module), ema.module]:
                fully_shard(unit)
        return fully_shard(module)
    return module


def _sync_context(model: nn.Module, parallel: str, sync: bool) -> contextlib.AbstractContextManager:
    """No gradient synchronization on the first micro-batches of an accumulated step."""
    if parallel == "ddp" and isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if parallel == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def _micro_step(
    model: nn.Module, batch: PackedBatch, epoch: int, config: RecipeConfig, world_size: int, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """Forward and backward of one micro-batch; returns the global loss (detached), images and (kept) tokens."""
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    batch = drop_tokens(batch, config.token_drop, epoch=epoch, seed=config.seed).to(device, dtype)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        image_embeds, text_embeds, logit_scale, logit_bias = model(
            batch.images.patches, batch.images.grid_thw, batch.input_ids, batch.images.keep_mask
        )
    image_embeds, text_embeds = image_embeds.to(dtype), text_embeds.to(dtype)
    counts = _all_reduce(torch.tensor([batch.images.num_images, batch.num_tokens], dtype=torch.float64))
    num_images = int(counts[0])
    mode = config.distributed_loss if world_size > 1 else None
    loss = sigmoid_loss(image_embeds, text_embeds, logit_scale.to(dtype), logit_bias.to(dtype), distributed=mode)
    # weighted so that the gradients DDP / FSDP average over ranks are the dense loss's on the global batch
    weight = world_size * batch.images.num_images / num_images
    (loss * weight / config.accumulation).backward()
    global_loss = _all_reduce(loss.detach().double() * batch.images.num_images / num_images)
    return global_loss, num_images, int(counts[1])


def _objective_micro_step(
    model: nn.Module,
    objective: SigLip2Objective,
    batch: PackedBatch,
    epoch: int,
    progress: float,
    config: RecipeConfig,
    world_size: int,
    device: torch.device,
) -> tuple[dict[str, float], int, int]:
    """Forward and backward of the full objective on one micro-batch; returns the global terms, images, tokens."""
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    loss_module = objective.loss
    max_length = min(config.text_length, loss_module.locca.decoder.max_length)
    targets = locca_targets(batch, objective.vocabulary, max_length, epoch=epoch, seed=config.seed).to(device)
    local_views = mask = None
    if loss_module.schedule.distillation_active(progress):
        local_views, mask = distillation_inputs(
            loss_module.distillation,
            batch.images.patches.to(dtype),
            batch.images.grid_thw,
            batch.indices,
            epoch=epoch,
            seed=config.seed,
        )
        local_views, mask = local_views.to(device), mask.to(device)
    batch = batch.to(device, dtype)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        output = model(
            batch.images.patches, batch.images.grid_thw, batch.input_ids, targets, progress, local_views, mask
        )
    counts = _all_reduce(torch.tensor([batch.images.num_images, batch.num_tokens], dtype=torch.float64))
    num_images = int(counts[0])
    # every term is a mean over this rank's images: weighted by W n_r / n, the averaged gradients are the
    # global batch's
    weight = world_size * batch.images.num_images / num_images
    (output["loss"] * weight / config.accumulation).backward()
    names = ("loss", *LOSS_TERMS)
    local = torch.stack([output[name].detach().to(torch.float64) for name in names])
    terms = _all_reduce(local * batch.images.num_images / num_images)
    return dict(zip(names, terms.tolist(), strict=True)), num_images, int(counts[1])


_NO_DECAY = ("position_embedding", "probe", "logit_scale", "logit_bias")


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the weight matrices only.

    Not decayed (as open_clip and big_vision): every parameter with fewer than two dimensions (biases, norm
    gains, ``logit_scale``, ``logit_bias``), the position embeddings and the attention-pooling probe. Frozen
    parameters (the EMA teacher) are left out.

    Example:
        >>> groups = parameter_groups(nn.Linear(3, 2), 0.1)
        >>> [(len(group["params"]), group["weight_decay"]) for group in groups]
        [(1, 0.1), (1, 0.0)]
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        excluded = parameter.ndim < 2 or any(tag in name for tag in _NO_DECAY)
        (no_decay if excluded else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _accumulated_step(
    model: nn.Module,
    batches: Sequence[tuple[int, PackedBatch]],
    config: RecipeConfig,
    world_size: int,
    device: torch.device,
    parallel: str,
) -> tuple[torch.Tensor, int, int]:
    """One optimizer step's gradients over ``k`` micro-batches scored against each other (open_clip ``--accum-freq``).

    The features of every micro-batch are computed without gradient; then each micro-batch is encoded again with
    gradient and the sigmoid loss of the whole step's batch (its features in place of their cached copies) is
    backpropagated. The gradient of the loss on the concatenated batch is the sum of these backward passes;
    ``logit_scale`` and ``logit_bias`` take part with gradient in the last pass only, so that their gradient is
    counted once (open_clip counts it ``k`` times). Returns the global loss, images and tokens.
    """
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    )
    prepared = [
        drop_tokens(batch, config.token_drop, epoch=epoch, seed=config.seed).to(device, dtype)
        for epoch, batch in batches
    ]

    def encode(batch: PackedBatch) -> tuple[torch.Tensor, ...]:
        with autocast:
            images, texts, scale, bias = model(
                batch.images.patches, batch.images.grid_thw, batch.input_ids, batch.images.keep_mask
            )
        return images.to(dtype), texts.to(dtype), scale.to(dtype), bias.to(dtype)

    with torch.no_grad():
        cached = [encode(batch)[:2] for batch in prepared]
    local_images = sum(batch.images.num_images for batch in prepared)
    counts = _all_reduce(torch.tensor([local_images, sum(batch.num_tokens for batch in prepared)], dtype=torch.float64))
    num_images = int(counts[0])
    weight = world_size * local_images / num_images
    mode = config.distributed_loss if world_size > 1 else None
    last = len(prepared) - 1
    for index, batch in enumerate(prepared):
        with _sync_context(model, parallel, sync=index == last):
            images, texts, scale, bias = encode(batch)
            if index != last:
                scale, bias = scale.detach(), bias.detach()
            all_images = torch.cat([*(c[0] for c in cached[:index]), images, *(c[0] for c in cached[index + 1 :])])
            all_texts = torch.cat([*(c[1] for c in cached[:index]), texts, *(c[1] for c in cached[index + 1 :])])
            loss = sigmoid_loss(all_images, all_texts, scale, bias, distributed=mode)
            (loss * weight).backward()
    global_loss = _all_reduce(loss.detach().double() * local_images / num_images)
    return global_loss, num_images, int(counts[1])


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _tokenizer(config: RecipeConfig):
    if config.tokenizer == "bytes":
        return ByteTokenizer(config.text_length)
    from kornia_siglip2.tokenizer import SigLipTokenizer

    return SigLipTokenizer.from_pretrained(config.tokenizer, max_length=config.text_length)


# ---- data: a manifest (small, local) or tar shards (streamed) ----------------------------------------------------


class _ManifestData:
    """The manifest path: every rank plans the epoch from the full list (:class:`TokenBudgetBatchSampler`)."""

    def __init__(self, config: RecipeConfig, patch_size: int, tokenizer: Any, rank: int, world_size: int) -> None:
        dataset = ImageTextDataset(read_manifest(config.data), tokenizer, patch_size, max(config.max_num_patches))
        self.sampler = TokenBudgetBatchSampler(
            dataset.sizes(),
            config.token_budget,
            patch_size,
            config.max_num_patches,
            num_replicas=world_size,
            rank=rank,
            seed=config.seed,
            token_drop=config.token_drop,
        )
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collate_packed,
            num_workers=config.num_workers,
            pin_memory=False,
        )
        self.world_size = world_size
        self.epoch, self.position = 0, 0
        self._batches: Iterator | None = None

    def next(self) -> tuple[int, PackedBatch]:
        if self._batches is None:
            self._batches = self._generate(self.epoch, self.position)
        self.epoch, self.position, batch = next(self._batches)
        return self.epoch, batch

    def _generate(self, epoch: int, position: int) -> Iterator[tuple[int, int, PackedBatch]]:
        while True:
            self.sampler.set_epoch(epoch, position)
            for batch in self.loader:
                position += 1
                yield epoch, position, batch
            epoch, position = epoch + 1, 0

    def stats(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if state["world_size"] != self.world_size and position != 0:
            raise ValueError(
                f"The checkpoint was written by {state['world_size']} processes in the middle of epoch {epoch} of a "
                f"manifest; this run has {self.world_size}. A manifest epoch is planned for one world size: resume "
                f"with {state['world_size']} processes, or train from tar shards (python -m "
                "kornia_siglip2.training.shards write ...), whose readers are re-dealt to a new world size."
            )
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()  # shuts the DataLoader workers down


class _ShardData:
    """The tar-shard path: a :class:`~kornia_siglip2.training.stream.StreamFeed` per rank, epochs ended together.

    Every micro-batch the ranks agree (``all_reduce`` of a flag, minimum) whether each has a batch: when one
    rank's readers are done, the epoch ends for every rank and the others' remaining batches of the epoch are
    dropped (counted as ``dropped``), so every rank steps the same number of times.
    """

    def __init__(self, config: RecipeConfig, patch_size: int, tokenizer: Any, rank: int, world_size: int) -> None:
        spec = StreamSpec(
            tuple(parse_sources(config.data, config.data_weights)),
            token_budget=config.token_budget,
            patch_size=patch_size,
            max_num_patches=tuple(config.max_num_patches),
            seed=config.seed,
            shuffle_buffer=config.shuffle_buffer,
            resampled=config.data_resampled,
            token_drop=config.token_drop,
        )
        stream = ShardStream(spec, tokenizer, rank, world_size, config.num_workers)
        self.feed = StreamFeed(stream, config.num_workers)
        self.rank, self.world_size, self.num_workers = rank, world_size, config.num_workers
        self.dropped = 0
        self.epoch_ended = False

    def next(self) -> tuple[int, PackedBatch]:
        restarted = False
        while True:
            item = self.feed.next()
            while item is not None and item["batch"] is None:  # every image of the packed batch was bad
                item = self.feed.next()
            have = torch.tensor([0.0 if item is None else 1.0])
            if dist.is_initialized():
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if have.item() == 1.0:
                return self.feed.epoch, item["batch"]
            check(
                not restarted,
                lambda: (
                    f"Epoch {self.feed.epoch} gives a rank no batch: the shards hold fewer samples than "
                    f"{self.world_size} ranks x {max(self.num_workers, 1)} workers need."
                ),
            )
            while item is not None:  # the ragged end of the epoch on this rank: dropped, counted
                self.dropped += 0 if item["batch"] is None else item["batch"].images.num_images
                item = self.feed.next()
            self.feed.end_epoch()
            self.epoch_ended = restarted = True

    def stats(self) -> dict[str, Any]:
        """Read, skipped (per rank and reason) and dropped samples since the start of the run (collective)."""
        totals = self.feed.totals
        local = torch.tensor(
            [totals["read"], *(totals[name] for name in SKIP_REASONS), self.dropped], dtype=torch.float64
        )
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        if dist.is_initialized():
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        table = torch.stack(gathered)
        reasons = table[:, 1 : 1 + len(SKIP_REASONS)].sum(0).tolist()
        ended, self.epoch_ended = self.epoch_ended, False
        return {
            "read": int(table[:, 0].sum()),
            "skipped": int(sum(reasons)),
            "skipped_per_rank": [int(value) for value in table[:, 1 : 1 + len(SKIP_REASONS)].sum(1).tolist()],
            "skipped_reasons": {name: int(value) for name, value in zip(SKIP_REASONS, reasons, strict=True) if value},
            "dropped": int(table[:, -1].sum()),
            "epoch_ended": ended,
        }

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position (collective: gathered to every rank, rank 0 writes it)."""
        own = {**self.feed.state_dict(), "dropped": self.dropped}
        ranks: list[Any] = [None] * self.world_size
        if dist.is_initialized():
            dist.all_gather_object(ranks, own)
        else:
            ranks = [own]
        stream = {"world_size": self.world_size, "num_workers": self.num_workers, "ranks": ranks}
        return {"epoch": self.feed.epoch, "position": 0, "stream": stream}

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        check(
            "stream" in state,
            "The checkpoint holds no stream position (it was written by a manifest run): resume with its --data.",
        )
        saved = state["stream"]
        redealt = self.feed.load_state_dict(saved["ranks"])
        same = not redealt
        self.dropped = int(saved["ranks"][rank]["dropped"]) if same else 0
        if not same and rank == 0:
            self.dropped = sum(int(entry["dropped"]) for entry in saved["ranks"])
            print(
                f"resuming epoch {self.feed.epoch}, read by {saved['world_size']} ranks x "
                f"{max(saved['num_workers'], 1)} workers, on {self.world_size} x {max(self.num_workers, 1)}: the "
                "interrupted readers continue on the new ones (nothing of the epoch lost or read twice); the next "
                "epoch splits the shards the new way.",
                flush=True,
            )

    def close(self) -> None:
        self.feed.close()


def _open_data(config: RecipeConfig, patch_size: int, tokenizer: Any, rank: int, world_size: int):
    kind = _ShardData if is_shard_data(config.data) else _ManifestData
    return kind(config, patch_size, tokenizer, rank, world_size)


def _check_skips(stats: dict[str, Any], config: RecipeConfig) -> None:
    """Stop (on every rank: the numbers are global) when too many samples were skipped."""
    read, skipped = stats.get("read", 0), stats.get("skipped", 0)
    if read == 0 or not (read >= 100 or stats.get("epoch_ended")):
        return
    if skipped / read > config.max_skip_fraction:
        raise RuntimeError(
            f"{skipped} of {read} samples read were skipped ({skipped / read:.1%} > --max-skip-fraction "
            f"{config.max_skip_fraction}): {stats['skipped_reasons']}, per rank {stats['skipped_per_rank']}. The "
            "first skipped samples of each reader are named on stderr ('kornia_siglip2 data: skipped ...'): fix or "
            "rewrite those shards, or raise --max-skip-fraction."
        )


# ---- the run folder: shared by every rank, one checkpoint for all, a record of what the run is --------------------


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, world_size: int) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def check_shared_folder(out: Path, rank: int, world_size: int) -> None:
    """Refuse to start unless every rank sees the run folder rank 0 writes (collective).

    Rank 0 writes a token file into ``out``; every rank checks that it sees it. Checkpoints are written by
    rank 0 and read by every rank, so ``out`` must be one shared file system for every node.

    Raises:
        RuntimeError: some rank does not see rank 0's token (named with its host).
    """
    if world_size == 1:
        return
    import socket
    import uuid

    token = _broadcast(f".shared-{uuid.uuid4().hex}" if rank == 0 else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / token).write_text("written by rank 0\n")
    dist.barrier()
    seen = _gather(((out / token).is_file(), socket.gethostname()), world_size)
    dist.barrier()
    if rank == 0:
        (out / token).unlink(missing_ok=True)
    blind = [f"rank {index} on {host}" for index, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise RuntimeError(
            f"--out {out} is not shared: {', '.join(blind)} cannot see the file rank 0 wrote there. Checkpoints are "
            "written by rank 0 and read by every rank: put --out on a file system every node mounts (NFS, Lustre...)."
        )


def agree_on_checkpoint(checkpoints: Path, resume: bool, rank: int, world_size: int) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 picks it, the others load the same (collective).

    Raises:
        RuntimeError: a rank cannot read the checkpoint rank 0 picked (the run refuses rather than letting the
            ranks start from different steps).
    """
    name, failure = None, None
    if rank == 0 and resume:
        try:
            path = find_resume_checkpoint(checkpoints)
        except (FileNotFoundError, OSError) as error:  # every rank must stop, not wait for rank 0
            failure = str(error)
        else:
            name = path.name if path is not None else None
    name, failure = _broadcast((name, failure))
    if failure is not None:
        raise FileNotFoundError(failure)
    if name is None:
        return None
    path = checkpoints / name
    seen = _gather((path / "trainer.json").is_file(), world_size)
    missing = [index for index, ok in enumerate(seen) if not ok]
    if missing:
        raise RuntimeError(
            f"Rank 0 resumes from {path}, which rank(s) {missing} cannot read: every rank must resume from the same "
            "step. Put --out on a file system every node shares, or start a new run (--no-resume or a new --out)."
        )
    return path


# what the run is: a resume with any of these changed refuses (the rest may change: logging, threads, devices...)
RUN_FIELDS = (
    "data",
    "data_weights",
    "data_resampled",
    "shuffle_buffer",
    "model",
    "model_config",
    "tokenizer",
    "text_length",
    "objective",
    "distill_start",
    "size_factor",
    "locca_num_bins",
    "distill_heads",
    "num_local_views",
    "teacher_momentum",
    "distributed_loss",
    "token_budget",
    "token_drop",
    "max_num_patches",
    "steps",
    "accumulation",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "ema_momentum",
    "seed",
)


def _data_fingerprint(data: str, weights: str | None) -> str:
    """The shard list (tar shards) or the manifest's bytes / the folder's file list, hashed."""
    import hashlib

    digest = hashlib.sha256()
    if is_shard_data(data):
        for source in parse_sources(data, weights):
            digest.update(("\n".join(source.urls) + f"|{source.weight}\n").encode())
    else:
        path = Path(data)
        if path.is_file():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                digest.update(f"{file.relative_to(path)}|{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def run_record(config: RecipeConfig, world_size: int) -> dict[str, Any]:
    """What defines the run (``run.json``): its options, the data and model-config fingerprints, the world size."""
    options = asdict(config)
    record: dict[str, Any] = {name: options[name] for name in RUN_FIELDS}
    record["max_num_patches"] = list(record["max_num_patches"])
    record["distill_heads"] = list(record["distill_heads"])
    record["data_sha256"] = _data_fingerprint(config.data, config.data_weights)
    if config.model_config is not None and Path(config.model_config).is_file():
        record["model_config_json"] = json.loads(Path(config.model_config).read_text())
    record["world_size"] = world_size
    record["num_workers"] = config.num_workers
    return record


# a resume may change these (with a note): the world size and workers (tar shards re-deal the interrupted epoch's
# readers; a manifest refuses mid-epoch), and --steps (to extend or shorten a run: the schedule becomes the new one's)
_MAY_CHANGE = ("world_size", "num_workers", "steps")


def check_run_record(out: Path, record: dict[str, Any]) -> list[str]:
    """Compare a resumed run with the ``run.json`` it started with; the changes that are allowed, as notes.

    World size and workers may change (tar shards re-deal the interrupted epoch's readers; a manifest refuses
    mid-epoch, see the data classes), and ``steps`` (the learning-rate schedule becomes the new total's from the
    resumed step on, said in a note). Anything else that defines the run refuses.

    Raises:
        ValueError: a field of :data:`RUN_FIELDS`, the data or the model config differ from the recorded run.
    """
    path = out / "run.json"
    if not path.is_file():
        return []
    before = json.loads(path.read_text())
    changed = [
        f"{name}: was {before.get(name)!r}, now {value!r}"
        for name, value in record.items()
        if name not in (*_MAY_CHANGE, "history") and before.get(name) != value
    ]
    if changed:
        raise ValueError(
            f"Resuming {out} with a different run: {'; '.join(changed)}. A resumed run must train the same data, "
            "model, budgets and schedule. Pass the recorded values (run.json), or start a new run with another "
            "--out (--model <checkpoint>/final to start from its weights)."
        )
    notes = []
    for name in _MAY_CHANGE:
        if before.get(name) != record[name]:
            notes.append(f"{name} {before.get(name)} -> {record[name]}")
    if before.get("steps") != record["steps"]:
        notes.append(
            f"the learning-rate schedule is now that of {record['steps']} steps (warmup, then the cosine to step "
            f"{record['steps']}): the rate changes from the resumed step on"
        )
    return notes


def _write_run_record(out: Path, record: dict[str, Any], notes: list[str], step: int) -> None:
    path = out / "run.json"
    history = json.loads(path.read_text()).get("history", []) if path.is_file() else []
    history.append({"step": step, "world_size": record["world_size"], "num_workers": record["num_workers"]})
    temporary = out / ".run.json.tmp"
    temporary.write_text(json.dumps({**record, "history": history}, indent=2))
    os.replace(temporary, path)
    if notes:
        print(f"resumed at step {step} with {', '.join(notes)}", flush=True)


def _tensorboard(out: Path, enabled: bool):
    """A TensorBoard writer when ``torch.utils.tensorboard`` imports (``tensorboard`` installed), else ``None``."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("TensorBoard is not installed (pip install tensorboard): metrics go to metrics.jsonl only.", flush=True)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _write_metrics(out: Path, record: dict[str, Any], writer: Any) -> None:
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    if writer is not None:
        _log_scalars(writer, record)


def _log_scalars(writer: Any, record: dict[str, Any]) -> None:
    for name, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            writer.add_scalar(f"train/{name}", value, record["step"])


# ---- evaluation during training: zero-shot and retrieval on a held-out set ------------------------------------


def _eval_items(config: RecipeConfig, patch_size: int, tokenizer: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The held-out set, decoded once (every rank): items at the largest patch budget, and their captions."""
    budget = max(config.max_num_patches)
    if is_shard_data(config.eval_data):
        spec = StreamSpec(
            tuple(parse_sources(config.eval_data)),
            token_budget=budget,
            patch_size=patch_size,
            max_num_patches=(budget,),
            shuffle_buffer=1,
        )
        stream = ShardStream(spec, tokenizer)
        items, captions = [], []
        for batch in Cursor(spec, 0, 0, 1, spec.urls).batches():  # one reader: every shard, samples in order
            for item in batch:
                try:
                    items.append(stream._item(item))
                    captions.append(item.files["txt"].decode("utf-8").strip())
                except Exception as error:  # a bad held-out sample is left out, as in training
                    print(f"kornia_siglip2 eval: left out {item.key}: {error}", flush=True)
        return items, captions
    dataset = ImageTextDataset(read_manifest(config.eval_data), tokenizer, patch_size, budget)
    return [dataset[index] for index in range(len(dataset))], [record.caption for record in dataset.records]


def retrieval_metrics(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """Zero-shot top-1 over the distinct captions (as class prompts) and image <-> text recall@1.

    An answer is right when its caption equals the image's (captions may repeat: a retrieved text with the same
    caption is a right one).

    Example:
        >>> embeds = torch.eye(3)
        >>> retrieval_metrics(embeds, embeds, ["a", "b", "c"])["image_to_text_r1"]
        1.0
    """
    similarity = image_embeds @ text_embeds.T
    classes = sorted(set(captions))
    first = [captions.index(name) for name in classes]
    predicted = (image_embeds @ text_embeds[first].T).argmax(1).tolist()
    count = len(captions)
    texts_of_images = similarity.argmax(1).tolist()
    images_of_texts = similarity.argmax(0).tolist()
    return {
        "zero_shot_top1": sum(classes[p] == captions[i] for i, p in enumerate(predicted)) / count,
        "image_to_text_r1": sum(captions[j] == captions[i] for i, j in enumerate(texts_of_images)) / count,
        "text_to_image_r1": sum(captions[j] == captions[i] for i, j in enumerate(images_of_texts)) / count,
    }


def _evaluate(
    forward: nn.Module,
    items: list[dict[str, Any]],
    captions: list[str],
    config: RecipeConfig,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Encode the held-out set split over the ranks (each encodes as many batches: FSDP needs every rank), gather."""
    batches: list[list[int]] = [[]]
    used = 0
    for index, item in enumerate(items):
        tokens = item["patches"].shape[0]
        if batches[-1] and used + tokens > config.token_budget:
            batches.append([])
            used = 0
        batches[-1].append(index)
        used += tokens
    mine = batches[rank::world_size]
    rounds = math.ceil(len(batches) / world_size)
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    results: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    was_training = forward.training
    forward.eval()
    with torch.no_grad():
        for position in range(rounds):
            indices = mine[position] if position < len(mine) else batches[0]  # a spare round: encoded, not kept
            batch = collate_packed([items[index] for index in indices]).to(device, dtype)
            image_embeds, text_embeds, _, _ = forward(batch.images.patches, batch.images.grid_thw, batch.input_ids)
            if position < len(mine):
                results.append((indices, image_embeds.double().cpu(), text_embeds.double().cpu()))
    forward.train(was_training)
    gathered = _gather(results, world_size)
    order = [index for part in gathered for indices, _, _ in part for index in indices]
    images = torch.cat([embeds for part in gathered for _, embeds, _ in part])[torch.argsort(torch.tensor(order))]
    texts = torch.cat([embeds for part in gathered for _, _, embeds in part])[torch.argsort(torch.tensor(order))]
    return {f"eval_{name}": value for name, value in retrieval_metrics(images, texts, captions).items()}


def train(config: RecipeConfig) -> list[dict[str, Any]]:
    """Run (or resume) training in this process; returns this run's metric records (every step).

    Call it on every rank (``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; a process group that is
    already initialized is used as is). Rank 0 holds a lock on ``out`` (:func:`run_lock`) for the whole run.

    Raises:
        FloatingPointError: the loss, the gradient norm or the weights became non-finite (nothing is exported).
        RuntimeError: another run holds ``out``.
    """
    _check_launch(config)
    with run_lock(config.out):
        return _train(config)


def _train(config: RecipeConfig) -> list[dict[str, Any]]:
    rank, world_size, device = _setup_distributed(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    check_shared_folder(out, rank, world_size)
    model = build_model(config)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = _tokenizer(config)
    objective = build_objective(model, config, tokenizer, world_size) if config.objective == "siglip2" else None
    ema = EMATeacher(model, config.ema_momentum) if config.ema_momentum is not None else None
    wrapped = wrap_model(objective or ContrastiveForward(model), config.parallel, device, ema)
    # the frozen teacher is not optimized
    trained = [parameter for parameter in wrapped.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(wrapped, config.weight_decay), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)
    )

    vocab_size = model.config.text_config.vocab_size
    check(
        tokenizer.vocab_size <= vocab_size,
        lambda: (
            f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} ids but the text tower embeds {vocab_size}: "
            "pass the checkpoint's tokenizer folder as tokenizer."
        ),
    )
    data = _open_data(config, model.patch_size, tokenizer, rank, world_size)
    evaluation = None
    if config.eval_data is not None:
        items, captions = _eval_items(config, model.patch_size, tokenizer)
        # the wrapped forward (DDP / FSDP2) for the sigmoid objective; the model itself under the full objective
        evaluation = (wrapped if objective is None else ContrastiveForward(model), items, captions)

    step = 0
    checkpoints = out / "checkpoints"
    record_of_run = run_record(config, world_size)
    resume_from = agree_on_checkpoint(checkpoints, config.resume, rank, world_size)
    notes: list[str] = []
    if resume_from is not None:
        notes = check_run_record(out, record_of_run)
        loader = load_sharded_checkpoint if is_sharded_checkpoint(resume_from) else load_checkpoint
        state = loader(resume_from, wrapped, optimizer, ema)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        data.load_state_dict(state, rank)
    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _repair_metrics(out / "metrics.jsonl", step)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
        _write_run_record(out, record_of_run, notes, step)
        writer = _tensorboard(out, config.tensorboard)
        print(f"rank 0/{world_size} on {device}: {config.parallel}, {config.precision}, from step {step}", flush=True)

    records = []
    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step")
    wrapped.train()
    epoch = 0
    try:
        while step < config.steps:
            start = time.perf_counter()
            progress = step / config.steps
            distilling = objective is not None and objective.loss.schedule.distillation_active(progress)
            if distilling:
                objective.start_distillation()  # the teacher becomes the student, once (a resumed run knows)
            step_terms: dict[str, float] = {}
            step_images, step_tokens = 0, 0
            batches = [data.next() for _ in range(config.accumulation)]
            epoch = batches[-1][0]
            if objective is None and config.accumulation > 1:
                loss, step_images, step_tokens = _accumulated_step(
                    wrapped, batches, config, world_size, device, config.parallel
                )
                step_terms = {"loss": float(loss)}
            else:
                for micro, (batch_epoch, batch) in enumerate(batches):
                    with _sync_context(wrapped, config.parallel, sync=micro == config.accumulation - 1):
                        if objective is None:
                            loss, images, tokens = _micro_step(wrapped, batch, batch_epoch, config, world_size, device)
                            terms = {"loss": float(loss)}
                        else:
                            terms, images, tokens = _objective_micro_step(
                                wrapped, objective, batch, batch_epoch, progress, config, world_size, device
                            )
                    for name, value in terms.items():
                        step_terms[name] = step_terms.get(name, 0.0) + value / config.accumulation
                    step_images += images
                    step_tokens += tokens
            step_loss = step_terms["loss"]
            grad_norm = None
            if config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            _check_finite_step(step + 1, step_loss, grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            if objective is not None:
                objective.update_teacher()
            step += 1
            seconds = time.perf_counter() - start
            if objective is not None and not distilling:
                step_terms["consistency"] = step_terms["masked"] = None  # not computed before the switch
            stats = data.stats()
            record = {
                "step": step,
                "epoch": epoch,
                "loss": step_loss,
                # the full objective: each unweighted term of the global batch, and whether SILC / TIPS were on
                **({name: step_terms[name] for name in LOSS_TERMS} if objective is not None else {}),
                **({"distillation": distilling} if objective is not None else {}),
                "lr": learning_rate,
                "images": step_images,
                "tokens": step_tokens,
                # the fraction of the token budgets the step's batches filled (all ranks and micro-batches)
                "fill": step_tokens / (config.token_budget * config.accumulation * world_size),
                "tokens_per_s": step_tokens / seconds,
                "seconds": seconds,
                "memory_mb": _memory_mb(device),
                "grad_norm": grad_norm,
                **{name: value for name, value in stats.items() if name != "epoch_ended"},
            }
            records.append(record)
            if rank == 0:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                elif step % config.log_every == 0 or step == config.steps:
                    terms = "".join(
                        f" {name} {record[name]:.4f}" for name in LOSS_TERMS if record.get(name) is not None
                    )
                    skipped = f" skipped {record['skipped']}" if "skipped" in record else ""
                    print(
                        f"step {step}/{config.steps} loss {step_loss:.4f}{terms} lr {learning_rate:.2e} "
                        f"{record['tokens_per_s']:.0f} tok/s fill {record['fill']:.1%}{skipped} "
                        f"mem {record['memory_mb']:.0f} MB",
                        flush=True,
                    )
            if evaluation is not None and (
                step == config.steps or (config.eval_every and step % config.eval_every == 0)
            ):
                record.update(_evaluate(*evaluation, config, rank, world_size, device))
                if rank == 0:
                    scores = " ".join(
                        f"{name} {value:.3f}" for name, value in record.items() if name.startswith("eval_")
                    )
                    print(f"step {step} {scores}", flush=True)
            if rank == 0:
                _write_metrics(out, record, writer)
            _check_skips(stats, config)
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                trainer_state = {**data.state_dict(), "scheduler": scheduler.state_dict()}
                _check_finite_weights(wrapped, f"the step-{step} checkpoint")
                saver = save_sharded_checkpoint if config.checkpoint_format == "sharded" else save_checkpoint
                saver(checkpoints, step, wrapped, optimizer, trainer_state, ema)
    finally:
        data.close()  # shuts the DataLoader workers down
        if writer is not None:
            writer.close()
    if bar is not None:
        bar.close()
    _check_finite_weights(wrapped, "the final export")
    export_final(wrapped, model, out / "final", rank)
    return records


def export_final(wrapped: nn.Module, model: SigLip2, folder: Path, rank: int) -> None:
    """Gather the full weights (collective) and write them with ``save_pretrained`` on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            export = SigLip2(model.config)
        # the model's weights only (the objective also holds the LocCa decoder, the heads and the teacher)
        weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
        export.load_state_dict(weights, assign=True)
        export.save_pretrained(folder)
    if dist.is_initialized():
        dist.barrier()


def _field_help() -> dict[str, str]:
    """Each field's description, from the ``Attributes:`` section of :class:`RecipeConfig`'s docstring."""
    descriptions: dict[str, str] = {}
    name = None
    for line in (RecipeConfig.__doc__ or "").split("Attributes:")[-1].splitlines():
        match = re.match(r"^\s{8}(\w+): (.*)$", line)
        if match:
            name, text = match.groups()
            descriptions[name] = text
        elif name and line.strip():
            descriptions[name] += " " + line.strip()
    return {key: _plain(text) for key, text in descriptions.items()}


def _plain(text: str) -> str:
    """Docstring markup to plain text for ``--help`` (roles and backticks dropped, ``%`` escaped)."""
    text = re.sub(r":(?:class|func|mod|meth|data):", "", text)
    return text.replace("`", "").replace("~", "").replace("%", "%%")


_CHOICES = {
    "parallel": PARALLEL_MODES,
    "precision": PRECISIONS,
    "distributed_loss": ("all_gather", "ring"),
    "objective": OBJECTIVES,
    "checkpoint_format": CHECKPOINT_FORMATS,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kornia_siglip2.train", description=__doc__.splitlines()[0])
    descriptions = _field_help()
    for item in fields(RecipeConfig):
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not MISSING else None
        help_text = descriptions.get(item.name, "") + " (default %(default)s)"
        if item.name in ("data", "out"):
            parser.add_argument(flag, required=True, help=descriptions.get(item.name))
        elif item.name == "max_num_patches":
            parser.add_argument(flag, type=int, nargs="+", default=[256], help=help_text)
        elif item.name == "distill_heads":
            parser.add_argument(
                flag,
                type=int,
                nargs=3,
                default=[2048, 256, 4096],
                metavar=("HIDDEN", "BOTTLENECK", "PROTOTYPES"),
                help=help_text,
            )
        elif item.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif item.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=default, help=help_text)
        elif item.type in ("float", "float | None"):
            parser.add_argument(flag, type=float, default=default, help=help_text)
        else:
            parser.add_argument(flag, default=default, choices=_CHOICES.get(item.name), help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m kornia_siglip2.train --help``)."""
    args = _parser().parse_args(argv)
    config = RecipeConfig(**vars(args))
    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
