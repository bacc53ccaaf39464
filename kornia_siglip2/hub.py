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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kornia_siglip2.config import MODEL_TYPES, VISION_MODEL_TYPES, SigLip2Config
from kornia_siglip2.errors import check

_Module = TypeVar("_Module", bound=torch.nn.Module)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "LoadOptions",
    "conv_to_linear_patch_weight",
    "from_hf_state_dict",
    "load_options",
    "load_pretrained",
    "load_vision_pretrained",
    "read_safetensors",
    "resolve_checkpoint",
    "save_pretrained",
    "stored_dtype",
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


#: transformers' ``attn_implementation`` names -> our attention backends
#: (:data:`~kornia_siglip2.attention.ATTENTION_BACKENDS`, whose names are accepted too). Every backend computes the
#: same attention; ``"eager"`` also returns the weights.
ATTN_IMPLEMENTATIONS: dict[str, str] = {
    "sdpa": "auto",
    "eager": "eager",
    "flash_attention_2": "flash",
    "flash_attention_3": "flash",
}
_OUR_BACKENDS = ("auto", "grouped", "dense", "loop", "flash", "eager")  # attention.ATTENTION_BACKENDS (a layer above)


@dataclass(frozen=True)
class LoadOptions:
    """``from_pretrained``'s keyword arguments, checked and resolved (see :func:`load_options`).

    Attributes:
        device: where the whole model goes (``None``: the CPU).
        dtype: a floating dtype, or ``"auto"``: the checkpoint's stored dtype (``config.json``'s ``dtype`` /
            ``torch_dtype``, else its first floating tensor), as transformers 5.
        attention_backend: our backend name, or ``None`` to keep the model's default.
        subfolder: folder of the checkpoint inside ``name_or_path``.
        hub: keyword arguments of :func:`resolve_checkpoint`.
    """

    device: torch.device | None = None
    dtype: torch.dtype | str = "auto"
    attention_backend: str | None = None
    subfolder: str = ""
    hub: dict[str, Any] = field(default_factory=dict)


def load_options(
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: torch.device | str | int | dict | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str = "",
    low_cpu_mem_usage: bool | None = None,
    trust_remote_code: bool | None = None,
    use_safetensors: bool | None = None,
    **unknown: Any,
) -> LoadOptions:
    """Check transformers' ``from_pretrained`` keywords and resolve them to :class:`LoadOptions`.

    Args:
        device: our own name for where the model goes (same values as ``device_map``'s single device).
        dtype: ``torch.float32`` / ``"float32"`` / ... or ``"auto"``; ``None`` (the default) is ``"auto"``, as in
            transformers 5: a bfloat16 checkpoint loads in bfloat16.
        torch_dtype: transformers' older name of ``dtype`` (``dtype`` wins when both are given).
        device_map: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, an ``int``, a ``torch.device``, ``"auto"`` (CUDA when
            available, else the CPU) or ``{"": device}``: the whole model goes there. A map over several devices
            is refused: the model is not split.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` / ``"_3"`` (see
            :data:`ATTN_IMPLEMENTATIONS`) or one of our backend names.
        revision: hub revision.
        cache_dir: hub cache folder.
        local_files_only: never download.
        token: hub token (``huggingface_hub``'s ``token``).
        force_download: download again even when cached.
        subfolder: the checkpoint's folder inside the repository or local folder.
        low_cpu_mem_usage: accepted and ignored: weights are always loaded straight into the parameters.
        trust_remote_code: accepted and ignored: no code from a checkpoint is ever run.
        use_safetensors: ``None`` / ``True``; ``False`` is refused (pickle files are never loaded).
        unknown: anything else is a ``TypeError`` that names it.

    Raises:
        TypeError: an unknown keyword.
        ValueCheckError: an unknown dtype, attention implementation or device, a map over several devices, or
            ``use_safetensors=False``.

    Example:
        >>> options = load_options(torch_dtype="bfloat16", device_map="cpu", attn_implementation="eager")
        >>> options.dtype, options.device, options.attention_backend
        (torch.bfloat16, device(type='cpu'), 'eager')
        >>> load_options().dtype
        'auto'
    """
    if unknown:
        raise TypeError(
            f"from_pretrained() got unexpected keyword argument(s) {sorted(unknown)}; accepted: device, dtype, "
            "torch_dtype, device_map, attn_implementation, revision, cache_dir, local_files_only, token, "
            "force_download, subfolder, low_cpu_mem_usage, trust_remote_code, use_safetensors."
        )
    check(
        use_safetensors is not False,
        "use_safetensors=False: this loader reads safetensors only and never unpickles *.bin / *.pt files.",
    )
    del low_cpu_mem_usage, trust_remote_code  # see the docstring: nothing to do
    check(
        device is None or device_map is None,
        "Pass either device or device_map, not both (they name the same thing here).",
    )
    hub = dict(
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        force_download=force_download,
    )
    return LoadOptions(
        device=_resolve_device(device_map if device is None else device),
        dtype=_resolve_dtype(torch_dtype if dtype is None else dtype),
        attention_backend=_resolve_attention(attn_implementation),
        subfolder=subfolder or "",
        hub=hub,
    )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("_") else None
    check(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        lambda: f"dtype must be 'auto', a floating torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}.",
    )
    return dtype


def _resolve_device(device_map: torch.device | str | int | dict | None) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(_resolve_device(value)) for value in device_map.values()}
        check(
            len(devices) == 1,
            lambda: (
                f"device_map places modules on several devices {sorted(devices)}: this model is not split across "
                "devices. Pass one device (device_map='cuda', 'cpu', 0, ...) or {'': device}."
            ),
        )
        return torch.device(devices.pop())
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device_map must be 'auto', a device ('cpu', 'cuda', 'cuda:1', 0, torch.device) or a dict mapping "
            f"modules to one device, got {device_map!r} ({error})."
        ) from error


def _resolve_attention(attn_implementation: str | None) -> str | None:
    if attn_implementation is None:
        return None
    backend = ATTN_IMPLEMENTATIONS.get(attn_implementation, attn_implementation)
    check(
        backend in _OUR_BACKENDS,
        lambda: (
            f"attn_implementation must be one of {tuple(ATTN_IMPLEMENTATIONS)} (transformers' names) or "
            f"{_OUR_BACKENDS} (ours), got {attn_implementation!r}."
        ),
    )
    return backend


def _checkpoint_folder(name_or_path: str | Path, options: LoadOptions) -> Path:
    folder = resolve_checkpoint(name_or_path, **options.hub)
    if options.subfolder:
        folder = folder / options.subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"No subfolder {options.subfolder!r} in {name_or_path}.")
    return folder


def stored_dtype(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype ``dtype="auto"`` means, as in transformers 5.

    ``config.json``'s ``dtype`` (or the older ``torch_dtype``), else the dtype of the first floating tensor of the
    checkpoint, else float32.

    Example:
        >>> stored_dtype({"torch_dtype": "bfloat16"}, {}), stored_dtype({}, {"w": torch.zeros(1, dtype=torch.half)})
        (torch.bfloat16, torch.float16)
    """
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((tensor.dtype for tensor in tensors.values() if tensor.dtype.is_floating_point), torch.float32)


def _finish(model: _Module, options: LoadOptions, hf_config: dict[str, Any], tensors: dict) -> _Module:
    """Cast to the resolved dtype, move to the device, set the attention backend; eval mode."""
    dtype = stored_dtype(hf_config, tensors) if options.dtype == "auto" else options.dtype
    model = model.to(device=options.device, dtype=dtype)
    if options.attention_backend is not None:
        model.set_attention_backend(options.attention_backend)
    return model.eval()


def load_pretrained(model_class: type[_Module], name_or_path: str | Path, **kwargs: Any) -> _Module:
    """Build ``model_class(config)`` from a dual-tower checkpoint; see :meth:`SigLip2.from_pretrained`.

    Keyword arguments are transformers' (:func:`load_options`): ``dtype`` / ``torch_dtype`` (``"auto"`` by
    default: the stored dtype), ``device_map`` / ``device``, ``attn_implementation``, the hub's ``revision``,
    ``cache_dir``, ``local_files_only``, ``token``, ``force_download``, ``subfolder``.
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
