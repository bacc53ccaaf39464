"""Tiny offline assets for examples and tests: a random checkpoint with tokenizer files, and images of shapes.

The public face of the demo's builders (``python -m kornia_siglip2 demo --workdir DIR`` writes the same
checkpoint to ``DIR/checkpoint``). The weights are random: use them to run code, not to classify. Needs the
``text`` (or ``dev``) extra: transformers, tokenizers, sentencepiece and pillow.

Example:
    >>> import tempfile
    >>> from kornia_siglip2 import ZeroShotClassifier
    >>> folder = build_tiny_checkpoint(tempfile.mkdtemp())
    >>> ZeroShotClassifier.from_pretrained(folder).tokenizer.family
    'siglip2'
"""

from kornia_siglip2._demo import (
    DEMO_LABELS,
    DEMO_SHAPES,
    build_siglip2_tokenizer,
    build_siglip_tokenizer,
    build_tiny_checkpoint,
    write_shape_images,
)

__all__ = [
    "DEMO_LABELS",
    "DEMO_SHAPES",
    "build_siglip2_tokenizer",
    "build_siglip_tokenizer",
    "build_tiny_checkpoint",
    "write_shape_images",
]
