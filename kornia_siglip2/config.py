"""Configuration dataclasses for the SigLIP / SigLIP 2 towers, read from and written to HF config dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODEL_TYPES", "SigLip2Config", "TextConfig", "VisionConfig"]

#: ``model_type`` values of Hugging Face checkpoints: ``siglip`` covers SigLIP v1 and SigLIP 2 fixed
#: resolution (conv patch embedding, fixed position table); ``siglip2`` is SigLIP 2 NaFlex.
MODEL_TYPES = ("siglip", "siglip2")

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu", "relu")


@dataclass
class VisionConfig:
    """Vision tower hyper-parameters (defaults are transformers' defaults, i.e. ViT-B/16).

    Args:
        hidden_size: token width :math:`D`.
        intermediate_size: MLP hidden width.
        num_hidden_layers: number of encoder blocks.
        num_attention_heads: attention heads; must divide ``hidden_size``.
        num_channels: image channels :math:`C`.
        patch_size: square patch side :math:`p` in pixels.
        image_size: training resolution of fixed-resolution (``siglip``) checkpoints.
        num_patches: size of the NaFlex (``siglip2``) position table, a perfect square.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: MLP activation name (``gelu_pytorch_tanh`` is ``F.gelu(approximate="tanh")``).
        vision_use_head: whether the tower ends with the MAP pooling head.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    image_size: int = 224
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        _check_heads(self.hidden_size, self.num_attention_heads, "vision")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}.")


@dataclass
class TextConfig:
    """Text tower hyper-parameters (defaults are transformers' defaults).

    Args:
        vocab_size: token vocabulary size (32000 for SigLIP v1, 256000 for SigLIP 2).
        hidden_size: token width.
        intermediate_size: MLP hidden width.
        num_hidden_layers: number of encoder blocks.
        num_attention_heads: attention heads; must divide ``hidden_size``.
        max_position_embeddings: length of the learned position table (64).
        projection_size: output width of the text head; ``None`` means ``hidden_size``.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: MLP activation name.
        pad_token_id: id of the padding token (informative; the model never needs it).
    """

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    projection_size: int | None = None
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    pad_token_id: int | None = 1

    def __post_init__(self) -> None:
        if self.projection_size is None:
            self.projection_size = self.hidden_size
        _check_heads(self.hidden_size, self.num_attention_heads, "text")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}.")


@dataclass
class SigLip2Config:
    """Configuration of a dual-tower SigLIP / SigLIP 2 model.

    Args:
        model_type: ``"siglip"`` (SigLIP v1 and SigLIP 2 fixed resolution) or ``"siglip2"`` (NaFlex).
        vision_config: the vision tower.
        text_config: the text tower.

    Example:
        >>> config = SigLip2Config.from_hf_dict({"model_type": "siglip2"})
        >>> config.vision_config.num_patches, config.text_config.vocab_size
        (256, 32000)
        >>> SigLip2Config.from_hf_dict(config.to_hf_dict()) == config
        True
    """

    model_type: str = "siglip2"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"Unknown model_type {self.model_type!r}: expected one of {MODEL_TYPES} "
                "('siglip' for SigLIP v1 / SigLIP 2 fixed resolution, 'siglip2' for SigLIP 2 NaFlex)."
            )
        if isinstance(self.vision_config, dict):
            self.vision_config = _from_dict(VisionConfig, self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = _from_dict(TextConfig, self.text_config)
        if self.is_naflex:
            side = round(self.vision_config.num_patches**0.5)
            if side * side != self.vision_config.num_patches:
                raise ValueError(f"vision num_patches must be a perfect square, got {self.vision_config.num_patches}.")
        elif self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError(
                f"vision image_size {self.vision_config.image_size} is not divisible by "
                f"patch_size {self.vision_config.patch_size}."
            )

    @property
    def is_naflex(self) -> bool:
        """Whether the checkpoint is SigLIP 2 NaFlex (linear patches, position table resized per image)."""
        return self.model_type == "siglip2"

    @classmethod
    def from_hf_dict(cls, hf_config: dict[str, Any]) -> SigLip2Config:
        """Build from a Hugging Face ``config.json`` dict, filling transformers' defaults for absent fields.

        Raises:
            ValueError: the ``model_type`` is not a SigLIP / SigLIP 2 dual-tower type.
        """
        model_type = hf_config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"Unknown model_type {model_type!r} in config.json: expected one of {MODEL_TYPES}.")
        return cls(
            model_type=model_type,
            vision_config=_from_dict(VisionConfig, hf_config.get("vision_config") or {}),
            text_config=_from_dict(TextConfig, hf_config.get("text_config") or {}),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a ``config.json`` dict that transformers' ``AutoConfig`` reads."""
        vision = dataclasses.asdict(self.vision_config)
        if self.is_naflex:
            vision.pop("image_size")
        else:
            vision.pop("num_patches")
        text = dataclasses.asdict(self.text_config)
        prefix = "Siglip2" if self.is_naflex else "Siglip"
        vision["model_type"] = f"{self.model_type}_vision_model"
        text["model_type"] = f"{self.model_type}_text_model"
        return {
            "architectures": [f"{prefix}Model"],
            "model_type": self.model_type,
            "vision_config": vision,
            "text_config": text,
        }


def _check_heads(hidden_size: int, num_heads: int, tower: str) -> None:
    if num_heads <= 0 or hidden_size % num_heads:
        raise ValueError(f"{tower} hidden_size {hidden_size} must be divisible by num_attention_heads {num_heads}.")


def _from_dict(config_class: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{key: value for key, value in values.items() if key in known})
