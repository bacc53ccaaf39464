"""Loss heads of the SigLIP 2 objective: sigmoid, LocCa, SILC/TIPS self-distillation.

The LocCa decoder, its vocabulary, targets and generation are model parts: :mod:`kornia_siglip2.decoders`.
"""

from kornia_siglip2.losses.distill import (
    DINOHead,
    EMATeacher,
    LocalViews,
    SelfDistillationLoss,
    SelfDistillationOutput,
    distillation_cross_entropy,
    random_patch_mask,
)
from kornia_siglip2.losses.locca import LocCaLoss, LocCaLossOutput, chunked_cross_entropy
from kornia_siglip2.losses.siglip2 import (
    LOSS_TERMS,
    MODEL_SIZE_FACTORS,
    SigLip2Loss,
    SigLip2LossOutput,
    SigLip2LossSchedule,
    infer_model_size,
    model_size_factor,
)
from kornia_siglip2.losses.sigmoid import DISTRIBUTED_MODES, SigmoidLoss, sigmoid_loss

__all__ = [
    "DISTRIBUTED_MODES",
    "LOSS_TERMS",
    "MODEL_SIZE_FACTORS",
    "DINOHead",
    "EMATeacher",
    "LocCaLoss",
    "LocCaLossOutput",
    "LocalViews",
    "SelfDistillationLoss",
    "SelfDistillationOutput",
    "SigLip2Loss",
    "SigLip2LossOutput",
    "SigLip2LossSchedule",
    "SigmoidLoss",
    "chunked_cross_entropy",
    "distillation_cross_entropy",
    "infer_model_size",
    "model_size_factor",
    "random_patch_mask",
    "sigmoid_loss",
]
