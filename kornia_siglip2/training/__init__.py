"""Training utilities: the EMA teacher of self-distillation and the augmented views the student sees.

Nothing here is imported by ``import kornia_siglip2``: import ``kornia_siglip2.training`` explicitly. This
``__init__`` imports only the EMA teacher and the views (the self-distillation loss uses them); modules that
use the losses (the data pipeline, the training recipe) are imported by their own names, so importing the
losses never pulls them in.
"""

from kornia_siglip2.training.ema import EMATeacher
from kornia_siglip2.training.views import (
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
    "EMATeacher",
    "LocalViews",
    "global_view_augmentation",
    "local_view_size",
    "random_patch_mask",
]
