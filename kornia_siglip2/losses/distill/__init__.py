"""SigLIP 2 self-distillation (paper section 2.3): SILC consistency and TIPS masked prediction, EMA teacher.

``heads`` holds the DINO heads and the cross-entropy, ``ema`` the EMA teacher, ``views`` what the student sees
(local crops, patch masks), ``loss`` the module that ties them together.
"""

from kornia_siglip2.losses.distill.ema import EMATeacher
from kornia_siglip2.losses.distill.heads import DINOHead, distillation_cross_entropy, teacher_probabilities
from kornia_siglip2.losses.distill.loss import DistillationBranch, SelfDistillationLoss, SelfDistillationOutput
from kornia_siglip2.losses.distill.views import (
    GLOBAL_CROP_SCALE,
    LOCAL_CROP_SCALE,
    LocalViews,
    global_view_augmentation,
    local_view_size,
    random_patch_mask,
)

__all__ = [
    "GLOBAL_CROP_SCALE",
    "LOCAL_CROP_SCALE",
    "DINOHead",
    "DistillationBranch",
    "EMATeacher",
    "LocalViews",
    "SelfDistillationLoss",
    "SelfDistillationOutput",
    "distillation_cross_entropy",
    "global_view_augmentation",
    "local_view_size",
    "random_patch_mask",
    "teacher_probabilities",
]
