"""EMA teacher: a frozen copy of the student updated by an exponential moving average of its weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kornia_siglip2.errors import check

__all__ = ["EMATeacher"]


class EMATeacher(nn.Module):
    """Frozen deep copy of a student module, updated as ``t = m * t + (1 - m) * s`` after each step.

    The momentum is fixed: SILC keeps it constant because a schedule that goes to 1 stops the teacher
    from following what the student keeps learning from the image-text loss. 0.996 is DINO's base
    momentum. The copy never needs a gradient: its parameters have ``requires_grad=False`` and
    :meth:`forward` runs under ``torch.no_grad``. It stays in eval mode whatever ``train()`` says, as the
    teacher is an average of weights, not a second stochastic network. Buffers are copied, not averaged.

    Sharded like the student (FSDP2 ``fully_shard`` on both, the same mesh), the update and the reset run on
    each rank's local shards: no communication, and elementwise the same numbers as unsharded.

    Args:
        student: the module to copy (structure and current weights).
        momentum: EMA momentum :math:`m` in ``[0, 1]``.

    Raises:
        ValueCheckError: ``momentum`` is outside ``[0, 1]`` (kornia check).

    Example:
        >>> student = torch.nn.Linear(3, 2)
        >>> teacher = EMATeacher(student, momentum=0.9)
        >>> with torch.no_grad():
        ...     _ = student.weight.add_(1.0)
        >>> teacher.update(student)
        >>> torch.allclose(teacher.module.weight, student.weight - 0.9)
        True
        >>> teacher(torch.randn(4, 3)).requires_grad
        False
    """

    def __init__(self, student: nn.Module, momentum: float = 0.996) -> None:
        super().__init__()
        check(0.0 <= momentum <= 1.0, f"momentum must be in [0, 1], got {momentum}.")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """Set the mode of this wrapper; the copied module stays in eval mode."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher copy under ``torch.no_grad`` with the arguments of the student's forward."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def reset_from(self, student: nn.Module) -> None:
        """Copy the student's current weights and buffers (switching the teacher on, SigLIP 2: at 80 %).

        Raises:
            ValueError: the student's parameters or buffers differ in names or shapes from the teacher's.
        """
        teacher_tensors, student_tensors = self._paired(student, parameters=True, buffers=True)
        torch._foreach_copy_(teacher_tensors, student_tensors)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step: every parameter becomes ``m * teacher + (1 - m) * student``; buffers are copied.

        Both products are rounded before the sum, so the result is exactly the formula evaluated with
        tensor ops (no fused multiply-add).

        Raises:
            ValueError: the student's parameters or buffers differ in names or shapes from the teacher's.
        """
        teacher_params, student_params = self._paired(student, parameters=True, buffers=False)
        # foreach: one kernel per op for all parameters instead of one per parameter (timm ModelEmaV3 does
        # the same)
        torch._foreach_mul_(teacher_params, self.momentum)
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - self.momentum))
        teacher_buffers, student_buffers = self._paired(student, parameters=False, buffers=True)
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, student_buffers)

    def _paired(
        self, student: nn.Module, *, parameters: bool, buffers: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student tensors in matching order, checked by name and shape."""
        teacher: dict[str, torch.Tensor] = {}
        source: dict[str, torch.Tensor] = {}
        if parameters:
            teacher.update(self.module.named_parameters())
            source.update(student.named_parameters())
        if buffers:
            teacher.update(self.module.named_buffers())
            source.update(student.named_buffers())
        if teacher.keys() != source.keys():
            missing = sorted(teacher.keys() - source.keys())[:5]
            unexpected = sorted(source.keys() - teacher.keys())[:5]
            raise ValueError(
                f"The student does not match the teacher: missing {missing}, unexpected {unexpected} "
                "(pass the module the teacher was copied from)."
            )
        for name, tensor in teacher.items():
            if tensor.shape != source[name].shape:
                raise ValueError(
                    f"Shape of {name!r} differs: teacher {tuple(tensor.shape)}, student {tuple(source[name].shape)}."
                )
        names = list(teacher)
        pairs = [_local_pair(name, teacher[name], source[name].detach()) for name in names]
        return [pair[0] for pair in pairs], [pair[1] for pair in pairs]


def _local_pair(name: str, teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain tensors, or the local shards of two DTensors sharded alike (foreach ops have no DTensor rule)."""
    sharded = [hasattr(tensor, "placements") for tensor in (teacher, student)]
    if not any(sharded):
        return teacher, student
    if not all(sharded) or (teacher.placements, teacher.device_mesh) != (student.placements, student.device_mesh):
        raise ValueError(
            f"{name!r}: the teacher and the student must be sharded alike (fully_shard both on the same mesh), "
            f"or neither."
        )
    return teacher.to_local(), student.to_local()
