"""Exclusive lock files: a second process doing the same job on the same folder is refused, not mixed in.

``fcntl.flock`` is reliable on local file systems; on NFS it depends on the server (``lockd``), so give
concurrent jobs there their own output folders. On systems without ``fcntl`` (Windows) no lock is taken.

A ``flock`` lock belongs to the open file, which forked children (DataLoader workers) share: if the locking
process is killed, its workers would keep the lock until they notice, and an immediate resume would be refused.
So a forked child closes its copies of the lock files at once (``os.register_at_fork``); the parent keeps the lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["exclusive_lock"]

_HELD: set = set()  # the lock files this process holds open


def _close_inherited_locks() -> None:
    for handle in list(_HELD):
        with contextlib.suppress(OSError):
            handle.close()  # closes the child's descriptor only: the parent's lock stays
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy_message: Callable[[], str]) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` for the ``with`` block.

    Args:
        path: the lock file (created, with its folder, if missing; never deleted: the lock is on the open file).
        busy_message: what to tell the user when another process holds the lock (built only then).

    Raises:
        RuntimeError: another process holds the lock; the message is ``busy_message()``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with exclusive_lock(f"{folder}/.lock", lambda: "busy"):
        ...     print("holding it")
        holding it
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole block: the lock lives on this descriptor
    _HELD.add(handle)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                raise RuntimeError(busy_message()) from error
        yield
    finally:
        _HELD.discard(handle)
        handle.close()
