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

"""SigLip2 image preprocessor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kornia.core.check import KORNIA_CHECK
from kornia.enhance.normalize import Normalize
from kornia.enhance.rescale import Rescale

__all__ = ["SigLip2ImagePreprocessor"]


class _FilterResize(nn.Module):
    """Resize with the resampling filter's own support, as PIL (and so transformers' ``SiglipImageProcessor``) does.

    ``F.interpolate(antialias=True)`` widens the bilinear (triangle) or bicubic (Keys, ``a = -0.5``) filter by the
    scale factor when downsampling, which is PIL's ``Image.resize``; ``kornia.geometry.transform.resize`` blurs with a
    Gaussian before resampling instead, which differs from the checkpoints' preprocessing on fine detail. Other modes
    are passed to ``F.interpolate`` unchanged, without antialiasing.
    """

    def __init__(self, size: tuple[int, int], interpolation: str) -> None:
        super().__init__()
        self.size = size
        self.interpolation = interpolation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.interpolation in ("bilinear", "bicubic"):
            return F.interpolate(images, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
        return F.interpolate(images, size=self.size, mode=self.interpolation)


class SigLip2ImagePreprocessor(nn.Module):
    """Image preprocessor for SigLip2 models.

    This preprocessor applies the following steps:
    - Rescales pixel values from [0, 255] to [0, 1]
    - Resizes images to the specified size with ``interpolation``, antialiased as PIL resizes (the filter widened by
      the scale factor when downsampling; transformers' ``SiglipImageProcessor`` resizes with PIL)
    - Normalizes with mean=[0.5, 0.5, 0.5] and std=[0.5, 0.5, 0.5] (converts [0, 1] to [-1, 1])

    Args:
        image_size: Target image size (height, width). Default: (224, 224)
        mean: Normalization mean. Default: [0.5, 0.5, 0.5]
        std: Normalization std. Default: [0.5, 0.5, 0.5]
        rescale_factor: Rescaling factor. Default: 1/255
        interpolation: Resize interpolation. The default ``"bilinear"`` is the resampling of the SigLIP 2 checkpoints
            (``"resample": 2`` in their ``preprocessor_config.json``); pass ``"bicubic"`` for the SigLIP 1 checkpoint
            ``google/siglip-base-patch16-224`` (``"resample": 3``).

    Example:
        >>> import torch
        >>> from kornia.models.siglip2 import SigLip2ImagePreprocessor
        >>>
        >>> # Create preprocessor
        >>> preprocessor = SigLip2ImagePreprocessor(image_size=(224, 224))
        >>>
        >>> # Process image (assumes input in [0, 255] range)
        >>> image = torch.randint(0, 255, (3, 300, 400), dtype=torch.float32)
        >>> processed = preprocessor(image)  # range: [-1, 1]
        >>> processed.shape
        torch.Size([1, 3, 224, 224])
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (224, 224),
        mean: list[float] | tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: list[float] | tuple[float, float, float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1.0 / 255.0,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.mean = torch.tensor([mean]) if isinstance(mean, (list, tuple)) else mean
        self.std = torch.tensor([std]) if isinstance(std, (list, tuple)) else std
        self.rescale_factor = rescale_factor

        # build preprocessing pipeline
        preproc_list: list[nn.Module] = []

        # rescale first (convert [0, 255] to [0, 1])
        if rescale_factor != 1.0:
            preproc_list.append(Rescale(factor=rescale_factor))

        # resize (on [0, 1] range): rescaling first changes nothing, both are linear
        preproc_list.append(_FilterResize(size=image_size, interpolation=interpolation))

        # normalize (convert [0, 1] to [-1, 1])
        preproc_list.append(Normalize(mean=self.mean, std=self.std))

        self.preprocessor = nn.Sequential(*preproc_list)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prepare images for SigLIP2 vision encoding.

        Args:
            images: Image tensor with shape :math:`(C, H, W)` or
                :math:`(B, C, H, W)`. Values are expected in the range used by
                the configured rescale factor.

        Returns:
            Batched tensor resized to the configured image size and normalized
            with the stored mean and standard deviation.

        Raises:
            BaseError: if ``images`` is neither 3-D nor 4-D.
        """
        KORNIA_CHECK(
            images.dim() in (3, 4),
            lambda: f"SigLip2ImagePreprocessor takes (C, H, W) or (B, C, H, W) images, got {tuple(images.shape)}.",
        )
        # ensure batch dimension
        if images.dim() == 3:
            images = images.unsqueeze(0)

        # process through pipeline
        return self.preprocessor(images)

    @classmethod
    def from_config(
        cls, image_size: int | tuple[int, int], interpolation: str = "bilinear"
    ) -> SigLip2ImagePreprocessor:
        """Create preprocessor from image size configuration.

        Args:
            image_size: Image size (single int for square, or tuple for (height, width))
            interpolation: Resize interpolation, ``"bilinear"`` for the SigLIP 2 checkpoints and ``"bicubic"`` for the
                SigLIP 1 ``google/siglip-base-patch16-224`` (see the class docstring).

        Returns:
            Preprocessor instance
        """
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        return cls(image_size=image_size, interpolation=interpolation)
