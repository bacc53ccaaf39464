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

"""Tests of the SigLIP sigmoid loss against its closed form and a pair-by-pair float64 sum in plain Python."""

import math

import pytest
import torch
import torch.nn.functional as F

from kornia.losses import SigmoidLoss, sigmoid_loss

from testing.base import BaseTester


def _pairwise_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: float, logit_bias: float) -> float:
    """The SigLIP paper's loss (Algorithm 1) summed pair by pair in Python floats."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = math.exp(logit_scale) * float(image[i].double() @ text[j].double()) + logit_bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * logit))  # -log sigmoid(label * logit)
    return total / n


def _embeds(n: int, device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, 8, generator=generator, dtype=torch.float64), dim=-1)
    return image.to(device, dtype), text.to(device, dtype)


class TestSigmoidLoss(BaseTester):
    def test_smoke(self, device, dtype):
        image, text = _embeds(3, device, dtype)
        loss = SigmoidLoss().to(device, dtype)(image, text)
        assert loss.dim() == 0

    def test_exception(self, device, dtype):
        image, text = _embeds(3, device, dtype)
        with pytest.raises(Exception):
            sigmoid_loss(image, text[:2], 0.0, 0.0)
        with pytest.raises(Exception):
            sigmoid_loss(image[0], text[0], 0.0, 0.0)
        with pytest.raises(Exception, match="at least one"):
            sigmoid_loss(image[:0], text[:0], 0.0, 0.0)
        with pytest.raises(Exception, match="one-element"):
            sigmoid_loss(image, text, torch.zeros(2, device=device, dtype=dtype), 0.0)

    @pytest.mark.parametrize("n", [1, 2, 5])
    def test_cardinality(self, device, dtype, n):
        image, text = _embeds(n, device, dtype)
        assert sigmoid_loss(image, text, 1.0, -1.0).shape == ()

    def test_closed_form_orthogonal(self, device, dtype):
        # all pairs orthogonal: every logit is b, so the loss is softplus(-b) + (n - 1) softplus(b)
        basis = torch.eye(8, device=device, dtype=dtype)
        loss = sigmoid_loss(basis[:4], basis[4:], math.log(10.0), -10.0)
        expected = math.log1p(math.exp(10.0)) + 3 * math.log1p(math.exp(-10.0))
        self.assert_close(loss, torch.tensor(expected, device=device, dtype=dtype))
        self.assert_close(loss, torch.tensor(10.000181596, device=device, dtype=dtype))

    @pytest.mark.parametrize(("logit_scale", "logit_bias"), [(math.log(10.0), -10.0), (math.log(109.9), -15.9)])
    def test_pairwise_reference(self, device, dtype, logit_scale, logit_bias):
        image, text = _embeds(6, device, dtype, seed=3)
        expected = _pairwise_reference(image, text, logit_scale, logit_bias)
        loss = sigmoid_loss(image, text, logit_scale, logit_bias)
        self.assert_close(loss, torch.tensor(expected, device=device, dtype=dtype))

    def test_module_parameters(self, device, dtype):
        loss_fn = SigmoidLoss().to(device, dtype)
        self.assert_close(loss_fn.logit_scale.exp(), torch.tensor(10.0, device=device, dtype=dtype))
        self.assert_close(loss_fn.logit_bias, torch.tensor(-10.0, device=device, dtype=dtype))
        image, text = _embeds(4, device, dtype)
        loss_fn(image, text).backward()
        assert loss_fn.logit_scale.grad is not None and loss_fn.logit_bias.grad is not None

    def test_gradcheck(self, device):
        image, text = _embeds(4, device, torch.float64)
        scale, bias = torch.tensor(1.5, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
        self.gradcheck(sigmoid_loss, (image, text, scale.to(device), bias.to(device)))

    def test_dynamo(self, device, dtype, torch_optimizer):
        image, text = _embeds(4, device, dtype)
        compiled = torch_optimizer(sigmoid_loss)
        self.assert_close(compiled(image, text, 1.5, -2.0), sigmoid_loss(image, text, 1.5, -2.0))
