"""``from_pretrained``'s keyword arguments: transformers 5's, checked and resolved in one place.

:func:`load_options` turns the keywords of transformers' ``PreTrainedModel.from_pretrained`` (``dtype`` /
``torch_dtype``, ``device_map``, ``attn_implementation``, the hub's ``revision`` / ``token`` / ``subfolder`` / ...)
into a :class:`LoadOptions`; :func:`stored_dtype` is what ``dtype="auto"`` means. :mod:`~kornia_siglip2.hub`
applies them; this module reads no file and builds no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kornia_siglip2.errors import check

__all__ = ["ATTN_IMPLEMENTATIONS", "LoadOptions", "load_options", "stored_dtype"]

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
            "force_download, subfolder, low_cpu_mem_usage, trust_remote_code, use_safetensors, check_finite."
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
