"""kornia_siglip2: packed-first, differentiable SigLIP / SigLIP 2 encoders and losses.

The names below are imported on first use (PEP 562 module ``__getattr__``), so the command line's ``--help``
answers without importing torch; ``from kornia_siglip2 import SigLip2`` works as usual. Importing the
inference stack (the model, preprocessors, zero-shot) loads no loss, decoder or training code, no
``kornia.augmentation``, no transformers (``tests/test_imports.py`` keeps it so). Losses, decoders and training
utilities are the subpackages ``kornia_siglip2.losses``, ``kornia_siglip2.decoders`` and
``kornia_siglip2.training``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kornia_siglip2.attention import Attention, varlen_attention
    from kornia_siglip2.config import SigLip2Config, TextConfig, VisionConfig
    from kornia_siglip2.images import load_image
    from kornia_siglip2.layers import compile_blocks, uncompile_blocks
    from kornia_siglip2.lens import layer_image_features, logit_lens
    from kornia_siglip2.model import SigLip2, SigLip2Output, load_vision_tower
    from kornia_siglip2.packing import (
        ImageLayout,
        PackedImages,
        VarlenLayout,
        grid_thw_to_cu_seqlens,
        grid_thw_to_seqlens,
        packed_to_padded,
        padded_to_packed,
        patchify,
        unpatchify,
    )
    from kornia_siglip2.preprocess import (
        NaFlexImagePreprocessor,
        PaddedImages,
        SigLip2ImagePreprocessor,
        SigLipImagePreprocessor,
        naflex_target_size,
        to_padded,
    )
    from kornia_siglip2.resample import pil_resize
    from kornia_siglip2.text import TextOutput, TextTransformer
    from kornia_siglip2.tokenizer import SigLipTokenizer
    from kornia_siglip2.vision import VisionOutput, VisionTransformer
    from kornia_siglip2.vision_model import SigLip2VisionModel
    from kornia_siglip2.zero_shot import ZeroShotClassifier

# public name -> defining module, filled from the imports above
_LAZY = {
    "Attention": "kornia_siglip2.attention",
    "ImageLayout": "kornia_siglip2.packing",
    "PackedImages": "kornia_siglip2.packing",
    "VarlenLayout": "kornia_siglip2.packing",
    "varlen_attention": "kornia_siglip2.attention",
    "SigLip2Config": "kornia_siglip2.config",
    "TextConfig": "kornia_siglip2.config",
    "VisionConfig": "kornia_siglip2.config",
    "layer_image_features": "kornia_siglip2.lens",
    "logit_lens": "kornia_siglip2.lens",
    "SigLip2": "kornia_siglip2.model",
    "SigLip2Output": "kornia_siglip2.model",
    "load_vision_tower": "kornia_siglip2.model",
    "compile_blocks": "kornia_siglip2.layers",
    "uncompile_blocks": "kornia_siglip2.layers",
    "grid_thw_to_cu_seqlens": "kornia_siglip2.packing",
    "grid_thw_to_seqlens": "kornia_siglip2.packing",
    "packed_to_padded": "kornia_siglip2.packing",
    "padded_to_packed": "kornia_siglip2.packing",
    "patchify": "kornia_siglip2.packing",
    "unpatchify": "kornia_siglip2.packing",
    "NaFlexImagePreprocessor": "kornia_siglip2.preprocess",
    "PaddedImages": "kornia_siglip2.preprocess",
    "SigLip2ImagePreprocessor": "kornia_siglip2.preprocess",
    "SigLipImagePreprocessor": "kornia_siglip2.preprocess",
    "naflex_target_size": "kornia_siglip2.preprocess",
    "to_padded": "kornia_siglip2.preprocess",
    "pil_resize": "kornia_siglip2.resample",
    "TextOutput": "kornia_siglip2.text",
    "TextTransformer": "kornia_siglip2.text",
    "SigLipTokenizer": "kornia_siglip2.tokenizer",
    "VisionOutput": "kornia_siglip2.vision",
    "VisionTransformer": "kornia_siglip2.vision",
    "SigLip2VisionModel": "kornia_siglip2.vision_model",
    "ZeroShotClassifier": "kornia_siglip2.zero_shot",
    "load_image": "kornia_siglip2.images",
}

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "ImageLayout",
    "NaFlexImagePreprocessor",
    "PackedImages",
    "PaddedImages",
    "SigLip2",
    "SigLip2Config",
    "SigLip2ImagePreprocessor",
    "SigLip2Output",
    "SigLip2VisionModel",
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
    "compile_blocks",
    "grid_thw_to_cu_seqlens",
    "grid_thw_to_seqlens",
    "layer_image_features",
    "load_image",
    "load_vision_tower",
    "logit_lens",
    "naflex_target_size",
    "packed_to_padded",
    "padded_to_packed",
    "patchify",
    "pil_resize",
    "to_padded",
    "uncompile_blocks",
    "unpatchify",
    "varlen_attention",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kornia_siglip2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
