"""Resumable training checkpoints: safetensors + JSON only (nothing is unpickled), written atomically.

A checkpoint is a folder ``step-XXXXXXXX`` holding the full (unsharded) model and optimizer state gathered
with ``torch.distributed.checkpoint.state_dict`` (so the same files serve a plain module, DDP and FSDP2, and
a run can resume on another world size), the EMA weights, the trainer state (step, scheduler, sampler
position, as JSON) and one RNG state per rank. It is written into a temporary folder, then renamed, and
``latest`` (a one-line text file, itself replaced atomically) names the newest complete one: a run killed
while saving resumes from the previous checkpoint. Every rank must call :func:`save_checkpoint` and
:func:`load_checkpoint` (they gather / scatter collectively); rank 0 writes the shared files, so the folder
must be visible to every rank (one machine, or a shared file system).

Gathering the full state on rank 0 costs memory and time at scale: :func:`save_sharded_checkpoint` writes every
rank's shards with ``torch.distributed.checkpoint`` instead. That format pickles its ``.metadata`` file and the
non-tensor values (optimizer hyper-parameters), and its stock loader unpickles both with ``pickle`` /
``torch.load(weights_only=False)``, which can run any code a crafted file names. :func:`load_sharded_checkpoint`
therefore reads them its own way: the ``.metadata`` opcodes are walked with :mod:`pickletools` before anything
is unpickled, and the file is refused unless every global it names is one of the few classes that format writes
(its metadata dataclasses, ``torch.Size``, torch dtypes and layouts, a path) and every call or ``BUILD`` applies
to one of them; it is then unpickled with only those globals resolvable. The non-tensor values are read with
``torch.load(weights_only=True)``; the tensors already are (:mod:`kornia_siglip2.training.dcp_reader`). So
loading never executes code from a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kornia_siglip2.errors import check
from kornia_siglip2.training.dcp_reader import checked_load_planner, checked_reader

__all__ = [
    "LATEST",
    "SHARDED",
    "find_resume_checkpoint",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "verify_checkpoint",
]

LATEST = "latest"
#: the files every complete checkpoint folder holds (written before the folder gets its final name)
_REQUIRED = ("trainer.json", "model.safetensors", "optimizer.safetensors", "optimizer.json")
_STEP_NAME = re.compile(r"^step-(\d{8,})$")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors plus a JSON structure (non-tensor values, param groups)."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}|{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}|{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *structure["scalars"].items()]:
        name, key = flat.rsplit("|", 1)
        state.setdefault(name, {})[key] = value
    groups = structure["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _start(temporary: Path) -> None:
    """Create the empty temporary folder a checkpoint is written into (collective)."""
    if _rank_world()[0] == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()


def _save_rng(temporary: Path, rank: int) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, temporary / f"rng-rank{rank:05d}.safetensors")


def _restore_rng(path: Path, saved_world_size: int) -> None:
    """This rank's RNG state, restored only when the world size is unchanged."""
    rank, world_size = _rank_world()
    rng_file = path / f"rng-rank{rank:05d}.safetensors"
    if saved_world_size == world_size and rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def _publish(folder: Path, temporary: Path, final: Path, keep: int) -> None:
    """Publish a written checkpoint atomically (collective): rename it, point ``latest`` at it, drop old ones.

    Once every rank has written its files, rank 0 renames the temporary folder to its final name, replaces
    ``latest`` (a new file renamed over the old) and keeps the newest ``keep`` checkpoints. A kill at any point
    leaves ``latest`` naming a complete checkpoint.
    """
    _barrier()
    if _rank_world()[0] == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        pointer = folder / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, folder / LATEST)
        complete = sorted(path for path in folder.glob("step-*") if path.is_dir())
        for old in complete[: max(len(complete) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_checkpoint(
    folder: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    ema: nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically; call on every rank.

    Args:
        folder: the checkpoint folder of the run.
        step: the optimizer step reached (names the checkpoint).
        model: the trained module (plain, DDP or FSDP2-sharded).
        optimizer: its optimizer.
        trainer_state: JSON-serialisable state (scheduler, sampler position, metrics...).
        ema: an EMA module, if any (plain, or FSDP2-sharded like the model: gathered collectively).
        keep: how many complete checkpoints to keep (older ones are removed).

    Returns:
        the checkpoint path.
    """
    rank, world_size = _rank_world()
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    temporary = folder / f".tmp-step-{step:08d}"
    # collective: every rank takes part in gathering the full state
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=full)
    ema_state = get_model_state_dict(ema, options=full) if ema is not None else None
    _start(temporary)
    _save_rng(temporary, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model_state.items()}, temporary / "model.safetensors")
        tensors, structure = _flatten_optimizer(optimizer_state)
        save_file(tensors, temporary / "optimizer.safetensors")
        (temporary / "optimizer.json").write_text(json.dumps(structure))
        if ema_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, temporary / "ema.safetensors")
        state = {"step": step, "world_size": world_size, **trainer_state}
        (temporary / "trainer.json").write_text(json.dumps(state, indent=2))
    _publish(folder, temporary, final, keep)
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (named by its ``latest`` file), or ``None``."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*`` folders holding every file of a checkpoint, oldest first."""
    found = []
    for path in folder.glob("step-*"):
        match = _STEP_NAME.match(path.name)
        # a full checkpoint's files, or a sharded one's trainer state and torch.distributed.checkpoint metadata
        sharded = (path / "trainer.json").is_file() and (path / SHARDED / ".metadata").is_file()
        if match and path.is_dir() and (sharded or all((path / name).is_file() for name in _REQUIRED)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint a run resumes from, or ``None`` when ``folder`` holds no checkpoint folder at all.

    ``latest`` decides when it names a complete ``step-*`` folder (also an older one: rewinding a run by editing
    ``latest`` is allowed, with a note on stderr). When ``latest`` is missing, unreadable, or stale (it names a
    folder that is gone or incomplete), the checkpoints themselves decide: the newest complete one, with a note on
    stderr saying why. ``step-*`` folders none of which is complete are an error, never a silent restart from
    step 0 over them.

    Raises:
        FileNotFoundError: ``step-*`` folders exist but none holds a complete checkpoint.
    """
    folder = Path(folder)
    complete = _complete_checkpoints(folder)
    if not complete:
        partial = sorted(path.name for path in folder.glob("step-*") if path.is_dir())
        if partial:
            raise FileNotFoundError(
                f"{folder} holds checkpoint folders ({', '.join(partial)}) but none is complete (each needs "
                f"{', '.join(_REQUIRED)}): resuming would restart from step 0 over them. Restore one, or pass "
                "--no-resume (or use another --out) to start a new run."
            )
        return None
    newest = complete[-1][1]
    pointer = folder / LATEST
    try:
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = "<unreadable>"
    by_name = {path.name: path for _, path in complete}
    note = None
    if named in by_name:
        chosen = by_name[named]
        if chosen != newest:
            note = f"{folder / LATEST} names {named}, older than the complete {newest.name}: resuming from {chosen}"
    else:
        chosen = newest
        why = "is missing" if named is None else f"names {named[:80]!r}, not a complete checkpoint"
        note = f"{folder / LATEST} {why}: resuming from the newest complete checkpoint {newest}"
    if note is not None and _rank_world()[0] == 0:
        print(note, file=sys.stderr)
    return chosen


def _floating_non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())
    ]


def _check_weights(module: nn.Module, saved: dict[str, tuple[int, ...] | None], where: Path) -> None:
    """The saved weight names and shapes (``None``: not a tensor) against ``module``'s (global) state dict."""
    expected = {key: tuple(getattr(value, "shape", ())) for key, value in get_model_state_dict(module).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(
        key
        for key in set(expected) & set(saved)
        if expected[key] and saved[key] is not None and saved[key] != expected[key]
    )
    problems = [
        f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    check(not problems, lambda: f"Cannot resume from {where}: {'; '.join(problems)}.")


def _check_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer.json``, which must parse and hold the step the folder is named after."""
    try:
        state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot resume from {path}: {path / 'trainer.json'} is damaged ({error}).") from error
    match = _STEP_NAME.match(path.name)
    check(
        isinstance(state, dict) and (match is None or state.get("step") == int(match.group(1))),
        lambda: f"Cannot resume from {path}: {path / 'trainer.json'} does not hold this checkpoint's step.",
    )
    return state


def verify_checkpoint(path: str | Path, model: nn.Module, ema: nn.Module | None = None) -> None:
    """Check a checkpoint before resuming from it: every file readable, the model's keys and shapes, all finite.

    Reads the files (safetensors and JSON only); compares the saved model (and EMA) weights with ``model``'s
    state dict (names and shapes, as :func:`torch.distributed.checkpoint.state_dict.get_model_state_dict` gives
    them: global shapes under FSDP2); every floating tensor (weights, EMA, optimizer moments) must be finite.

    Raises:
        ValueError: a file that cannot be read, a missing / unexpected / mis-shaped weight, a non-finite tensor, or
            a ``trainer.json`` whose step disagrees with the folder name; the message names the file.
    """
    path = Path(path)

    def read(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(path / name)
        except Exception as error:  # safetensors raises its own types for a damaged header
            raise ValueError(f"Cannot resume from {path}: {path / name} is damaged ({error}).") from error

    _check_trainer_state(path)
    try:
        json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot resume from {path}: {path / 'optimizer.json'} is damaged ({error}).") from error
    pairs = [("model.safetensors", model), ("ema.safetensors", ema)]
    for name, module in pairs:
        if module is None:
            continue
        saved = read(name)
        _check_weights(module, {key: tuple(value.shape) for key, value in saved.items()}, path / name)
        bad = _floating_non_finite(saved)
        check(
            not bad,
            lambda name=name, bad=bad: f"Cannot resume from {path / name}: non-finite values (NaN / inf) in {bad[:5]}.",
        )
    bad = _floating_non_finite(read("optimizer.safetensors"))
    check(not bad, lambda: f"Cannot resume from {path / 'optimizer.safetensors'}: non-finite values in {bad[:5]}.")


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer`` and ``ema``; call on every rank.

    Each rank reads the full state (safetensors, no pickle) and keeps its shard. The RNG state of the same
    rank is restored when the world size is unchanged.

    Returns:
        the trainer state (``step``, ``world_size`` and what was passed as ``trainer_state``).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder.
        ValueError: the checkpoint is damaged (see :func:`verify_checkpoint`).
    """
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by save_checkpoint (no trainer.json).")
    verify_checkpoint(path, model, ema)
    state = json.loads((path / "trainer.json").read_text())
    model_state = load_file(path / "model.safetensors")
    optimizer_state = _unflatten_optimizer(
        load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    )
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # not strict: a parameter that had no gradient yet (a head that switches on later) has no AdamW state
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    # torch fills missing state with a zero-gradient step (``_init_optim_state``): drop it again, so that such a
    # parameter's first real step is AdamW's first step, as in the uninterrupted run
    saved = set(optimizer_state["state"])
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for name, parameter in module.named_parameters():
        if name not in saved:
            optimizer.state.pop(parameter, None)
    if ema is not None:
        check((path / "ema.safetensors").is_file(), lambda: f"{path} holds no EMA weights (ema.safetensors).")
        set_model_state_dict(ema, load_file(path / "ema.safetensors"), options=StateDictOptions(full_state_dict=True))
    _restore_rng(path, state["world_size"])
    return state


# ---- sharded checkpoints (FSDP2 at scale): torch.distributed.checkpoint ---------------------------------------------

SHARDED = "dcp"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint folder was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / SHARDED).is_dir()


def save_sharded_checkpoint(
    folder: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    ema: nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` with every rank saving its own shards (``torch.distributed.checkpoint``).

    Nothing is gathered on one rank: each rank writes the shards it holds (FSDP2's DTensors; replicated tensors
    once) into ``step-XXXXXXXX/dcp``, beside the same ``trainer.json`` and per-rank RNG files as
    :func:`save_checkpoint`, then the folder is published atomically the same way. A sharded checkpoint can be
    loaded on another world size (the loader re-shards). Its ``.metadata`` file and non-tensor values are pickles
    (the format of ``torch.distributed.checkpoint``); :func:`load_sharded_checkpoint` checks them before reading
    (see the module doc). Export weights for ``from_pretrained`` with the recipe's final export, which gathers
    the full state.

    Args and returns: as :func:`save_checkpoint`; call on every rank.
    """
    import torch.distributed.checkpoint as dcp

    rank, world_size = _rank_world()
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    temporary = folder / f".tmp-step-{step:08d}"
    _start(temporary)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    dcp.save(state, checkpoint_id=temporary / SHARDED)
    _save_rng(temporary, rank)
    if rank == 0:
        trainer = {"step": step, "world_size": world_size, **trainer_state}
        (temporary / "trainer.json").write_text(json.dumps(trainer, indent=2))
    _publish(folder, temporary, final, keep)
    return final


def _check_finite_shards(state: dict[str, Any], where: Path) -> None:
    """Every floating tensor of the loaded state finite on this rank's shards, agreed by all ranks (collective)."""

    def tensors(tree: Any, prefix: str) -> dict[str, torch.Tensor]:
        if isinstance(tree, dict):
            return {
                name: value for key, child in tree.items() for name, value in tensors(child, f"{prefix}.{key}").items()
            }
        if isinstance(tree, torch.Tensor):
            local = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor: this rank's shard
            return {prefix[1:]: local}
        return {}

    bad = _floating_non_finite(
        tensors({key: state[key] for key in ("model", "ema") if key in state}, "")
        | tensors(state["optimizer"]["state"], ".optimizer.state")
    )
    if dist.is_available() and dist.is_initialized():
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = sorted({name for names in everyone for name in names})
    check(not bad, lambda: f"Cannot resume from {where}: non-finite values (NaN / inf) in {bad[:5]}.")


def load_sharded_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_sharded_checkpoint` wrote (each rank reads its shards); call on every rank.

    Checked as :func:`verify_checkpoint` checks a full checkpoint: ``trainer.json`` and its step, the model's (and
    EMA's) names and global shapes against the metadata before reading, then every floating tensor read (weights,
    EMA, optimizer moments: each rank its shards) finite, every rank refusing together. The pickled parts are
    checked before they are read (see the module doc).

    Returns:
        the trainer state, as :func:`load_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder.
        ValueError: the checkpoint is damaged or not plain data; the message names the file. After a non-finite
            value is found, the model holds the loaded (bad) weights: the run must stop, as the recipe does.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by save_sharded_checkpoint (no trainer.json).")
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    trainer = _check_trainer_state(path)
    reader = checked_reader(path / SHARDED)
    saved = reader.read_metadata().state_dict_metadata
    saved_keys = set(saved)
    # names and (global) shapes from the metadata, before anything is read into the model
    for prefix, module in (("model.", model), ("ema.", ema)):
        if module is None:
            continue
        check(
            any(key.startswith(prefix) for key in saved_keys),
            lambda prefix=prefix: f"{path} holds no {prefix[:-1]} weights.",
        )
        shapes = {
            key[len(prefix) :]: tuple(value.size) if isinstance(value, TensorStorageMetadata) else None
            for key, value in saved.items()
            if key.startswith(prefix)
        }
        _check_weights(module, shapes, path / SHARDED / f"{prefix}*")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    dcp.load(state, storage_reader=reader, planner=checked_load_planner())
    _check_finite_shards(state, path / SHARDED)
    saved_parameters = {
        key.split(".", 2)[2].rsplit(".", 1)[0] for key in saved_keys if key.startswith("optimizer.state.")
    }
    kept = {name: value for name, value in state["optimizer"]["state"].items() if name in saved_parameters}
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={**state["optimizer"], "state": kept},
        options=StateDictOptions(strict=False),
    )
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for name, parameter in module.named_parameters():
        if name not in saved_parameters:
            optimizer.state.pop(parameter, None)
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    _restore_rng(path, trainer["world_size"])
    return trainer
