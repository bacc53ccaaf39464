"""Loss heads of the SigLIP 2 objective: sigmoid, LocCa decoder, SILC/TIPS self-distillation."""

from kornia_siglip2.losses.distill import (
    DINOHead,
    EMATeacher,
    LocalViews,
    SelfDistillationLoss,
    SelfDistillationOutput,
    distillation_cross_entropy,
    random_patch_mask,
)
from kornia_siglip2.losses.locca import (
    TASKS,
    LocCaDecoder,
    LocCaLoss,
    LocCaLossOutput,
    LocCaTargets,
    LocCaVocabulary,
    chunked_cross_entropy,
    generate_boxes,
    generate_captions,
    generate_region_captions,
)
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
    "TASKS",
    "DINOHead",
    "EMATeacher",
    "LocCaDecoder",
    "LocCaLoss",
    "LocCaLossOutput",
    "LocCaTargets",
    "LocCaVocabulary",
    "LocalViews",
    "SelfDistillationLoss",
    "SelfDistillationOutput",
    "SigLip2Loss",
    "SigLip2LossOutput",
    "SigLip2LossSchedule",
    "SigmoidLoss",
    "chunked_cross_entropy",
    "distillation_cross_entropy",
    "generate_boxes",
    "generate_captions",
    "generate_region_captions",
    "infer_model_size",
    "model_size_factor",
    "random_patch_mask",
    "sigmoid_loss",
]
