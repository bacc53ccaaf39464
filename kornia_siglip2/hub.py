"""Checkpoint I/O: the only module that knows Hugging Face key names.

Reads ``config.json`` + safetensors (single file or sharded) from a local folder or the Hugging Face
cache / hub (our state dict has transformers' keys and shapes, so the mapping only drops the ``position_ids``
buffers older releases saved), validates every key and shape, and writes the HF layout back, with
``config.json`` for dual-tower and vision-only models. Never unpickles: ``*.bin`` / ``*.pt`` files are refused.

It sits right above :mod:`~kornia_siglip2.config` in the import graph: it builds models through the class
it is given and imports no model module, so the towers and the model can use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kornia_siglip2.config import MODEL_TYPES, VISION_MODEL_TYPES, SigLip2Config, validate_hf_config
from kornia_siglip2.errors import ValueCheckError, check, check_type
from kornia_siglip2.loading import LoadOptions, load_options, stored_dtype
from kornia_siglip2.packing import linear_to_conv_patch_weight

_Module = TypeVar("_Module", bound=torch.nn.Module)

__all__ = [
    "download_file",
    "from_hf_state_dict",
    "hf_config_dict",
    "load_pretrained",
    "load_vision_pretrained",
    "read_config",
    "read_json",
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
# the files a save owns: replaced or removed by the next save, every other file of the folder is kept
_OWNED = re.compile(
    r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors)$"
)
_HF_VISION_CLASSES = {"siglip_vision_model": "SiglipVisionModel", "siglip2_vision_model": "Siglip2VisionModel"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_SIZE_UNITS.update({"GIB": 2**30, "TIB": 2**40})


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
        ValueCheckError: an empty path (``""`` would otherwise be the current directory).
        FileNotFoundError: neither a folder nor a hub id that can be found (offline: not in the cache).
    """
    check_type(
        isinstance(name_or_path, (str, os.PathLike)),
        lambda: f"name_or_path must be a str or a path, got {type(name_or_path).__name__}.",
    )
    check(
        str(name_or_path).strip() != "",
        "name_or_path is empty: pass a checkpoint folder (use '.' for the current directory) or a hub id.",
    )
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


def download_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Path:
    """One file of a hub repository, through ``huggingface_hub.hf_hub_download`` (its cache and ``HF_HUB_OFFLINE``).

    Raises:
        FileNotFoundError: the repository, revision or file cannot be found (offline: not in the cache).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
        )
    except (OSError, EntryNotFoundError, HFValidationError) as err:
        # OSError covers missing repos/revisions, cache misses offline and network failures
        raise FileNotFoundError(
            f"Could not find {filename} for {repo_id!r}: it is not a local folder or file, "
            f"and the Hugging Face hub lookup failed ({type(err).__name__}: {err})."
        ) from err


def read_json(file: str | os.PathLike[str]) -> dict:
    """A JSON object from ``file``; every failure names the file.

    Raises:
        ValueError: not valid JSON, or not a JSON object (``ValueCheckError``).
        OSError: the file cannot be read.
    """
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); re-download or re-save the checkpoint.") from error
    except OSError as error:
        raise OSError(f"Cannot read {file}: {error}") from error
    check(isinstance(data, dict), lambda: f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data


def _shard_path(folder: Path, index_file: Path, name: Any) -> Path:
    """The file an index's ``weight_map`` names, which must be a file name inside ``folder``."""
    check(
        isinstance(name, str) and name != "",
        lambda: f"{index_file}: weight_map values must be shard file names, got {name!r}.",
    )
    path = folder / name
    # lexical, not resolved: the Hugging Face cache holds shards as symlinks into its blobs/ folder
    inside = not Path(name).is_absolute() and not Path(name).drive and ".." not in Path(name).parts
    check(
        inside,
        lambda: f"{index_file}: shard {name!r} is outside the checkpoint folder {folder}; shards must be files in it.",
    )
    if not path.is_file():
        raise FileNotFoundError(f"{index_file} names the shard {name!r}, which is not in {folder}.")
    return path


def _read_file(path: Path, keys: set[str] | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of one safetensors file (only ``keys`` when given) and the keys it holds besides them."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt") as handle:
            names = list(handle.keys())
            for key in names:
                if keys is None or key in keys:
                    tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"Cannot read {path}: {error}. The file is truncated or corrupt; re-download or re-save the checkpoint."
        ) from error
    return tensors, [key for key in names if keys is not None and key not in keys]


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite: one read-only pass (a sum), the element-wise test only if the sum is not.

    A NaN or an infinity anywhere makes the float32 sum NaN or infinite; a finite sum therefore proves the tensor
    finite without the element-wise mask (a bool copy of every weight). A sum that overflows although every element
    is finite falls back to the exact test.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else None))):
        return True
    return bool(torch.isfinite(tensor).all())


def read_safetensors(folder: str | Path, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read the tensors of ``model.safetensors``, or exactly those ``model.safetensors.index.json`` names.

    A sharded checkpoint loads each key of the index's ``weight_map`` from the shard it names. A key the
    index does not name, a key found in a second shard, a key missing from its shard and a shard path that
    leaves ``folder`` (``../``, absolute) are errors, never a silent choice.

    Args:
        folder: the checkpoint folder.
        check_finite: check that every floating tensor is finite (NaN / inf weights give all-NaN features
            later); ``False`` skips it for the rare checkpoint that needs non-finite values.

    Raises:
        FileNotFoundError: no safetensors weights (pickle-based ``*.bin`` files are never loaded), or a shard the
            index names is missing.
        ValueError: invalid JSON, an index without ``weight_map``, a truncated or corrupt safetensors file, an
            inconsistent index, or non-finite weights (each names the file).
    """
    folder = Path(folder)
    index = folder / _SAFETENSORS_INDEX
    state_dict: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        check(
            isinstance(weight_map, dict) and weight_map,
            lambda: (
                f"{index} has no 'weight_map' (a JSON object from tensor name to shard file); re-save the checkpoint."
            ),
        )
        by_file: dict[Path, set[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(_shard_path(folder, index, name), set()).add(key)
        strays: dict[str, list[Path]] = {}
        for path, keys in sorted(by_file.items()):
            tensors, extra = _read_file(path, keys)
            absent = sorted(keys - set(tensors))
            check(not absent, f"{index} maps {absent[:5]} to {path.name}, which does not hold them.")
            for key in extra:
                strays.setdefault(key, []).append(path)
            state_dict.update(tensors)
            sources.update(dict.fromkeys(tensors, path))
        twice = sorted(key for key in strays if key in weight_map)
        outside = sorted(key for key in strays if key not in weight_map)
        check(
            not twice,
            lambda: (
                f"{index}: tensors found in two shards: "
                + ", ".join(f"{key} in {weight_map[key]} and {strays[key][0].name}" for key in twice[:5])
                + "; the checkpoint is inconsistent, re-save it."
            ),
        )
        check(
            not outside,
            lambda: (
                f"{index}: shards hold tensors the index does not name: "
                + ", ".join(f"{key} in {strays[key][0].name}" for key in outside[:5])
                + "; the checkpoint is inconsistent, re-save it."
            ),
        )
    elif (folder / _SAFETENSORS).is_file():
        state_dict, _ = _read_file(folder / _SAFETENSORS, None)
        sources = dict.fromkeys(state_dict, folder / _SAFETENSORS)
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" Found {pickled}: pickle files are never loaded; convert them to safetensors." if pickled else ""
        raise FileNotFoundError(f"No {_SAFETENSORS} or {_SAFETENSORS_INDEX} in {folder}.{hint}")
    if check_finite:
        bad = [key for key, tensor in state_dict.items() if tensor.is_floating_point() and not _all_finite(tensor)]
        check(
            not bad,
            lambda: (
                f"Non-finite (NaN or inf) weights in {sorted({str(sources[key]) for key in bad})}: {sorted(bad)[:10]}"
                f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}. The checkpoint is damaged; pass "
                "check_finite=False to load it anyway."
            ),
        )
    return state_dict


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers ``SiglipModel`` / ``Siglip2Model`` (or vision tower) state dict to our keys.

    Keys and shapes are transformers' own (a ``siglip`` patch embedding stays the Conv2d weight
    :math:`(D, C, p, p)`, a ``siglip2`` one the Linear :math:`(D, p^2 C)`); only the ``position_ids`` buffers older
    transformers releases saved are dropped. Every tensor is passed through as is (no copy).

    Example:
        >>> hf = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
        ...       "text_model.embeddings.position_ids": torch.arange(4)[None], "logit_bias": torch.ones(1)}
        >>> {key: tuple(value.shape) for key, value in from_hf_state_dict(hf).items()}
        {'vision_model.embeddings.patch_embedding.weight': (8, 3, 4, 4), 'logit_bias': (1,)}
    """
    return {key: tensor for key, tensor in hf_state_dict.items() if not _IGNORED.search(key)}


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor] | torch.nn.Module,
    config: SigLip2Config | None = None,
    prefix: str = "vision_model.",
) -> dict[str, torch.Tensor]:
    """Our weights in transformers' layout (the same keys and shapes; detached, contiguous, bit-exact).

    Args:
        state_dict: a model (its weights are used) or its ``state_dict()``.
        config: the model's configuration: a state dict saved by releases <= 0.1, whose ``siglip`` patch
            embedding was a Linear :math:`(D, p^2 C)`, gets transformers' Conv2d weight back with it.
        prefix: key prefix of the vision tower in ``state_dict`` (``""`` for a vision-only model).
    """
    if isinstance(state_dict, torch.nn.Module):
        config = getattr(state_dict, "config", None) if config is None else config
        state_dict = state_dict.state_dict()
    vision = getattr(config, "vision_config", config)
    hf_state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if key == f"{prefix}{_PATCH_SUFFIX}" and tensor.ndim == 2 and vision is not None and not vision.is_naflex:
            tensor = linear_to_conv_patch_weight(tensor, vision.num_channels)
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
    not_float = [
        f"{key} ({state_dict[key].dtype})"
        for key in sorted(set(expected) & set(state_dict))
        if expected[key].is_floating_point() and not state_dict[key].is_floating_point()
    ]
    if not_float:
        problems.append(
            f"tensors that must be floating point are stored as integers or bool {not_float[:10]} "
            "(re-save the checkpoint in float32, float16 or bfloat16)"
        )
    if problems:
        raise ValueCheckError(f"Cannot load {source}: " + "; ".join(problems) + ".")
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
    ``force_download``, ``subfolder``; and ``check_finite`` (``True``: NaN / inf weights are an error, see
    :func:`read_safetensors`).
    """
    check_finite = kwargs.pop("check_finite", True)
    config_source = kwargs.pop("config", None)
    options = load_options(**kwargs)
    folder = _checkpoint_folder(name_or_path, options)
    hf_config = read_config(folder) if config_source is None else _config_dict(config_source, options)
    _check_not_vision_only(hf_config, model_class, name_or_path)
    config = SigLip2Config.from_hf_dict(hf_config)
    tensors = read_safetensors(folder, check_finite=check_finite)
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
    check_finite = kwargs.pop("check_finite", True)
    config_source = kwargs.pop("config", None)
    options = load_options(**kwargs)
    folder = _checkpoint_folder(name_or_path, options)
    hf_config = read_config(folder) if config_source is None else _config_dict(config_source, options)
    model_type = hf_config.get("model_type")
    tensors = read_safetensors(folder, check_finite=check_finite)
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


def read_config(folder: str | os.PathLike[str]) -> dict:
    """The ``config.json`` of a checkpoint folder as a dict, validated before anything is allocated.

    See :func:`~kornia_siglip2.config.validate_hf_config`: every error names the file and the field.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        ValueError: not valid JSON (also nested too deeply to parse), or a field of the wrong type or range
            (``ValueCheckError``).
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = ""
        if (folder / "training_args.bin").is_file() or (folder / _SAFETENSORS).is_file():
            hint = (
                " A transformers Trainer.save_model folder holds the weights only: pass the configuration of the "
                "model that was trained, from_pretrained(folder, config=BASE) with BASE the checkpoint it started "
                "from (folder or hub id), its config, or model.config; or save with model.save_pretrained(folder)."
            )
        raise FileNotFoundError(f"No config.json in {folder}.{hint}")
    try:
        hf_config = read_json(config_file)
    except RecursionError as error:  # json's decoder recurses once per nesting level
        raise ValueError(
            f"{config_file} is nested too deeply to be a config.json; re-download or re-save it."
        ) from error
    validate_hf_config(hf_config, str(config_file))
    return hf_config


def _config_dict(config: Any, options: LoadOptions) -> dict:
    """``config=`` of ``from_pretrained`` as a ``config.json`` dict: a folder / hub id, a config object or a dict."""
    if isinstance(config, (str, os.PathLike)):
        return read_config(resolve_checkpoint(config, **options.hub))
    if isinstance(config, SigLip2Config):
        return config.to_hf_dict()
    if isinstance(config, dict) or hasattr(config, "to_dict"):  # a dict, a transformers SiglipConfig / Siglip2Config
        hf_config = dict(config) if isinstance(config, dict) else config.to_dict()
        validate_hf_config(hf_config, "config=")
        return hf_config
    raise TypeError(
        f"config must be a checkpoint folder or hub id, a SigLip2Config, a transformers config or a dict, "
        f"got {type(config).__name__}."
    )


def _check_not_vision_only(hf_config: dict, model_class: type, name_or_path: str | Path) -> None:
    """A vision-only checkpoint given to the dual-tower loader: say which class loads it."""
    model_type = hf_config.get("model_type")
    check(
        model_type not in VISION_MODEL_TYPES,
        lambda: (
            f"{name_or_path} is a vision-only checkpoint (model_type {model_type!r}, no text tower): load it with "
            f"SigLip2VisionModel.from_pretrained (transformers: {_HF_VISION_CLASSES[model_type]}), not "
            f"{model_class.__name__}.from_pretrained."
        ),
    )


def _parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Bytes from an int or a string such as ``"5GB"`` / ``"500MiB"`` (transformers' units: KB = 1000 B)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        check_type(isinstance(size, str), lambda: f"{name} must be an int (bytes) or a str like '5GB', got {size!r}.")
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        check(
            match is not None and unit in _SIZE_UNITS,
            lambda: f"{name} must be bytes or a size like '5GB', '500MB', '2GiB', got {size!r}.",
        )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    check(value > 0, lambda: f"{name} must be positive, got {size!r}.")
    return value


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` greedily, in order, into groups of at most ``max_shard_size`` bytes (a larger tensor alone)."""
    if max_shard_size is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def hf_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The ``config.json`` transformers writes for ``model``, with the parameters' ``dtype`` as transformers 5 adds it.

    A dual-tower model (``config`` a :class:`~kornia_siglip2.config.SigLip2Config`) gives ``SiglipModel`` /
    ``Siglip2Model``'s config; a vision tower (``config`` a :class:`~kornia_siglip2.config.VisionConfig`) gives
    ``SiglipVisionModel`` / ``Siglip2VisionModel``'s (``model_type`` ``siglip_vision_model`` /
    ``siglip2_vision_model``, the vision fields at the top level).
    """
    config = model.config
    if isinstance(config, SigLip2Config):
        hf_config = config.to_hf_dict()
    else:
        family = "siglip2" if config.is_naflex else "siglip"
        hf_config = SigLip2Config(model_type=family, vision_config=config).to_hf_dict()["vision_config"]
        prefix = "Siglip2" if config.is_naflex else "Siglip"
        hf_config = {"architectures": [f"{prefix}VisionModel"], **hf_config}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    return hf_config


def _write_checkpoint(
    model: torch.nn.Module, folder: Path, max_shard_size: int | None, state_dict: dict[str, torch.Tensor] | None
) -> None:
    """Write the weights (single file or shards + index), then ``config.json``, into the new folder ``folder``."""
    prefix = "vision_model." if isinstance(model.config, SigLip2Config) else ""
    source = model if state_dict is None else state_dict
    tensors = {key: tensor.cpu() for key, tensor in to_hf_state_dict(source, model.config, prefix).items()}
    shards = _shards(tensors, max_shard_size)
    names = (
        [_SAFETENSORS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        try:
            save_file(shard, folder / name, metadata={"format": "pt"})
        except (SafetensorError, OSError) as error:
            raise OSError(f"Cannot write {folder / name}: {error}") from error
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        (folder / _SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2) + "\n")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_pretrained(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    max_shard_size: int | str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and the safetensors weights in the layout transformers' ``from_pretrained`` reads.

    The save is atomic: everything is written into a temporary folder beside ``folder``, which then replaces
    ``folder`` as a whole (two renames; a failure at any point before them leaves the previous checkpoint
    unchanged and loadable). Files of ``folder`` that a save does not own (tokenizer, processor config, README,
    subfolders) are kept; the old ``config.json``, ``model.safetensors``, index and shards are replaced, so no
    stale shard or index survives. Where ``folder`` cannot be renamed (it holds the current directory, is a
    symlink or a mount point, or its parent is read-only: then the temporary folder is inside it) the new
    files are moved in one by one, weights first and ``config.json`` last, and the stale ones removed.

    Args:
        model: a :class:`~kornia_siglip2.SigLip2` or :class:`~kornia_siglip2.SigLip2VisionModel` (anything with a
            ``config``, see :func:`hf_config_dict`).
        folder: target folder (created if needed, with its parents).
        max_shard_size: split the weights into ``model-0000i-of-0000n.safetensors`` shards of at most this size
            (bytes, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``; a tensor larger than it gets a shard of
            its own) with a ``model.safetensors.index.json``, as transformers does. ``None``: one file.
        state_dict: tensors to write instead of ``model.state_dict()`` (same keys).

    Raises:
        ValueCheckError: an empty ``folder``, ``folder`` is a file, or a bad ``max_shard_size``.
        OSError: a file cannot be written (the error names it); the previous checkpoint is left as it was.
    """
    check_type(isinstance(folder, (str, os.PathLike)), lambda: f"folder must be a str or a path, got {folder!r}.")
    check(str(folder).strip() != "", "folder is empty: pass the folder to save into ('.' for the current directory).")
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    folder = Path(folder).expanduser().absolute()
    check(not folder.exists() or folder.is_dir(), lambda: f"folder {folder} is a file; pass a folder to save into.")
    if folder.is_dir():
        blocked = [entry.name for entry in folder.iterdir() if _OWNED.match(entry.name) and entry.is_dir()]
        check(not blocked, lambda: f"Cannot save into {folder}: {blocked} are folders in the way; move them away.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
        inside = False
    except OSError as error:  # a read-only parent (a mounted volume): stage inside the existing target
        if not folder.is_dir():
            raise OSError(f"Cannot save into {folder}: {error}") from error
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
        inside = True
    try:
        # mkdtemp makes a private (0o700) folder: give it the target's mode, or the umask's default
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(folder.stat().st_mode & 0o7777 if folder.is_dir() else 0o777 & ~umask)
        _write_checkpoint(model, staging, limit, state_dict)
        if not folder.exists():
            os.replace(staging, folder)
            return
        cwd = Path.cwd().resolve()
        swappable = not (
            inside or folder.is_symlink() or os.path.ismount(folder) or cwd.is_relative_to(folder.resolve())
        )
        if swappable:
            for entry in folder.iterdir():  # keep what a save does not own (tokenizer files, subfolders)
                if not _OWNED.match(entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
                    elif entry.is_symlink():
                        os.symlink(os.readlink(entry), staging / entry.name)
                    else:
                        _link_or_copy(str(entry), str(staging / entry.name))
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, backup / folder.name)
            try:
                os.replace(staging, folder)
            except OSError:
                os.replace(backup / folder.name, folder)
                raise
            shutil.rmtree(backup, ignore_errors=True)
            return
        new = {entry.name for entry in staging.iterdir()}
        for name in sorted(new - {"config.json"}):
            os.replace(staging / name, folder / name)
        for entry in folder.iterdir():
            if _OWNED.match(entry.name) and entry.name not in new:
                entry.unlink()
        os.replace(staging / "config.json", folder / "config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
