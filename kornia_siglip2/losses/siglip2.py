"""The full SigLIP 2 training objective: sigmoid + LocCa, then SILC + TIPS self-distillation late in training.

SigLIP 2 (Tschannen et al. 2025, sections 2.1-2.3) trains with

.. math::
    \\mathcal{L} = \\mathcal{L}_{sigmoid} + \\mathcal{L}_{LocCa}
    + f \\, \\big(1 \\cdot \\mathcal{L}_{consistency} + 0.25 \\cdot \\mathcal{L}_{masked}\\big) \\, [p \\ge 0.8]

where :math:`p` is the fraction of training done and :math:`f` a model-size factor (0.25 / 0.5 / 1.0 / 0.5
for B / L / So400m / g). :class:`SigLip2LossSchedule` holds these numbers and answers
:meth:`~SigLip2LossSchedule.loss_weights`; :class:`SigLip2Loss` runs the terms a given progress needs:
before the switch the self-distillation branch (teacher, local views, masked view) is not run at all, and
the first training call after it copies the student into the EMA teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.decoders import LocCaDecoder, LocCaTargets, LocCaVocabulary
from kornia_siglip2.errors import check, check_shape
from kornia_siglip2.losses.distill import SelfDistillationLoss
from kornia_siglip2.losses.locca import LocCaLoss
from kornia_siglip2.losses.sigmoid import SigmoidLoss
from kornia_siglip2.packing import pack_inputs

if TYPE_CHECKING:  # a type hint only: the loss calls the model's public methods and needs no import of it
    from kornia_siglip2.model import SigLip2

__all__ = [
    "LOSS_TERMS",
    "MODEL_SIZE_FACTORS",
    "SigLip2Loss",
    "SigLip2LossOutput",
    "SigLip2LossSchedule",
    "infer_model_size",
    "model_size_factor",
]

#: Names of the four terms, the keys of :meth:`SigLip2LossSchedule.loss_weights` and :meth:`SigLip2LossOutput.terms`.
LOSS_TERMS = ("sigmoid", "locca", "consistency", "masked")

#: Factor on both self-distillation weights per model size (SigLIP 2 paper section 2.3).
MODEL_SIZE_FACTORS = {"B": 0.25, "L": 0.5, "So400m": 1.0, "g": 0.5}

# vision widths of the four SigLIP 2 sizes (ViT-B 768, ViT-L 1024, So400m 1152, g-opt 1536)
_WIDTH_TO_SIZE = {768: "B", 1024: "L", 1152: "So400m", 1536: "g"}


def model_size_factor(name: str) -> float:
    """Size factor of the self-distillation weights for a model-size name.

    Args:
        name: ``"B"``, ``"L"``, ``"So400m"`` or ``"g"``, case-insensitive, optionally as big_vision writes a
            variant (``"So400m/14"``, ``"B/16"``) or with a ``"ViT-"`` prefix.

    Returns:
        0.25, 0.5, 1.0 or 0.5.

    Raises:
        ValueError: an unknown size.

    Example:
        >>> model_size_factor("B/16"), model_size_factor("L"), model_size_factor("so400m/14"), model_size_factor("g")
        (0.25, 0.5, 1.0, 0.5)
    """
    size = name.split("/")[0].removeprefix("ViT-").removeprefix("vit-").lower()
    for known, factor in MODEL_SIZE_FACTORS.items():
        if known.lower() == size:
            return factor
    raise ValueError(f"Unknown model size {name!r}: expected one of {list(MODEL_SIZE_FACTORS)} (e.g. 'So400m/14').")


def infer_model_size(vision_width: int) -> str:
    """The SigLIP 2 model size of a vision tower width.

    Args:
        vision_width: ``VisionConfig.hidden_size``.

    Returns:
        ``"B"`` (768), ``"L"`` (1024), ``"So400m"`` (1152) or ``"g"`` (1536).

    Raises:
        ValueError: the width is not one of the four SigLIP 2 sizes.

    Example:
        >>> infer_model_size(1152), model_size_factor(infer_model_size(768))
        ('So400m', 0.25)
    """
    if vision_width not in _WIDTH_TO_SIZE:
        raise ValueError(
            f"Vision width {vision_width} is not a SigLIP 2 size {_WIDTH_TO_SIZE}: give the size factor "
            "explicitly (SigLip2LossSchedule(size_factor=...))."
        )
    return _WIDTH_TO_SIZE[vision_width]


@dataclass(frozen=True)
class SigLip2LossSchedule:
    """Weights of the four SigLIP 2 loss terms as a function of training progress.

    Sigmoid and LocCa count equally from the start (paper section 2.2). Self-distillation switches on at
    ``distill_start`` (paper section 2.3: the last 20 % of training): its weights are 0 before, and
    ``consistency_weight * size_factor`` and ``masked_weight * size_factor`` from then on.

    Args:
        size_factor: factor on both self-distillation weights, see :data:`MODEL_SIZE_FACTORS` (1.0 is
            So400m's); :meth:`for_model_size` and :meth:`from_vision_width` look it up.
        distill_start: progress in :math:`[0, 1]` at which self-distillation switches on (0.8), or ``None``
            to never switch it on (the paper does not use it for NaFlex training).
        sigmoid_weight: weight of the sigmoid image-text loss (1).
        locca_weight: weight of the LocCa decoder loss (1, equal to the sigmoid loss).
        consistency_weight: SILC local-to-global consistency weight before the size factor (1).
        masked_weight: TIPS masked-prediction weight before the size factor (0.25).

    Raises:
        ValueError: a negative weight or factor, or ``distill_start`` outside :math:`[0, 1]`.

    Example:
        >>> schedule = SigLip2LossSchedule.for_model_size("B/16")
        >>> schedule.loss_weights(0.5)
        {'sigmoid': 1.0, 'locca': 1.0, 'consistency': 0.0, 'masked': 0.0}
        >>> schedule.loss_weights(0.8)
        {'sigmoid': 1.0, 'locca': 1.0, 'consistency': 0.25, 'masked': 0.0625}
    """

    size_factor: float = 1.0
    distill_start: float | None = 0.8
    sigmoid_weight: float = 1.0
    locca_weight: float = 1.0
    consistency_weight: float = 1.0
    masked_weight: float = 0.25

    def __post_init__(self) -> None:
        for name in ("size_factor", "sigmoid_weight", "locca_weight", "consistency_weight", "masked_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.distill_start is not None and not 0.0 <= self.distill_start <= 1.0:
            raise ValueError(f"distill_start must be in [0, 1] or None, got {self.distill_start}.")

    @classmethod
    def for_model_size(cls, name: str, **kwargs: Any) -> SigLip2LossSchedule:
        """The schedule of a named size (``"B"``, ``"L"``, ``"So400m"``, ``"g"``); other fields as kwargs."""
        return cls(size_factor=model_size_factor(name), **kwargs)

    @classmethod
    def from_vision_width(cls, vision_width: int, **kwargs: Any) -> SigLip2LossSchedule:
        """The schedule of the size whose vision tower is ``vision_width`` wide (see :func:`infer_model_size`).

        Raises:
            ValueError: the width is not one of the four SigLIP 2 sizes.
        """
        return cls.for_model_size(infer_model_size(vision_width), **kwargs)

    def distillation_active(self, progress: float) -> bool:
        """Whether the self-distillation terms are on at ``progress`` (from ``distill_start`` inclusive)."""
        _check_progress(progress)
        return self.distill_start is not None and progress >= self.distill_start

    def loss_weights(self, progress: float) -> dict[str, float]:
        """Weight of each term at a training progress.

        Args:
            progress: fraction of training done, in :math:`[0, 1]` (e.g. ``step / total_steps``).

        Returns:
            ``{"sigmoid": ..., "locca": ..., "consistency": ..., "masked": ...}`` (:data:`LOSS_TERMS` order).

        Raises:
            ValueCheckError: ``progress`` outside :math:`[0, 1]`.
        """
        factor = self.size_factor if self.distillation_active(progress) else 0.0
        return {
            "sigmoid": self.sigmoid_weight,
            "locca": self.locca_weight,
            "consistency": self.consistency_weight * factor,
            "masked": self.masked_weight * factor,
        }


@dataclass
class SigLip2LossOutput:
    """Output of :class:`SigLip2Loss`.

    Attributes:
        loss: scalar total, ``sum(weights[k] * term_k)``.
        sigmoid_loss: scalar sigmoid image-text loss.
        locca_loss: scalar LocCa loss (its three tasks summed).
        consistency_loss: scalar SILC consistency loss; 0 (not computed) before the switch.
        masked_loss: scalar TIPS masked-prediction loss; 0 (not computed) before the switch.
        weights: the weights used, ``SigLip2LossSchedule.loss_weights(progress)``.
        locca_task_losses: :math:`(3,)` unweighted LocCa task losses (captioning, referring expression,
            grounded captioning).
        distillation_active: whether the self-distillation terms were computed.
    """

    loss: torch.Tensor
    sigmoid_loss: torch.Tensor
    locca_loss: torch.Tensor
    consistency_loss: torch.Tensor
    masked_loss: torch.Tensor
    weights: dict[str, float]
    locca_task_losses: torch.Tensor
    distillation_active: bool

    def terms(self) -> dict[str, torch.Tensor]:
        """The four unweighted terms by name, :data:`LOSS_TERMS` order (the keys of :attr:`weights`)."""
        return {
            "sigmoid": self.sigmoid_loss,
            "locca": self.locca_loss,
            "consistency": self.consistency_loss,
            "masked": self.masked_loss,
        }


class SigLip2Loss(nn.Module):
    """The SigLIP 2 objective: sigmoid + LocCa, with SILC + TIPS self-distillation from ``distill_start`` on.

    Every call encodes the batch once for the sigmoid loss (pooled features) and LocCa (un-pooled tokens).
    From the schedule's ``distill_start`` on it also runs ``distillation`` on the same images as the global
    view; before that the distillation module is not called at all, and :meth:`update_teacher` does
    nothing. The first call in training mode at or after the switch resets the EMA teacher from the student
    (paper section 2.3: the teacher starts as the student when these losses switch on); whether that has
    happened is saved in ``state_dict()``, so a resumed run does not reset it twice.

    As :class:`~kornia_siglip2.losses.distill.SelfDistillationLoss`, the model is not a submodule: pass it
    to :meth:`forward` and :meth:`update_teacher`. The loss owns the LocCa decoder, the distillation heads,
    mask token and frozen teacher: optimize ``model.parameters()`` and the parameters of this module with
    ``requires_grad``.

    Args:
        locca: the LocCa loss with its decoder (see :meth:`from_model` for the default one).
        distillation: the self-distillation loss built on the model (its teacher is a copy of the model's
            vision tower); required when the schedule switches distillation on, refused otherwise.
        schedule: the weights; defaults to ``SigLip2LossSchedule()`` (So400m's size factor, 1.0).
        sigmoid: the sigmoid loss, given the model's ``logit_scale`` and ``logit_bias`` (its own, if any, are
            not used); defaults to ``SigmoidLoss(None, None)``. Pass one with ``chunk_size`` or
            ``distributed`` for large batches.

    Raises:
        ValueError: ``distillation`` is missing while the schedule switches it on, or given while it never does.

    Example:
        >>> from kornia_siglip2 import SigLip2, SigLip2Config
        >>> config = SigLip2Config(model_type="siglip",
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        ...                        patch_size=4, image_size=16),
        ...     text_config=dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, max_position_embeddings=8))
        >>> model = SigLip2(config)
        >>> vocabulary = LocCaVocabulary(text_vocab_size=20, num_bins=8)
        >>> loss_fn = SigLip2Loss.from_model(model, vocabulary, SigLip2LossSchedule(size_factor=0.25),
        ...     distillation_options=dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=32))
        >>> targets = LocCaTargets.build([[5, 6], [7, 8]], [[5], [8]], torch.tensor([[0.1, 0.1, 0.6, 0.7]] * 2),
        ...                              vocabulary, max_length=8)
        >>> out = loss_fn(model, torch.randint(0, 20, (2, 8)), targets, progress=0.9, images=torch.rand(2, 3, 16, 16))
        >>> out.weights
        {'sigmoid': 1.0, 'locca': 1.0, 'consistency': 0.25, 'masked': 0.0625}
        >>> out.loss.backward()
        >>> loss_fn.update_teacher(model)  # after optimizer.step()
    """

    def __init__(
        self,
        locca: LocCaLoss,
        distillation: SelfDistillationLoss | None = None,
        schedule: SigLip2LossSchedule | None = None,
        *,
        sigmoid: SigmoidLoss | None = None,
    ) -> None:
        super().__init__()
        self.schedule = SigLip2LossSchedule() if schedule is None else schedule
        if self.schedule.distill_start is not None and distillation is None:
            raise ValueError(
                f"The schedule switches self-distillation on at {self.schedule.distill_start} but no distillation "
                "module was given: pass one, or a schedule with distill_start=None."
            )
        if self.schedule.distill_start is None and distillation is not None:
            raise ValueError(
                "A distillation module was given but the schedule never switches it on (distill_start=None)."
            )
        self.sigmoid = SigmoidLoss(None, None) if sigmoid is None else sigmoid
        self.locca = locca
        self.distillation = distillation
        self.distillation_started = False

    @classmethod
    def from_model(
        cls,
        model: SigLip2,
        vocabulary: LocCaVocabulary | None = None,
        schedule: SigLip2LossSchedule | None = None,
        *,
        distillation_options: dict[str, Any] | None = None,
        sigmoid: SigmoidLoss | None = None,
    ) -> SigLip2Loss:
        """The loss with the default LocCa decoder and self-distillation heads sized from ``model``.

        Args:
            model: the SigLIP 2 model to train; the teacher starts as a copy of its vision tower.
            vocabulary: LocCa token layout; defaults to the text vocabulary plus 1000 box bins.
            schedule: defaults to the schedule of the model's size, inferred from its vision width
                (:meth:`SigLip2LossSchedule.from_vision_width`).
            distillation_options: keyword arguments of
                :class:`~kornia_siglip2.losses.distill.SelfDistillationLoss` (head sizes, views, seed).
            sigmoid: see the class arguments.

        Returns:
            the loss, on the model's device and dtype.

        Raises:
            ValueError: no ``schedule`` and a vision width that is not a SigLIP 2 size.
        """
        config = model.config
        if schedule is None:
            schedule = SigLip2LossSchedule.from_vision_width(config.vision_config.hidden_size)
        locca = LocCaLoss(LocCaDecoder.from_config(config, vocabulary))
        distillation = None
        if schedule.distill_start is not None:
            distillation = SelfDistillationLoss(model, **(distillation_options or {}))
        parameter = next(model.parameters())
        return cls(locca, distillation, schedule, sigmoid=sigmoid).to(device=parameter.device, dtype=parameter.dtype)

    def forward(
        self,
        model: SigLip2,
        input_ids: torch.Tensor,
        locca_targets: LocCaTargets,
        *,
        progress: float,
        images: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> SigLip2LossOutput:
        """All terms for one batch of :math:`n` image-text pairs at a training progress.

        Args:
            model: the :class:`~kornia_siglip2.SigLip2` being trained (the student).
            input_ids: :math:`(n, L)` text ids; row ``i`` is the caption of image ``i``.
            locca_targets: the LocCa tasks of the :math:`n` images, :math:`(n, 3, L_{dec})`.
            progress: fraction of training done, in :math:`[0, 1]`.
            images: :math:`(n, C, H, W)` images, normalized as the model expects.
            patches: packed images :math:`(N, p \\cdot p \\cdot C)` (NaFlex batches), instead of ``images``.
            grid_thw: :math:`(n, 3)` grid of each packed image, with ``patches``.
            attention_mask: optional :math:`(n, L)` text mask (SigLIP trains without one).
            local_views: optional precomputed SILC local views, see ``SelfDistillationLoss.forward``.
            mask: optional bool :math:`(N,)` TIPS patch mask, see ``SelfDistillationLoss.forward``.

        Returns:
            :class:`SigLip2LossOutput` with the total, each term and the weights used.

        Raises:
            ValueCheckError: ``progress`` outside :math:`[0, 1]`, images missing or given twice, or batch sizes that
                disagree.
        """
        weights = self.schedule.loss_weights(progress)
        check_shape(input_ids, ["n", "L"], "input_ids must be (n, L) text ids")
        check(images is None or images.ndim == 4, "images must be (n, C, H, W); pass packed images as patches.")
        # packed in, packed out: tokens (N, D) with cu_seqlens for the decoder and the distillation
        packed = pack_inputs(
            images,
            patches=patches,
            grid_thw=grid_thw,
            patch_size=model.patch_size,
            drop_remainder=not model.config.is_naflex,
        )
        vision_output = model.get_image_features(packed)
        check(vision_output.pooler_output is not None, "SigLip2Loss needs the MAP head: vision_use_head=True.")
        num_images, num_texts = vision_output.pooler_output.shape[0], input_ids.shape[0]
        check(
            num_images == num_texts == locca_targets.input_ids.shape[0],
            lambda: (
                f"Expected one caption and one LocCa target per image: {num_images} images, {num_texts} input_ids "
                f"rows, {locca_targets.input_ids.shape[0]} targets."
            ),
        )
        image_embeds = F.normalize(vision_output.pooler_output, dim=-1)
        text_embeds = model.encode_text(input_ids, attention_mask, normalize=True)
        sigmoid_loss = self.sigmoid(image_embeds, text_embeds, model.logit_scale, model.logit_bias)
        locca_output = self.locca(vision_output.last_hidden_state, vision_output.cu_seqlens, locca_targets)

        active = self.schedule.distillation_active(progress)
        if active:
            if self.distillation is None:  # __init__ refuses such a schedule; guard against later mutation
                raise RuntimeError("The schedule switches self-distillation on but SigLip2Loss has no distillation.")
            if self.training and not self.distillation_started:
                self.distillation.reset_teacher(model)
                self.distillation_started = True
            if images is not None:
                distilled = self.distillation(model, images, local_views=local_views, mask=mask)
            else:
                distilled = self.distillation(
                    model, patches=patches, grid_thw=grid_thw, local_views=local_views, mask=mask
                )
            consistency_loss, masked_loss = distilled.consistency_loss, distilled.masked_loss
        else:
            # not computed: reported as 0 so that the total stays the weighted sum of the terms
            consistency_loss = masked_loss = sigmoid_loss.new_zeros(())

        total = (
            weights["sigmoid"] * sigmoid_loss
            + weights["locca"] * locca_output.loss
            + weights["consistency"] * consistency_loss
            + weights["masked"] * masked_loss
        )
        return SigLip2LossOutput(
            loss=total,
            sigmoid_loss=sigmoid_loss,
            locca_loss=locca_output.loss,
            consistency_loss=consistency_loss,
            masked_loss=masked_loss,
            weights=weights,
            locca_task_losses=locca_output.task_losses,
            distillation_active=active,
        )

    @torch.no_grad()
    def update_teacher(self, model: SigLip2) -> None:
        """EMA step of the teacher towards ``model``; call after each optimizer step. A no-op before the switch."""
        if self.distillation is not None and self.distillation_started:
            self.distillation.update_teacher(model)

    def get_extra_state(self) -> torch.Tensor:
        """Saved in ``state_dict()``: whether the teacher was already reset at the switch, as a bool tensor.

        A tensor, not a dict, so that safetensors checkpoints (which hold tensors only) can store it.
        """
        return torch.tensor(self.distillation_started)

    def set_extra_state(self, state: torch.Tensor | dict[str, bool]) -> None:
        """Restore :meth:`get_extra_state` (also the ``{"distillation_started": ...}`` dict of release 0.1)."""
        value = state["distillation_started"] if isinstance(state, dict) else state
        self.distillation_started = bool(value)

    def extra_repr(self) -> str:
        """The schedule, shown by ``repr``."""
        return f"schedule={self.schedule}"


def _check_progress(progress: float) -> None:
    check(0.0 <= progress <= 1.0, lambda: f"progress must be in [0, 1], got {progress}.")
