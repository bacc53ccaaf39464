"""kornia_siglip2: packed-first, differentiable SigLIP / SigLIP 2 encoders and losses."""

from kornia_siglip2.attention import VarlenLayout, varlen_attention
from kornia_siglip2.config import SigLip2Config, TextConfig, VisionConfig
from kornia_siglip2.model import SigLip2, SigLip2Output
from kornia_siglip2.packing import (
    grid_thw_to_cu_seqlens,
    grid_thw_to_seqlens,
    packed_to_padded,
    padded_to_packed,
    patchify,
    unpatchify,
)
from kornia_siglip2.text import TextOutput, TextTransformer
from kornia_siglip2.vision import PackedGrid, VisionOutput, VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "PackedGrid",
    "SigLip2",
    "SigLip2Config",
    "SigLip2Output",
    "TextConfig",
    "TextOutput",
    "TextTransformer",
    "VarlenLayout",
    "VisionConfig",
    "VisionOutput",
    "VisionTransformer",
    "__version__",
    "grid_thw_to_cu_seqlens",
    "grid_thw_to_seqlens",
    "packed_to_padded",
    "padded_to_packed",
    "patchify",
    "unpatchify",
    "varlen_attention",
]
