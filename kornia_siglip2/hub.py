"""Checkpoint I/O: the only module that knows Hugging Face key names.

Reads ``config.json`` + safetensors (single file or sharded) from a local folder or the Hugging Face
cache / hub, maps HF keys to ours (q/k/v fused into ``qkv``; the conv patch embedding of ``siglip``
checkpoints becomes the Linear over ``(py, px, c)`` patches), validates every key and shape, and writes
the HF layout back. Never unpickles: ``*.bin`` / ``*.pt`` files are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kornia_siglip2.config import SigLip2Config
from kornia_siglip2.model import SigLip2
from kornia_siglip2.vision import VisionTransformer

__all__ = [
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
_QKV = re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")
_PATCH_SUFFIX = "embeddings.patch_embedding.weight"
_PATCH_WEIGHT = f"vision_model.{_PATCH_SUFFIX}"
# vision-only checkpoints (transformers' SiglipVisionModel / Siglip2VisionModel) carry no "vision_model." prefix
_VISION_ONLY_TYPES = {"siglip_vision_model": "siglip", "siglip2_vision_model": "siglip2"}
# non-persistent buffers that older transformers versions wrote into checkpoints
_IGNORED = re.compile(r"(^|\.)position_ids$")


def resolve_checkpoint(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
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


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers ``SiglipModel`` / ``Siglip2Model`` state dict to :class:`SigLip2` keys.

    Raises:
        ValueError: a q/k/v triple is incomplete, or the patch embedding has an unexpected rank.
    """
    state_dict: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state_dict.items():
        if _IGNORED.search(key):
            continue
        match = _QKV.match(key)
        if match:
            prefix, which, kind = match.groups()
            qkv_parts.setdefault((prefix, kind), {})[which] = tensor
        elif key.endswith(_PATCH_SUFFIX) and tensor.ndim == 4:
            # Conv2d (D, C, p, p) -> Linear over (py, px, c) flattened patches
            state_dict[key] = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        else:
            state_dict[key] = tensor
    for (prefix, kind), parts in qkv_parts.items():
        missing = [f"{prefix}.{which}_proj.{kind}" for which in "qkv" if which not in parts]
        if missing:
            raise ValueError(f"Checkpoint is missing attention weights: {missing}.")
        state_dict[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state_dict


def to_hf_state_dict(model: SigLip2) -> dict[str, torch.Tensor]:
    """The model's weights in transformers' layout (inverse of :func:`from_hf_state_dict`, bit-exact)."""
    config = model.config
    vision = config.vision_config
    hf_state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if key.endswith((".qkv.weight", ".qkv.bias")):
            prefix, kind = key.rsplit(".qkv.", 1)
            for which, part in zip("qkv", tensor.chunk(3), strict=True):
                hf_state_dict[f"{prefix}.{which}_proj.{kind}"] = part.contiguous()
        elif key == _PATCH_WEIGHT and not config.is_naflex:
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


def load_pretrained(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> SigLip2:
    """Load a checkpoint into :class:`SigLip2`; see :meth:`SigLip2.from_pretrained`."""
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config = SigLip2Config.from_hf_dict(_read_config(folder))
    state_dict = from_hf_state_dict(read_safetensors(folder))
    with torch.device("meta"):
        model = SigLip2(config)
    _load_into(model, state_dict, str(name_or_path))
    # transformers' default: float32 unless a dtype is asked for
    model = model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def load_vision_pretrained(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> VisionTransformer:
    """Load only the vision tower, from a vision-only or a dual-tower SigLIP / SigLIP 2 checkpoint.

    Vision-only checkpoints (``model_type`` ``siglip_vision_model`` / ``siglip2_vision_model``, saved by
    transformers' ``SiglipVisionModel``) have no ``vision_model.`` prefix; dual-tower ones do, and their
    text weights are skipped. Arguments as :meth:`SigLip2.from_pretrained`.

    Raises:
        ValueError: unknown ``model_type``, or missing / unexpected / mis-shaped vision weights.
    """
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    hf_config = _read_config(folder)
    model_type = hf_config.get("model_type")
    tensors = read_safetensors(folder)
    if model_type in _VISION_ONLY_TYPES:
        family, vision_dict = _VISION_ONLY_TYPES[model_type], hf_config
    else:
        family, vision_dict = model_type, hf_config.get("vision_config") or {}
        tensors = {
            key[len("vision_model.") :]: value for key, value in tensors.items() if key.startswith("vision_model.")
        }
    if family not in ("siglip", "siglip2"):
        raise ValueError(
            f"Unknown model_type {model_type!r} in config.json: expected siglip, siglip2, siglip_vision_model "
            "or siglip2_vision_model."
        )
    config = SigLip2Config.from_hf_dict({"model_type": family, "vision_config": vision_dict})
    with torch.device("meta"):
        tower = VisionTransformer(config.vision_config, naflex=config.is_naflex)
    _load_into(tower, from_hf_state_dict(tensors), str(name_or_path))
    return tower.to(device=device, dtype=dtype or torch.float32).eval()


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {folder}.")
    return json.loads(config_file.read_text())


def save_pretrained(model: SigLip2, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the layout transformers' ``from_pretrained`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    tensors = {key: tensor.cpu() for key, tensor in to_hf_state_dict(model).items()}
    save_file(tensors, folder / _SAFETENSORS, metadata={"format": "pt"})
