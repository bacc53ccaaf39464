"""Checkpoint I/O: the only module that knows Hugging Face key names.

Reads ``config.json`` + safetensors (single file or sharded) from a local folder or the Hugging Face
cache / hub, maps HF keys to ours (they are the same keys; only the Conv2d patch embedding of ``siglip``
checkpoints becomes the Linear over ``(py, px, c)`` patches), validates every key and shape, and writes the
HF layout back. Never unpickles: ``*.bin`` / ``*.pt`` files are refused.

It sits right above :mod:`~kornia_siglip2.config` in the import graph: it builds models through the class
it is given and imports no model module, so the towers and the model can use it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kornia_siglip2.config import MODEL_TYPES, VISION_MODEL_TYPES, SigLip2Config
from kornia_siglip2.errors import check
from kornia_siglip2.loading import LoadOptions, load_options, stored_dtype

_Module = TypeVar("_Module", bound=torch.nn.Module)

__all__ = [
    "conv_to_linear_patch_weight",
    "from_hf_state_dict",
    "load_pretrained",
    "load_vision_pretrained",
    "read_safetensors",
    "resolve_checkpoint",
    "save_pretrained",
    "to_hf_state_dict",
]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PATCH_SUFFIX = "embeddings.patch_embedding.weight"
# non-persistent buffers that older transformers versions wrote into checkpoints
_IGNORED = re.compile(r"(^|\.)position_ids$")


def resolve_checkpoint(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """Return a local folder holding the checkpoint's ``config.json`` and safetensors files.

    A path to an existing folder is used as is; anything else is a hub id resolved with
    ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE`` and ``local_files_only`` apply),
    fetching only JSON, safetensors and tokenizer files.

    Raises:
        FileNotFoundError: neither a folder nor a hub id that can be found (offline: not in the cache).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name_or_path} is a file; pass the checkpoint folder or a hub id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
        )
    except HFValidationError as error:
        raise FileNotFoundError(f"{name_or_path!r} is neither a local folder nor a valid hub id.") from error
    except Exception as error:  # huggingface_hub raises several types for offline / missing repos
        raise FileNotFoundError(
            f"Could not find checkpoint {name_or_path!r} locally or on the Hugging Face Hub "
            f"({type(error).__name__}: {error})."
        ) from error
    return Path(folder)


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read all tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: no safetensors weights (pickle-based ``*.bin`` files are never loaded).
    """
    folder = Path(folder)
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / _SAFETENSORS).is_file():
        files = [_SAFETENSORS]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" Found {pickled}: pickle files are never loaded; convert them to safetensors." if pickled else ""
        raise FileNotFoundError(f"No {_SAFETENSORS} or {_SAFETENSORS_INDEX} in {folder}.{hint}")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state_dict[key] = handle.get_tensor(key)
    return state_dict


def conv_to_linear_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d patch embedding :math:`(D, C, p, p)` as the Linear over ``(py, px, c)`` patches, :math:`(D, p^2 C)`.

    Example:
        >>> conv_to_linear_patch_weight(torch.zeros(8, 3, 4, 4)).shape
        torch.Size([8, 48])
    """
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers ``SiglipModel`` / ``Siglip2Model`` (or vision tower) state dict to our keys.

    The keys are the same; a Conv2d patch embedding :math:`(D, C, p, p)` becomes the Linear over
    ``(py, px, c)`` patches (:func:`conv_to_linear_patch_weight`) and the ``position_ids`` buffers older
    transformers releases saved are dropped. Every other tensor is passed through as is (no copy).

    Example:
        >>> hf = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
        ...       "logit_bias": torch.ones(1)}
        >>> {key: tuple(value.shape) for key, value in from_hf_state_dict(hf).items()}
        {'vision_model.embeddings.patch_embedding.weight': (8, 48), 'logit_bias': (1,)}
    """
    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state_dict.items():
        if _IGNORED.search(key):
            continue
        if key.endswith(_PATCH_SUFFIX) and tensor.ndim == 4:
            state_dict[key] = conv_to_linear_patch_weight(tensor)
        else:
            state_dict[key] = tensor
    return state_dict


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor] | torch.nn.Module,
    config: SigLip2Config | None = None,
    prefix: str = "vision_model.",
) -> dict[str, torch.Tensor]:
    """Our weights in transformers' layout (inverse of :func:`from_hf_state_dict`, bit-exact).

    Args:
        state_dict: a :class:`~kornia_siglip2.SigLip2` (its weights and config are used) or its
            ``state_dict()`` (or a vision tower's, with ``prefix=""``).
        config: the model's configuration (the patch embedding goes back to a Conv2d for ``siglip``);
            taken from the model when a model is passed.
        prefix: key prefix of the vision tower in ``state_dict``.

    Raises:
        ValueCheckError: no config is known.
    """
    if isinstance(state_dict, torch.nn.Module):
        config = state_dict.config if config is None else config
        state_dict = state_dict.state_dict()
    check(config is not None, "to_hf_state_dict needs the model's config with a bare state dict.")
    vision = config.vision_config
    hf_state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if key == f"{prefix}{_PATCH_SUFFIX}" and not config.is_naflex:
            patch = vision.patch_size
            conv = tensor.reshape(tensor.shape[0], patch, patch, vision.num_channels).permute(0, 3, 1, 2)
            hf_state_dict[key] = conv.contiguous()
        else:
            hf_state_dict[key] = tensor.contiguous()
    return hf_state_dict


def _load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(
            "shapes that disagree with config.json (check hidden_size, vocab_size, max_position_embeddings, "
            f"patch_size, image_size / num_patches) {mismatched}"
        )
    if problems:
        raise ValueError(f"Cannot load {source}: " + "; ".join(problems) + ".")
    model.load_state_dict(state_dict, strict=True, assign=True)


def _checkpoint_folder(name_or_path: str | Path, options: LoadOptions) -> Path:
    folder = resolve_checkpoint(name_or_path, **options.hub)
    if options.subfolder:
        folder = folder / options.subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"No subfolder {options.subfolder!r} in {name_or_path}.")
    return folder


def _finish(model: _Module, options: LoadOptions, hf_config: dict[str, Any], tensors: dict) -> _Module:
    """Cast to the resolved dtype, move to the device, set the attention backend; eval mode."""
    dtype = stored_dtype(hf_config, tensors) if options.dtype == "auto" else options.dtype
    model = model.to(device=options.device, dtype=dtype)
    if options.attention_backend is not None:
        model.set_attention_backend(options.attention_backend)
    return model.eval()


def load_pretrained(model_class: type[_Module], name_or_path: str | Path, **kwargs: Any) -> _Module:
    """Build ``model_class(config)`` from a dual-tower checkpoint; see :meth:`SigLip2.from_pretrained`.

    Keyword arguments are transformers' (:func:`kornia_siglip2.loading.load_options`): ``dtype`` /
    ``torch_dtype`` (``"auto"`` by default: the stored dtype), ``device_map`` / ``device``,
    ``attn_implementation``, the hub's ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
    ``force_download``, ``subfolder``.
    """
    options = load_options(**kwargs)
    folder = _checkpoint_folder(name_or_path, options)
    hf_config = _read_config(folder)
    config = SigLip2Config.from_hf_dict(hf_config)
    tensors = read_safetensors(folder)
    with torch.device("meta"):
        model = model_class(config)
    _load_into(model, from_hf_state_dict(tensors), str(name_or_path))
    return _finish(model, options, hf_config, tensors)


def load_vision_pretrained(tower_class: type[_Module], name_or_path: str | Path, **kwargs: Any) -> _Module:
    """Build ``tower_class(vision_config)`` from a vision-only or dual-tower checkpoint.

    Vision-only checkpoints (``model_type`` ``siglip_vision_model`` / ``siglip2_vision_model``) come with the
    ``vision_model.`` prefix (``SiglipVisionModel.save_pretrained``) or without it (the inner tower's
    ``save_pretrained``); dual-tower ones have it, and their text weights are skipped. Keyword arguments as
    :func:`load_pretrained`.

    Raises:
        ValueCheckError: unknown ``model_type``, or missing / unexpected / mis-shaped vision weights.
        TypeError: an unknown keyword argument.
    """
    options = load_options(**kwargs)
    folder = _checkpoint_folder(name_or_path, options)
    hf_config = _read_config(folder)
    model_type = hf_config.get("model_type")
    tensors = read_safetensors(folder)
    if model_type in VISION_MODEL_TYPES:
        family, vision_dict = VISION_MODEL_TYPES[model_type], hf_config
        # SiglipVisionModel.save_pretrained writes `vision_model.*` keys; its inner tower's save has no prefix
        if all(key.startswith("vision_model.") for key in tensors):
            tensors = {key[len("vision_model.") :]: value for key, value in tensors.items()}
    else:
        family, vision_dict = model_type, hf_config.get("vision_config") or {}
        tensors = {
            key[len("vision_model.") :]: value for key, value in tensors.items() if key.startswith("vision_model.")
        }
    check(
        family in MODEL_TYPES,
        lambda: (
            f"Unknown model_type {model_type!r} in config.json: expected one of "
            f"{tuple(MODEL_TYPES) + tuple(VISION_MODEL_TYPES)}."
        ),
    )
    config = SigLip2Config.from_hf_dict({"model_type": family, "vision_config": vision_dict})
    with torch.device("meta"):
        tower = tower_class(config.vision_config)
    _load_into(tower, from_hf_state_dict(tensors), str(name_or_path))
    return _finish(tower, options, hf_config, tensors)


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {folder}.")
    return json.loads(config_file.read_text())


def save_pretrained(model: torch.nn.Module, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the layout transformers' ``from_pretrained`` reads.

    Args:
        model: a :class:`~kornia_siglip2.SigLip2` (anything with a ``config`` :class:`SigLip2Config`).
        folder: target folder (created if needed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    tensors = {key: tensor.cpu() for key, tensor in to_hf_state_dict(model).items()}
    save_file(tensors, folder / _SAFETENSORS, metadata={"format": "pt"})
