"""Configuration dataclasses for the SigLIP / SigLIP 2 towers, read from and written to HF config dicts."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kornia_siglip2.errors import check

__all__ = [
    "ACTIVATIONS",
    "CONFIG_LIMITS",
    "MODEL_TYPES",
    "NO_LIMITS_ENV",
    "POSITION_EMBEDDINGS",
    "VISION_MODEL_TYPES",
    "SigLip2Config",
    "TextConfig",
    "VisionConfig",
    "validate_hf_config",
]

#: ``model_type`` of a dual-tower Hugging Face checkpoint -> the position-embedding kind of its vision tower:
#: ``siglip`` covers SigLIP v1 and SigLIP 2 fixed resolution (conv patch embedding, fixed position table);
#: ``siglip2`` is SigLIP 2 NaFlex (linear patch embedding, table resized to every image's grid).
MODEL_TYPES: dict[str, str] = {"siglip": "fixed", "siglip2": "naflex"}

#: ``model_type`` of a vision-only checkpoint (transformers' ``SiglipVisionModel`` / ``Siglip2VisionModel``)
#: -> the dual-tower family it belongs to.
VISION_MODEL_TYPES: dict[str, str] = {"siglip_vision_model": "siglip", "siglip2_vision_model": "siglip2"}

#: Position-embedding kinds of the vision tower: ``"fixed"`` keeps the table at the training grid (resized
#: bicubically elsewhere, transformers' ``interpolate_pos_encoding``); ``"naflex"`` resizes it to each image's
#: grid with bilinear + antialias (SigLIP 2 NaFlex).
POSITION_EMBEDDINGS = ("fixed", "naflex")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: ``hidden_act`` names of HF configs -> the function (``gelu_pytorch_tanh`` is SigLIP's).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


#: Upper bounds of the integer fields, far above every released SigLIP / SigLIP 2 (So400m: width 1152, 27 layers,
#: vocabulary 256k): a ``config.json`` above them is refused before anything is allocated (10**5 layers would
#: build for minutes). Set the environment variable :data:`NO_LIMITS_ENV` to ``1`` to load such a model anyway.
CONFIG_LIMITS: dict[str, int] = {
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_channels": 64,
    "patch_size": 1024,
    "image_size": 2**16,
    "num_patches": 2**20,
    "vocab_size": 2**22,
    "max_position_embeddings": 2**20,
    "projection_size": 2**16,
}
#: environment variable that lifts :data:`CONFIG_LIMITS` when set to ``1``
NO_LIMITS_ENV = "KORNIA_SIGLIP2_NO_CONFIG_LIMITS"


def _check_fields(config: Any, tower: str) -> None:
    """Types and ranges of a tower config's fields, each error naming ``<tower>_config.<field>``."""
    limits = os.environ.get(NO_LIMITS_ENV, "") in ("", "0")
    for item in dataclasses.fields(config):
        value, name = getattr(config, item.name), f"{tower}_config.{item.name}"
        if item.name in CONFIG_LIMITS:
            if value is None and item.name == "projection_size":
                continue
            check(
                isinstance(value, int) and not isinstance(value, bool),
                lambda value=value, name=name: f"{name} must be an integer, got {type(value).__name__} {value!r}.",
            )
            check(value > 0, lambda value=value, name=name: f"{name} must be positive, got {value}.")
            bound = CONFIG_LIMITS[item.name]
            check(
                not limits or value <= bound,
                lambda value=value, name=name, bound=bound: (
                    f"{name} {value} is above the sane bound {bound} (no released SigLIP comes near it): a damaged "
                    f"or hostile config? Set {NO_LIMITS_ENV}=1 to load it anyway."
                ),
            )
        elif item.name == "layer_norm_eps":
            check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                lambda value=value, name=name: f"{name} must be a finite number, got {value!r}.",
            )
            check(0 < value < 1, lambda value=value, name=name: f"{name} must be in (0, 1), got {value}.")
        elif item.name == "vision_use_head":
            check(isinstance(value, bool), lambda value=value, name=name: f"{name} must be true or false: {value!r}.")
        elif item.name == "pad_token_id":
            check(
                value is None or (isinstance(value, int) and not isinstance(value, bool)),
                lambda value=value, name=name: f"{name} must be an integer or null, got {value!r}.",
            )
        elif item.name in ("hidden_act", "position_embedding"):
            check(
                value is None or isinstance(value, str),
                lambda value=value, name=name: f"{name} must be a string, got {value!r}.",
            )


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
        image_size: training resolution of fixed-resolution (``siglip``) checkpoints; ``patch_size`` need not
            divide it (the grid is ``image_size // patch_size``, as transformers' Conv2d patch embedding).
        num_patches: size of the NaFlex (``siglip2``) position table, a perfect square.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: MLP activation name (``gelu_pytorch_tanh`` is ``F.gelu(approximate="tanh")``).
        vision_use_head: whether the tower ends with the MAP pooling head.
        position_embedding: one of :data:`POSITION_EMBEDDINGS`; ``None`` (the default) takes the kind of the
            dual-tower ``model_type`` (:class:`SigLip2Config` fills it) and, for a standalone tower, ``"naflex"``.

    Example:
        >>> VisionConfig(position_embedding="fixed").num_positions  # (224 // 16) ** 2
        196
        >>> VisionConfig(patch_size=14, image_size=384, position_embedding="fixed").num_positions  # 27 * 27
        729
        >>> VisionConfig(position_embedding="naflex").num_positions
        256
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
    position_embedding: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "vision")
        _check_heads(self.hidden_size, self.num_attention_heads, "vision")
        _check_activation(self.hidden_act, "vision")
        check(
            self.position_embedding is None or self.position_embedding in POSITION_EMBEDDINGS,
            lambda: (
                f"vision position_embedding must be one of {POSITION_EMBEDDINGS} (or None), "
                f"got {self.position_embedding!r}."
            ),
        )

    @property
    def is_naflex(self) -> bool:
        """Whether the position table is resized to every image's grid (SigLIP 2 NaFlex)."""
        return self.position_embedding in (None, "naflex")

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: ``num_patches`` (NaFlex) or ``(image_size // patch_size) ** 2``."""
        if self.is_naflex:
            return self.num_patches
        return (self.image_size // self.patch_size) ** 2


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
        _check_fields(self, "text")
        if self.projection_size is None:
            self.projection_size = self.hidden_size
        _check_heads(self.hidden_size, self.num_attention_heads, "text")
        _check_activation(self.hidden_act, "text")


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
        check(
            self.model_type in MODEL_TYPES,
            lambda: (
                f"Unknown model_type {self.model_type!r}: expected one of {tuple(MODEL_TYPES)} "
                "('siglip' for SigLIP v1 / SigLIP 2 fixed resolution, 'siglip2' for SigLIP 2 NaFlex)."
            ),
        )
        if isinstance(self.vision_config, dict):
            self.vision_config = _from_dict(VisionConfig, self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = _from_dict(TextConfig, self.text_config)
        kind = MODEL_TYPES[self.model_type]
        if self.vision_config.position_embedding is None:
            self.vision_config = dataclasses.replace(self.vision_config, position_embedding=kind)
        check(
            self.vision_config.position_embedding == kind,
            lambda: (
                f"model_type {self.model_type!r} has {kind!r} position embeddings, but vision_config says "
                f"{self.vision_config.position_embedding!r}."
            ),
        )
        if self.is_naflex:
            side = round(self.vision_config.num_patches**0.5)
            if side * side != self.vision_config.num_patches:
                raise ValueError(
                    f"vision_config.num_patches must be a perfect square, got {self.vision_config.num_patches}."
                )
        else:
            # sizes the patch does not divide are fine: the Conv2d patch embedding floors (patch 14 at 384 is a
            # 27 x 27 grid, 6 pixel rows / columns dropped), and so does the table size (image_size // patch)^2
            vision = self.vision_config
            check(
                0 < vision.patch_size <= vision.image_size,
                lambda: (
                    f"vision_config.image_size {vision.image_size} must be at least patch_size {vision.patch_size} "
                    "(both positive)."
                ),
            )

    @property
    def is_naflex(self) -> bool:
        """Whether the checkpoint is SigLIP 2 NaFlex (linear patches, position table resized per image)."""
        return self.model_type == "siglip2"

    @classmethod
    def from_hf_dict(cls, hf_config: dict[str, Any]) -> SigLip2Config:
        """Build from a Hugging Face ``config.json`` dict, filling transformers' defaults for absent fields.

        Raises:
            ValueCheckError: the ``model_type`` is not a SigLIP / SigLIP 2 dual-tower type (a ``ValueError``).
        """
        model_type = hf_config.get("model_type")
        check(
            model_type in MODEL_TYPES,
            lambda: f"Unknown model_type {model_type!r} in config.json: expected one of {tuple(MODEL_TYPES)}.",
        )
        return cls(
            model_type=model_type,
            vision_config=_from_dict(VisionConfig, _sub_config(hf_config, "vision_config")),
            text_config=_from_dict(TextConfig, _sub_config(hf_config, "text_config")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (transformers' ``PretrainedConfig.to_dict``); see :meth:`to_hf_dict`."""
        return self.to_hf_dict()

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a ``config.json`` dict that transformers' ``AutoConfig`` reads."""
        vision = dataclasses.asdict(self.vision_config)
        vision.pop("position_embedding")  # implied by model_type in HF configs
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
    check(
        num_heads > 0 and hidden_size % num_heads == 0,
        lambda: f"{tower}_config.hidden_size {hidden_size} must be divisible by num_attention_heads {num_heads}.",
    )


def _sub_config(hf_config: dict[str, Any], key: str) -> dict[str, Any]:
    value = hf_config.get(key)
    check(
        value is None or isinstance(value, dict),
        lambda: f"{key} must be a JSON object (or absent), got {type(value).__name__}.",
    )
    return value or {}


#: ``dtype`` / ``torch_dtype`` values of a ``config.json`` that name a dtype the model can run in
_CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double")


def validate_hf_config(hf_config: Any, source: str = "config.json") -> SigLip2Config:
    """Check a ``config.json`` dict before anything is allocated; every error names the field and ``source``.

    Types (an integer field given as ``"32"``, ``32.0``, ``true`` or ``null`` is refused), ranges (positive
    sizes, a finite ``layer_norm_eps`` in (0, 1), :data:`CONFIG_LIMITS` upper bounds), relations
    (``hidden_size % num_attention_heads``, ``patch_size <= image_size``, a square ``num_patches``), the
    sub-configs (JSON objects) and the stored ``dtype`` (a floating type the model can run in: not float8,
    not complex). Dual-tower and vision-only (``siglip_vision_model`` / ``siglip2_vision_model``) configs.

    Args:
        hf_config: the parsed ``config.json``.
        source: the file, for messages.

    Returns:
        the configuration (a vision-only config comes back as a dual-tower one with default text tower).

    Raises:
        ValueCheckError: the first problem found, as ``"<source>: <field> ..."``.

    Example:
        >>> config = validate_hf_config({"model_type": "siglip2", "vision_config": {"hidden_size": 96}})
        >>> config.vision_config.hidden_size
        96
        >>> validate_hf_config({"model_type": "siglip2", "vision_config": {"patch_size": 0}}, "ckpt/config.json")
        Traceback (most recent call last):
        ...
        kornia_siglip2.errors.ValueCheckError: ckpt/config.json: vision_config.patch_size must be positive, got 0.
    """
    try:
        check(isinstance(hf_config, dict), lambda: f"must hold a JSON object, got {type(hf_config).__name__}.")
        for name in ("dtype", "torch_dtype"):
            value = hf_config.get(name)
            check(
                value is None or (isinstance(value, str) and value.removeprefix("torch.") in _CONFIG_DTYPES),
                lambda name=name, value=value: (
                    f"{name} {value!r} is not a floating type the model can run in (one of {_CONFIG_DTYPES}; "
                    "float8 and complex are refused)."
                ),
            )
        model_type = hf_config.get("model_type")
        if model_type in VISION_MODEL_TYPES:
            return SigLip2Config.from_hf_dict(
                {"model_type": VISION_MODEL_TYPES[model_type], "vision_config": hf_config}
            )
        return SigLip2Config.from_hf_dict(hf_config)
    except ValueError as error:
        raise type(error)(f"{source}: {error}") from error


def _check_activation(name: str, tower: str) -> None:
    check(name in ACTIVATIONS, lambda: f"{tower}_config.hidden_act must be one of {tuple(ACTIVATIONS)}, got {name!r}.")


def _from_dict(config_class: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{key: value for key, value in values.items() if key in known})
