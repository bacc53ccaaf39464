"""DINO projection heads and the cross-entropy between student and (centered, sharpened) teacher outputs."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.errors import check, check_shape

__all__ = ["DINOHead", "distillation_cross_entropy", "teacher_probabilities"]


class DINOHead(nn.Module):
    """DINO projection head: MLP, L2-normalized bottleneck, weight-normalized prototypes.

    ``in_dim -> hidden_dim -> hidden_dim -> bottleneck_dim`` with GELU between the linear layers, then
    L2 normalization and a bias-free linear layer onto ``num_prototypes`` unit-norm prototypes: DINO's
    ``weight_norm`` layer with the norm frozen at 1 (``norm_last_layer=True``), written as a normalized
    weight so it copies, EMA-updates and compiles like any parameter. Each output is the cosine between
    the bottleneck and a prototype, so logits lie in ``[-1, 1]`` and the temperatures set the sharpness.

    Defaults: hidden 2048 and bottleneck 256 as DINO (Caron et al. 2021, ``DINOHead``); 4096 prototypes
    where DINO has 65536 and iBOT 8192, so that each head stays at 7.3 M parameters for a 768-wide tower
    (its output size is a tuning knob, not a number SigLIP 2 reports).

    Args:
        in_dim: feature width :math:`D` (the vision tower's ``hidden_size``).
        hidden_dim: width of the MLP's hidden layers.
        bottleneck_dim: width of the L2-normalized bottleneck.
        num_prototypes: output size :math:`K`.
        num_layers: linear layers in the MLP (DINO: 3).

    Example:
        >>> head = DINOHead(32, hidden_dim=16, bottleneck_dim=8, num_prototypes=64)
        >>> logits = head(torch.randn(5, 32))
        >>> logits.shape, bool(logits.abs().max() <= 1 + 1e-6)
        (torch.Size([5, 64]), True)
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 4096,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        check(num_layers >= 1, f"num_layers must be at least 1, got {num_layers}.")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width_in, width_out))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        # DINO's _init_weights: truncated normal (std 0.02) MLP weights, zero biases; the prototypes keep
        # nn.Linear's default init, as DINO wraps the last layer in weight_norm after that pass.
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def in_dim(self) -> int:
        """Expected feature width."""
        return self.mlp[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project features onto the prototypes.

        Args:
            features: :math:`(*, D)` pooled or per-patch features.

        Returns:
            :math:`(*, K)` logits, cosines in ``[-1, 1]``.

        Raises:
            ValueCheckError: the last dimension of ``features`` is not ``in_dim`` (kornia check).
        """
        check(
            features.ndim >= 1 and features.shape[-1] == self.in_dim,
            f"features must have shape (*, {self.in_dim}), got {tuple(features.shape)}.",
        )
        bottleneck = F.normalize(self.mlp(features), dim=-1)
        return F.linear(bottleneck, F.normalize(self.prototypes.weight, dim=-1))


def teacher_probabilities(
    teacher_logits: torch.Tensor, temperature: float = 0.04, center: torch.Tensor | None = None
) -> torch.Tensor:
    """Centered, sharpened teacher targets ``softmax((t - c) / tau_t)``, detached (DINO).

    Centering and sharpening together keep the teacher from collapsing to one prototype or to the
    uniform distribution (DINO section 3.1). Computed in at least float32.

    Args:
        teacher_logits: :math:`(M, K)` teacher head outputs.
        temperature: teacher temperature :math:`\\tau_t` (DINO: 0.04).
        center: optional :math:`(K,)` running mean of the teacher outputs.

    Returns:
        :math:`(M, K)` probabilities, no gradient.

    Example:
        >>> probs = teacher_probabilities(torch.randn(3, 10))
        >>> torch.allclose(probs.sum(-1), torch.ones(3)), probs.requires_grad
        (True, False)
    """
    check_shape(teacher_logits, ["M", "K"])
    check(temperature > 0, f"temperature must be positive, got {temperature}.")
    logits = teacher_logits.detach()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if center is not None:
        check(
            center.shape == logits.shape[-1:],
            f"center must have shape ({logits.shape[-1]},), got {tuple(center.shape)}.",
        )
        logits = logits - center.to(logits.dtype)
    return F.softmax(logits / temperature, dim=-1)


def distillation_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k p_t log p_s`` of the student against the stop-gradient teacher.

    ``p_t`` is :func:`teacher_probabilities`, ``p_s = softmax(s / tau_s)``. The value is the teacher's
    entropy plus ``KL(p_t || p_s)``, so it is never below the teacher's entropy and equals it (with a zero
    gradient) when the two distributions match. Student temperature 0.1 and teacher 0.04 are DINO's.

    Args:
        student_logits: :math:`(M, K)` student head outputs.
        teacher_logits: :math:`(M, K)` teacher head outputs (no gradient flows into them).
        student_temperature: :math:`\\tau_s`.
        teacher_temperature: :math:`\\tau_t`.
        center: optional :math:`(K,)` teacher center.

    Returns:
        :math:`(M,)` cross-entropies in at least float32; reduce as the loss needs.

    Raises:
        ValueCheckError: shapes differ or a temperature is not positive (kornia check).

    Example:
        >>> student, teacher = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
        >>> loss = distillation_cross_entropy(student, teacher)
        >>> loss.shape, bool((loss >= 0).all())
        (torch.Size([4]), True)
    """
    check_shape(student_logits, ["M", "K"])
    check(
        student_logits.shape == teacher_logits.shape,
        f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
        "must have the same shape (M, K).",
    )
    check(student_temperature > 0, f"student_temperature must be positive, got {student_temperature}.")
    targets = teacher_probabilities(teacher_logits, teacher_temperature, center)
    log_probs = F.log_softmax(student_logits.to(targets.dtype) / student_temperature, dim=-1)
    return -(targets * log_probs).sum(-1)
