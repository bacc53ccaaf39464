"""kornia_siglip2: packed-first, differentiable SigLIP / SigLIP 2 encoders and losses."""

from kornia_siglip2.attention import VarlenLayout, varlen_attention
from kornia_siglip2.config import SigLip2Config, TextConfig, VisionConfig
from kornia_siglip2.lens import layer_image_features, logit_lens
from kornia_siglip2.model import SigLip2, SigLip2Output
from kornia_siglip2.packing import (
    grid_thw_to_cu_seqlens,
    grid_thw_to_seqlens,
    packed_to_padded,
    padded_to_packed,
    patchify,
    unpatchify,
)
from kornia_siglip2.preprocess import (
    NaFlexImagePreprocessor,
    PackedImages,
    PaddedImages,
    SigLip2ImagePreprocessor,
    SigLipImagePreprocessor,
    naflex_target_size,
    to_padded,
)
from kornia_siglip2.resample import pil_resize
from kornia_siglip2.text import TextOutput, TextTransformer
from kornia_siglip2.tokenizer import SigLipTokenizer
from kornia_siglip2.vision import PackedGrid, VisionOutput, VisionTransformer
from kornia_siglip2.zero_shot import ZeroShotClassifier, load_image

__version__ = "0.1.0"

__all__ = [
    "NaFlexImagePreprocessor",
    "PackedGrid",
    "PackedImages",
    "PaddedImages",
    "SigLip2",
    "SigLip2Config",
    "SigLip2ImagePreprocessor",
    "SigLip2Output",
    "SigLipImagePreprocessor",
    "SigLipTokenizer",
    "TextConfig",
    "TextOutput",
    "TextTransformer",
    "VarlenLayout",
    "VisionConfig",
    "VisionOutput",
    "VisionTransformer",
    "ZeroShotClassifier",
    "__version__",
    "grid_thw_to_cu_seqlens",
    "grid_thw_to_seqlens",
    "layer_image_features",
    "load_image",
    "logit_lens",
    "naflex_target_size",
    "packed_to_padded",
    "padded_to_packed",
    "patchify",
    "pil_resize",
    "to_padded",
    "unpatchify",
    "varlen_attention",
]
