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

"""Tests of the SigLIP 2 objective's losses against per-row sums in plain Python floats and the paper's numbers."""

import math

import pytest
import torch

from kornia.losses import (
    SIGLIP2_SIZE_FACTORS,
    DistillationCrossEntropy,
    SigLip2LossSchedule,
    distillation_cross_entropy,
    update_teacher_center,
)

from testing.base import BaseTester

# distillation_cross_entropy of test_values' logits at (tau_s, tau_t) = (0.1, 0.04), from _reference in float64
EXPECTED_VALUES = [7.354693268040952, 19.3784778628391]


def _reference(student, teacher, student_temperature, teacher_temperature, center=None):
    """Per-row -sum_k p_t log p_s, with both softmaxes written out in Python floats."""
    k = student.shape[1]
    shift = [0.0] * k if center is None else [float(c) for c in center]
    rows = []
    for m in range(student.shape[0]):
        t = [(float(teacher[m, j]) - shift[j]) / teacher_temperature for j in range(k)]
        s = [float(student[m, j]) / student_temperature for j in range(k)]
        t_max, s_max = max(t), max(s)
        t_norm = sum(math.exp(value - t_max) for value in t)
        s_log_norm = s_max + math.log(sum(math.exp(value - s_max) for value in s))
        rows.append(-sum(math.exp(tv - t_max) / t_norm * (sv - s_log_norm) for tv, sv in zip(t, s)))
    return rows


def _logits(m, k, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(m, k, generator=generator, dtype=torch.float64)
    teacher = torch.randn(m, k, generator=generator, dtype=torch.float64)
    return student.to(device, dtype), teacher.to(device, dtype)


class TestDistillationCrossEntropy(BaseTester):
    def test_smoke(self, device, dtype):
        student, teacher = _logits(3, 5, device, dtype)
        loss = DistillationCrossEntropy(5).to(device, dtype)(student, teacher)
        assert loss.dim() == 0

    def test_exception(self, device, dtype):
        student, teacher = _logits(3, 5, device, dtype)
        with pytest.raises(Exception, match="same shape"):
            distillation_cross_entropy(student, teacher[:2])
        with pytest.raises(Exception):
            distillation_cross_entropy(student[0], teacher[0])
        with pytest.raises(Exception, match="student_temperature"):
            distillation_cross_entropy(student, teacher, student_temperature=0.0)
        with pytest.raises(Exception, match="center"):
            distillation_cross_entropy(student, teacher, center=torch.zeros(4, device=device, dtype=dtype))
        with pytest.raises(Exception, match="momentum"):
            update_teacher_center(torch.zeros(5, device=device, dtype=dtype), teacher, momentum=1.5)

    @pytest.mark.parametrize(("m", "k"), [(1, 2), (4, 7), (6, 64)])
    def test_cardinality(self, device, dtype, m, k):
        student, teacher = _logits(m, k, device, dtype)
        assert distillation_cross_entropy(student, teacher).shape == (m,)

    @pytest.mark.parametrize(("student_temperature", "teacher_temperature"), [(0.1, 0.04), (1.0, 1.0), (0.5, 0.07)])
    def test_reference(self, device, dtype, student_temperature, teacher_temperature):
        student, teacher = _logits(4, 6, device, dtype, seed=2)
        center = torch.linspace(-0.5, 0.5, 6, device=device, dtype=dtype)
        loss = distillation_cross_entropy(student, teacher, student_temperature, teacher_temperature, center)
        expected = _reference(student, teacher, student_temperature, teacher_temperature, center)
        self.assert_close(loss, torch.tensor(expected, device=device, dtype=loss.dtype))

    def test_values(self, device, dtype):
        student = torch.tensor([[0.3, -1.2, 0.8], [2.0, 0.1, -0.4]], device=device, dtype=dtype)
        teacher = torch.tensor([[0.05, 0.0, -0.02], [-0.1, 0.3, 0.2]], device=device, dtype=dtype)
        # generated with _reference(student, teacher, 0.1, 0.04) in float64
        expected = torch.tensor(EXPECTED_VALUES, device=device, dtype=torch.float64)
        loss = distillation_cross_entropy(student, teacher)
        self.assert_close(loss, expected.to(loss.dtype))

    def test_never_below_teacher_entropy(self, device, dtype):
        student, teacher = _logits(5, 8, device, dtype, seed=4)
        loss = distillation_cross_entropy(student, teacher, 0.5, 0.5)
        targets = torch.softmax(teacher.to(loss.dtype) / 0.5, dim=-1)
        entropy = -(targets * targets.log()).sum(-1)
        assert bool((loss >= entropy - 1e-5).all())
        equal = distillation_cross_entropy(teacher, teacher, 0.5, 0.5)
        self.assert_close(equal, entropy)

    def test_no_gradient_into_teacher(self, device, dtype):
        student, teacher = _logits(3, 4, device, dtype)
        student.requires_grad_(True)
        teacher.requires_grad_(True)
        distillation_cross_entropy(student, teacher).sum().backward()
        assert student.grad is not None and teacher.grad is None

    def test_center_update(self, device, dtype):
        _, teacher = _logits(4, 3, device, dtype)
        center = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)
        expected = [0.9 * float(c) + 0.1 * sum(float(t) for t in teacher[:, j]) / 4 for j, c in enumerate(center)]
        self.assert_close(update_teacher_center(center, teacher), torch.tensor(expected, device=device, dtype=dtype))
        loss_fn = DistillationCrossEntropy(3, center_momentum=0.9).to(device, dtype)
        loss_fn(teacher, teacher)
        self.assert_close(loss_fn.center, update_teacher_center(torch.zeros_like(center), teacher))
        before = loss_fn.center.clone()
        loss_fn.eval()(teacher, teacher)
        self.assert_close(loss_fn.center, before)

    def test_gradcheck(self, device):
        student, teacher = _logits(3, 4, device, torch.float64)
        # the teacher is detached by design: check the gradient with respect to the student only
        self.gradcheck(lambda x: distillation_cross_entropy(x, teacher, 0.5, 0.2), (student,))

    def test_dynamo(self, device, dtype, torch_optimizer):
        student, teacher = _logits(3, 4, device, dtype)
        compiled = torch_optimizer(distillation_cross_entropy)
        self.assert_close(compiled(student, teacher), distillation_cross_entropy(student, teacher))


class TestSigLip2LossSchedule(BaseTester):
    def test_smoke(self, device, dtype):
        assert SigLip2LossSchedule().weights(0.0) == {"sigmoid": 1.0, "locca": 1.0, "consistency": 0.0, "masked": 0.0}

    def test_exception(self, device, dtype):
        with pytest.raises(Exception, match="size_factor"):
            SigLip2LossSchedule(size_factor=-1.0)
        with pytest.raises(Exception, match="distill_start"):
            SigLip2LossSchedule(distill_start=1.5)
        with pytest.raises(Exception, match="progress"):
            SigLip2LossSchedule().weights(1.2)
        with pytest.raises(Exception, match="positive weight"):
            SigLip2LossSchedule().combine({"sigmoid": torch.tensor(1.0)}, 0.5)
        with pytest.raises(Exception, match="unknown"):
            SigLip2LossSchedule().combine(
                {"sigmoid": torch.tensor(1.0), "locca": torch.tensor(1.0), "x": torch.tensor(1.0)}, 0.5
            )

    @pytest.mark.parametrize(("size", "factor"), [("B", 0.25), ("L", 0.5), ("So400m", 1.0), ("g", 0.5)])
    def test_cardinality(self, device, dtype, size, factor):
        # SigLIP 2, section 2.3: weights 1 (SILC) and 0.25 (TIPS) times the size factor, from 80 % of training
        schedule = SigLip2LossSchedule(size_factor=SIGLIP2_SIZE_FACTORS[size])
        assert schedule.weights(0.79)["consistency"] == 0.0
        assert schedule.weights(0.8) == {"sigmoid": 1.0, "locca": 1.0, "consistency": factor, "masked": 0.25 * factor}

    def test_never(self, device, dtype):
        assert SigLip2LossSchedule(distill_start=None).weights(1.0)["masked"] == 0.0

    def test_combine(self, device, dtype):
        losses = {
            name: torch.tensor(value, device=device, dtype=dtype)
            for name, value in {"sigmoid": 2.0, "locca": 3.0, "consistency": 5.0, "masked": 7.0}.items()
        }
        schedule = SigLip2LossSchedule(size_factor=0.5)
        self.assert_close(
            schedule.combine(losses, 0.9), torch.tensor(2.0 + 3.0 + 0.5 * 5.0 + 0.125 * 7.0, device=device, dtype=dtype)
        )
        early = {name: losses[name] for name in ("sigmoid", "locca")}
        self.assert_close(schedule.combine(early, 0.1), torch.tensor(5.0, device=device, dtype=dtype))

    def test_gradcheck(self, device):
        losses = {
            "sigmoid": torch.tensor(1.0, dtype=torch.float64, device=device, requires_grad=True),
            "locca": torch.tensor(2.0, dtype=torch.float64, device=device, requires_grad=True),
        }
        self.gradcheck(
            lambda a, b: SigLip2LossSchedule().combine({"sigmoid": a, "locca": b}, 0.1), tuple(losses.values())
        )
