"""Reading ``torch.distributed.checkpoint`` (DCP) files without executing code from them.

DCP pickles its ``.metadata`` file and the non-tensor values of a state dict, and its stock reader and planner
unpickle them with ``pickle.load`` / ``torch.load(weights_only=False)`` (torch 2.13 offers no restricted metadata
loader), so a crafted checkpoint could run any code on load. :func:`check_metadata_pickle` walks the metadata's
opcodes with :mod:`pickletools` and refuses it unless it names only the globals DCP writes (found by saving real
sharded checkpoints: the dataclasses of ``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``,
``torch.Size``, torch dtypes, ``torch.serialization._get_layout``, the save path) and calls or ``BUILD`` s only
those; :func:`checked_reader` unpickles it afterwards with only those resolvable; :func:`checked_load_planner`
reads the non-tensor values with ``torch.load(weights_only=True)``. The tensors themselves DCP already reads with
``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

import torch

from kornia_siglip2.errors import ValueCheckError, check

__all__ = ["check_metadata_pickle", "checked_load_planner", "checked_reader"]

# the globals torch.distributed.checkpoint (torch 2.13) writes into its ``.metadata`` pickle; all are inert
# (dataclasses, an enum, torch.Size, a layout lookup by name, a path); torch dtypes are added by name below
_METADATA_GLOBALS = frozenset(
    {
        *(
            f"torch.distributed.checkpoint.metadata.{name}"
            for name in (
                "Metadata",
                "StorageMeta",
                "MetadataIndex",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.Size",
        "torch.serialization._get_layout",
        # StorageMeta.checkpoint_id: the save path (pathlib moved the class to pathlib._local in Python 3.13)
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
    }
)
_METADATA_GLOBALS_MODULES = {name: name.rpartition(".")[0] for name in _METADATA_GLOBALS}
# opcodes that would resolve or call something the walk below cannot see (never written by that format)
_REFUSED_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEWOBJ_EX"})
_STRING_OPCODES = frozenset(
    {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def _allowed_global(module: str, name: str) -> bool:
    """Whether ``module.name`` is allowed, as written (a dotted ``name`` reaching through attributes is not)."""
    if "." not in name and f"{module}.{name}" in _METADATA_GLOBALS:
        return _METADATA_GLOBALS_MODULES.get(f"{module}.{name}") == module
    # the module dict, not getattr: torch's module __getattr__ would import submodules for unknown names
    return module == "torch" and isinstance(vars(torch).get(name), torch.dtype)


class _Global:
    def __init__(self, name: str) -> None:
        self.name = name


class _Made:
    """An object a pickle made by calling an allowed global."""


def check_metadata_pickle(data: bytes, where: Path) -> None:
    """Walk the opcodes of a ``torch.distributed.checkpoint`` ``.metadata`` pickle without running any of them.

    The stack is followed symbolically (strings, globals, objects made from globals, the memo) so that a
    ``STACK_GLOBAL`` is resolved to its module and name. Every global must be allowed, every ``REDUCE`` /
    ``NEWOBJ`` must call an allowed global and every ``BUILD`` must set the state of an object made that way.

    Args:
        data: the bytes of the file.
        where: its path (named in the error).

    Raises:
        ValueCheckError: the file names or calls anything else, or is not a well-formed pickle.

    Example:
        >>> import pickle
        >>> check_metadata_pickle(pickle.dumps(torch.Size([2, 3])), Path(".metadata"))  # allowed: nothing raised
        >>> check_metadata_pickle(pickle.dumps(print), Path(".metadata"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        kornia_siglip2.errors.ValueCheckError: Cannot resume from .metadata: it references builtins.print. ...
    """

    def refuse(reason: str) -> None:
        check(
            False,
            lambda: (
                f"Cannot resume from {where}: {reason}. That file is a pickle; loading it could run code, so "
                "only the classes torch.distributed.checkpoint writes are accepted. Resume only from checkpoints "
                "you wrote, or start a new run (--no-resume or a new --out)."
            ),
        )

    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    anything = object()

    def pop(count: int) -> list[Any]:
        if count > len(stack) - (marks[-1] if marks else 0):
            refuse("it is not a well-formed pickle (stack underflow)")
        popped = stack[len(stack) - count :] if count else []
        del stack[len(stack) - count :]
        return popped

    try:
        for opcode, argument, _ in pickletools.genops(data):
            name = opcode.name
            if name in _REFUSED_OPCODES:
                refuse(f"it uses the pickle opcode {name}")
            elif name in _STRING_OPCODES:
                stack.append(argument if isinstance(argument, str) else anything)
            elif name == "GLOBAL" or name == "STACK_GLOBAL":
                if name == "GLOBAL":
                    module, attribute = str(argument).split(" ", 1)
                else:
                    module, attribute = pop(2)
                    if not (isinstance(module, str) and isinstance(attribute, str)):
                        refuse("it names a global that is not a plain string")
                if not _allowed_global(module, attribute):
                    refuse(f"it references {module}.{attribute}")
                stack.append(_Global(f"{module}.{attribute}"))
            elif name == "REDUCE" or name == "NEWOBJ":
                function, _arguments = pop(2)
                if not isinstance(function, _Global):
                    refuse(f"it calls ({name}) something that is not an allowed class")
                stack.append(_Made())
            elif name == "BUILD":
                target, _state = pop(2)
                if not isinstance(target, _Made):
                    refuse("it sets the state (BUILD) of something not made from an allowed class")
                stack.append(target)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP_MARK":
                del stack[marks.pop() :]
            elif name == "MEMOIZE":
                memo[len(memo)] = pop(1)[0]
                stack.append(memo[len(memo) - 1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[argument] = pop(1)[0]
                stack.append(memo[argument])
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if argument not in memo:
                    refuse("it is not a well-formed pickle (unknown memo entry)")
                stack.append(memo[argument])
            elif name == "DUP":
                stack.append(pop(1)[0])
                stack.append(stack[-1])
            elif name == "STOP":
                break
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    if not marks:
                        refuse("it is not a well-formed pickle (no mark)")
                    del stack[marks.pop() :]
                    pop(before.index(pickletools.markobject))
                else:
                    pop(len(before))
                stack.extend(anything for _ in opcode.stack_after)
    except (ValueError, IndexError) as error:
        if isinstance(error, ValueCheckError):
            raise
        refuse(f"it is not a well-formed pickle ({error})")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allowed globals (the opcode walk already refused any other: this is the second lock)."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def checked_reader(path: str | Path) -> Any:
    """A ``FileSystemReader`` of the checkpoint folder ``path`` whose metadata is checked before it is unpickled.

    Pass it to ``torch.distributed.checkpoint.load(..., storage_reader=...)``; its ``read_metadata`` (also the
    per-rank ``__<rank>.metadata`` fallback) reads the file once, runs :func:`check_metadata_pickle` on the bytes,
    then unpickles the same bytes with only the allowed globals resolvable.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            file = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            data = file.read_bytes()
            check_metadata_pickle(data, file)
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(path)


def checked_load_planner() -> Any:
    """DCP's default load planner (partial loads allowed), reading non-tensor values with ``weights_only=True``.

    The stock ``load_bytes`` calls ``torch.load(weights_only=False)``; this one loads the value with
    ``weights_only=True`` (plain data only) and hands the stock method bytes re-written from that plain value.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class CheckedLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise ValueCheckError(
                    f"Cannot resume: the sharded checkpoint's value {read_item.dest_index.fqn} is not plain data "
                    f"({error}); resume only from checkpoints you wrote."
                ) from error
            # the stock method unpickles with weights_only=False: hand it bytes re-written from the plain value
            safe = io.BytesIO()
            torch.save(loaded, safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    # partial: a parameter without AdamW state yet (a head that switches on later) has none saved
    return CheckedLoadPlanner(allow_partial_load=True)
