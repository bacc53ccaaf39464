"""Shared pieces of the training tests: the tiny SigLIP 2 model they train."""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_siglip2_config"]


def tiny_siglip2_config(vision_layers: int = 1, text_layers: int = 1, vocab_size: int = 258) -> dict[str, Any]:
    """A transformers-style ``Siglip2Config`` dict of a 16-wide model (patch 8, 16 patches, 12 text positions).

    ``vocab_size`` 258 is the byte tokenizer's (:class:`~kornia_siglip2.training.data.ByteTokenizer`).
    """
    return {
        "model_type": "siglip2",
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "patch_size": 8,
            "num_patches": 16,
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 12,
        },
    }
