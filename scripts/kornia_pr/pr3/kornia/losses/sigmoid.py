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

r"""Sigmoid loss of SigLIP over a batch of image-text pairs."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from kornia.core.check import KORNIA_CHECK, KORNIA_CHECK_SAME_SIZE, KORNIA_CHECK_SHAPE

__all__ = ["SigmoidLoss", "sigmoid_loss"]


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: Union[torch.Tensor, float],
    logit_bias: Union[torch.Tensor, float],
) -> torch.Tensor:
    r"""Pairwise sigmoid loss of SigLIP: every image-text pair of the batch is a binary classification.

    From Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Algorithm 1 (transformers' ``SiglipModel``
    computes the same loss):

    .. math::
        \mathcal{L} = -\frac{1}{n} \sum_{i=1}^{n} \sum_{j=1}^{n} \log \sigma\big(y_{ij} (e^{t'} x_i \cdot z_j + b)\big),
        \qquad y_{ij} = 2 \delta_{ij} - 1

    Row :math:`i` of the images and row :math:`i` of the texts are the only matching pair of each row. The sum runs
    over all :math:`n^2` pairs and is divided by :math:`n`, not :math:`n^2`.

    Args:
        image_embeds: L2-normalized image embeddings :math:`(n, D)`.
        text_embeds: L2-normalized text embeddings :math:`(n, D)`.
        logit_scale: The log-temperature :math:`t'`, a scalar or one-element tensor (a model's ``logit_scale``
            parameter); the logits are scaled by :math:`e^{t'}`, without clamping.
        logit_bias: The bias :math:`b`, a scalar or one-element tensor.

    Returns:
        The loss, a scalar tensor.

    Raises:
        ShapeError: if the embeddings are not :math:`(n, D)` or differ in shape.
        BaseError: if the batch is empty or ``logit_scale`` / ``logit_bias`` has more than one element.

    Example:
        >>> basis = torch.eye(8, dtype=torch.float64)
        >>> image_embeds, text_embeds = basis[:4], basis[4:]  # all pairs orthogonal: every logit is b
        >>> loss = sigmoid_loss(image_embeds, text_embeds, math.log(10.0), -10.0)
        >>> round(loss.item(), 6)  # softplus(10) + 3 softplus(-10)
        10.000182
    """
    KORNIA_CHECK_SHAPE(image_embeds, ["N", "D"])
    KORNIA_CHECK_SHAPE(text_embeds, ["N", "D"])
    KORNIA_CHECK_SAME_SIZE(image_embeds, text_embeds, msg="image_embeds and text_embeds must both be (n, D).")
    KORNIA_CHECK(image_embeds.shape[0] > 0, "sigmoid_loss needs at least one image-text pair.")
    scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
    bias = torch.as_tensor(logit_bias, dtype=image_embeds.dtype, device=image_embeds.device)
    KORNIA_CHECK(scale.numel() == 1, "logit_scale must be a scalar or a one-element tensor.")
    KORNIA_CHECK(bias.numel() == 1, "logit_bias must be a scalar or a one-element tensor.")
    logits = image_embeds @ text_embeds.T * scale.reshape(()).exp() + bias.reshape(())
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class SigmoidLoss(nn.Module):
    r"""Pairwise sigmoid loss of SigLIP, owning the learnable log-temperature :math:`t'` and bias :math:`b`.

    See :func:`sigmoid_loss`.

    Args:
        init_logit_scale: Initial :math:`t'` of the parameter ``logit_scale``. Default: ``log(10)``, the SigLIP paper's
            (section 3.2).
        init_logit_bias: Initial :math:`b` of the parameter ``logit_bias``. Default: ``-10``, the SigLIP paper's: the
            :math:`n - 1` negatives of each row then start with a small loss.

    Example:
        >>> loss_fn = SigmoidLoss()
        >>> image_embeds = F.normalize(torch.randn(8, 16), dim=-1)
        >>> text_embeds = F.normalize(torch.randn(8, 16), dim=-1)
        >>> loss = loss_fn(image_embeds, text_embeds)
        >>> loss.shape, round(loss_fn.logit_bias.item(), 1)
        (torch.Size([]), -10.0)
    """

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: Optional[torch.Tensor] = None,
        logit_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""Loss of a batch of pairs.

        Args:
            image_embeds: L2-normalized image embeddings :math:`(n, D)`.
            text_embeds: L2-normalized text embeddings :math:`(n, D)`.
            logit_scale: A :math:`t'` to use instead of the module's, e.g. a model's own.
            logit_bias: A :math:`b` to use instead of the module's.

        Returns:
            The loss, a scalar tensor.
        """
        return sigmoid_loss(
            image_embeds,
            text_embeds,
            self.logit_scale if logit_scale is None else logit_scale,
            self.logit_bias if logit_bias is None else logit_bias,
        )
