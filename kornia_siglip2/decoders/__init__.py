"""Decoders over packed vision tokens: the LocCa decoder of SigLIP 2 and its greedy generation.

- :mod:`.vocabulary`: where text ids, box-coordinate bins and the mask token sit; box quantization.
- :mod:`.targets`: decoder inputs, labels and loss masks of the three LocCa tasks, parallel prediction.
- :mod:`.locca`: the pre-LN transformer decoder cross-attending to packed vision tokens.
- :mod:`.generate`: greedy decoding of captions, boxes and region captions.

The LocCa *loss* lives in :mod:`kornia_siglip2.losses.locca`.
"""

from kornia_siglip2.decoders.generate import generate, generate_boxes, generate_captions, generate_region_captions
from kornia_siglip2.decoders.locca import DecoderBlock, LocCaDecoder
from kornia_siglip2.decoders.targets import TASKS, LocCaTargets, grounded_prefix, referring_prefix, shift_right
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary

__all__ = [
    "TASKS",
    "DecoderBlock",
    "LocCaDecoder",
    "LocCaTargets",
    "LocCaVocabulary",
    "generate",
    "generate_boxes",
    "generate_captions",
    "generate_region_captions",
    "grounded_prefix",
    "referring_prefix",
    "shift_right",
]
