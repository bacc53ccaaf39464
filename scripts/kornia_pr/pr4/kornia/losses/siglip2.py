# LICENSE HEADER MANAGED BY add-license-header
#
# Copyright 2018 Kornia Team
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#

r"""The SigLIP 2 training objective: self-distillation cross-entropy and the weighting schedule of its four terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kornia.core.check import KORNIA_CHECK, KORNIA_CHECK_SHAPE

__all__ = [
    "SIGLIP2_SIZE_FACTORS",
    "DistillationCrossEntropy",
    "SigLip2LossSchedule",
    "distillation_cross_entropy",
    "update_teacher_center",
]

#: Factor on both self-distillation weights per model size (Tschannen et al. 2025, "SigLIP 2", section 2.3).
SIGLIP2_SIZE_FACTORS: Dict[str, float] = {"B": 0.25, "L": 0.5, "So400m": 1.0, "g": 0.5}


def distillation_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    center: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Cross-entropy of student head outputs against centered, sharpened teacher outputs (DINO / iBOT).

    SigLIP 2 (section 2.3) trains its SILC local-to-global consistency term and its TIPS masked-prediction term with
    this loss, against an exponential-moving-average teacher:

    .. math::
        \ell_m = -\sum_{k} p^t_{mk} \log p^s_{mk}, \qquad
        p^t_m = \operatorname{softmax}\Big(\frac{t_m - c}{\tau_t}\Big), \qquad
        p^s_m = \operatorname{softmax}\Big(\frac{s_m}{\tau_s}\Big)

    No gradient flows into the teacher. :math:`\ell_m` is the teacher's entropy plus
    :math:`\mathrm{KL}(p^t_m \,\|\, p^s_m)`, so it is never below that entropy. The temperatures default to DINO's
    (Caron et al. 2021, section 3.1). Half-precision inputs are computed in float32.

    Args:
        student_logits: Student head outputs :math:`(M, K)`.
        teacher_logits: Teacher head outputs :math:`(M, K)`.
        student_temperature: :math:`\tau_s > 0`.
        teacher_temperature: :math:`\tau_t > 0`.
        center: Optional running mean :math:`c` of the teacher outputs, :math:`(K,)` (see
            :func:`update_teacher_center`).

    Returns:
        The per-row cross-entropies :math:`(M,)`, in float32 or float64; reduce them as the loss needs.

    Raises:
        ShapeError: if the logits are not :math:`(M, K)`.
        BaseError: if the shapes differ, a temperature is not positive or ``center`` is not :math:`(K,)`.

    Example:
        >>> student = torch.zeros(2, 4)
        >>> teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
        >>> loss = distillation_cross_entropy(student, teacher)
        >>> [round(value, 4) for value in loss.tolist()]  # a uniform student: log K for every row
        [1.3863, 1.3863]
    """
    KORNIA_CHECK_SHAPE(student_logits, ["M", "K"])
    KORNIA_CHECK_SHAPE(teacher_logits, ["M", "K"])
    KORNIA_CHECK(
        student_logits.shape == teacher_logits.shape,
        f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
        "the same shape (M, K).",
    )
    KORNIA_CHECK(student_temperature > 0, f"student_temperature must be positive, got {student_temperature}.")
    KORNIA_CHECK(teacher_temperature > 0, f"teacher_temperature must be positive, got {teacher_temperature}.")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher = teacher_logits.detach().to(dtype)
    if center is not None:
        KORNIA_CHECK(
            center.shape == teacher.shape[-1:],
            f"center must have shape ({teacher.shape[-1]},), got {tuple(center.shape)}.",
        )
        teacher = teacher - center.detach().to(dtype)
    targets = F.softmax(teacher / teacher_temperature, dim=-1)
    log_probs = F.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)
    return -(targets * log_probs).sum(-1)


def update_teacher_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    r"""The next running center of the teacher outputs: :math:`m c + (1 - m) \operatorname{mean}_m t_m` (DINO).

    Centering (with sharpening by :math:`\tau_t`) keeps the teacher from collapsing to one prototype.

    Args:
        center: The current center :math:`(K,)`.
        teacher_logits: Teacher head outputs of the batch :math:`(M, K)`.
        momentum: :math:`m` in :math:`[0, 1]` (DINO: 0.9).

    Returns:
        The new center :math:`(K,)`, without gradient.

    Example:
        >>> center = update_teacher_center(torch.zeros(2), torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
        >>> [round(value, 4) for value in center.tolist()]  # 0.1 times the batch mean (2, 4)
        [0.2, 0.4]
    """
    KORNIA_CHECK_SHAPE(teacher_logits, ["M", "K"])
    KORNIA_CHECK(
        center.shape == teacher_logits.shape[-1:],
        f"center must have shape ({teacher_logits.shape[-1]},), got {tuple(center.shape)}.",
    )
    KORNIA_CHECK(0.0 <= momentum <= 1.0, f"momentum must be in [0, 1], got {momentum}.")
    batch_mean = teacher_logits.detach().to(center.dtype).mean(0)
    return (center.detach() * momentum + batch_mean * (1.0 - momentum)).detach()


class DistillationCrossEntropy(nn.Module):
    r"""Mean :func:`distillation_cross_entropy` with the running teacher center as a buffer.

    Args:
        num_prototypes: Output size :math:`K` of the heads.
        student_temperature: :math:`\tau_s` (DINO: 0.1).
        teacher_temperature: :math:`\tau_t` (DINO: 0.04).
        center_momentum: Momentum of the center (DINO: 0.9); the center is updated on every training-mode call.

    Example:
        >>> loss_fn = DistillationCrossEntropy(num_prototypes=16)
        >>> student = torch.randn(8, 16, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(8, 16))
        >>> loss.shape, loss_fn.center.shape
        (torch.Size([]), torch.Size([16]))
    """

    center: torch.Tensor

    def __init__(
        self,
        num_prototypes: int,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        KORNIA_CHECK(num_prototypes > 0, f"num_prototypes must be positive, got {num_prototypes}.")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(num_prototypes))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        r"""Mean cross-entropy over the rows, then (in training mode) the center update.

        Args:
            student_logits: Student head outputs :math:`(M, K)`.
            teacher_logits: Teacher head outputs :math:`(M, K)`.

        Returns:
            The mean loss, a scalar tensor.
        """
        loss = distillation_cross_entropy(
            student_logits, teacher_logits, self.student_temperature, self.teacher_temperature, self.center
        ).mean()
        if self.training:
            self.center = update_teacher_center(self.center, teacher_logits, self.center_momentum)
        return loss


@dataclass
class SigLip2LossSchedule:
    r"""Weights of the four SigLIP 2 loss terms as a function of training progress.

    Sigmoid image-text loss and LocCa decoder loss count equally from the start (SigLIP 2, section 2.2).
    Self-distillation (SILC consistency and TIPS masked prediction) switches on at ``distill_start``, the last 20 % of
    training in the paper (section 2.3), with weights ``consistency_weight * size_factor`` and
    ``masked_weight * size_factor``; before it, both are 0.

    Args:
        size_factor: Factor on both self-distillation weights; :data:`SIGLIP2_SIZE_FACTORS` has the paper's per size.
        distill_start: Progress in :math:`[0, 1]` at which self-distillation switches on, or ``None`` for never (the
            paper leaves it off for NaFlex training).
        sigmoid_weight: Weight of the sigmoid loss.
        locca_weight: Weight of the LocCa loss.
        consistency_weight: SILC weight before the size factor.
        masked_weight: TIPS weight before the size factor.

    Example:
        >>> schedule = SigLip2LossSchedule(size_factor=SIGLIP2_SIZE_FACTORS["B"])
        >>> schedule.weights(0.5)
        {'sigmoid': 1.0, 'locca': 1.0, 'consistency': 0.0, 'masked': 0.0}
        >>> schedule.weights(0.9)
        {'sigmoid': 1.0, 'locca': 1.0, 'consistency': 0.25, 'masked': 0.0625}
    """

    size_factor: float = 1.0
    distill_start: Optional[float] = 0.8
    sigmoid_weight: float = 1.0
    locca_weight: float = 1.0
    consistency_weight: float = 1.0
    masked_weight: float = 0.25

    def __post_init__(self) -> None:
        for name in ("size_factor", "sigmoid_weight", "locca_weight", "consistency_weight", "masked_weight"):
            KORNIA_CHECK(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}.")
        KORNIA_CHECK(
            self.distill_start is None or 0.0 <= self.distill_start <= 1.0,
            f"distill_start must be in [0, 1] or None, got {self.distill_start}.",
        )

    def weights(self, progress: float) -> Dict[str, float]:
        r"""The weight of each term at a training progress.

        Args:
            progress: Fraction of training done, in :math:`[0, 1]` (e.g. ``step / total_steps``).

        Returns:
            ``{"sigmoid": ..., "locca": ..., "consistency": ..., "masked": ...}``.
        """
        KORNIA_CHECK(0.0 <= progress <= 1.0, f"progress must be in [0, 1], got {progress}.")
        active = self.distill_start is not None and progress >= self.distill_start
        factor = self.size_factor if active else 0.0
        return {
            "sigmoid": self.sigmoid_weight,
            "locca": self.locca_weight,
            "consistency": self.consistency_weight * factor,
            "masked": self.masked_weight * factor,
        }

    def combine(self, losses: Dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        r"""The weighted sum of the loss terms at a training progress.

        A term whose weight is 0 may be left out of ``losses`` (e.g. self-distillation before ``distill_start``, so
        its teacher is never run); a term with a positive weight must be present.

        Args:
            losses: Scalar loss per term name (``"sigmoid"``, ``"locca"``, ``"consistency"``, ``"masked"``).
            progress: Fraction of training done, in :math:`[0, 1]`.

        Returns:
            The total loss, a scalar tensor.

        Example:
            >>> schedule = SigLip2LossSchedule()
            >>> total = schedule.combine({"sigmoid": torch.tensor(2.0), "locca": torch.tensor(3.0)}, progress=0.1)
            >>> total.item()
            5.0
        """
        weights = self.weights(progress)
        unknown = sorted(set(losses) - set(weights))
        KORNIA_CHECK(not unknown, f"unknown loss terms {unknown}; the terms are {sorted(weights)}.")
        missing = sorted(name for name, weight in weights.items() if weight > 0 and name not in losses)
        KORNIA_CHECK(not missing, f"the terms {missing} have a positive weight at progress {progress} but no loss.")
        KORNIA_CHECK(len(losses) > 0, "combine needs at least one loss term.")
        terms = [weights[name] * loss for name, loss in losses.items() if weights[name] > 0]
        if not terms:  # every given term has weight 0: a zero that keeps the graph and the dtype
            terms = [loss * 0.0 for loss in losses.values()]
        return torch.stack(terms).sum()
