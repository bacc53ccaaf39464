"""Exclusive lock files: a second process doing the same job on the same folder is refused, not mixed in.

``fcntl.flock`` is reliable on local file systems; on NFS it depends on the server (``lockd``), so give
concurrent jobs there their own output folders. On systems without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["exclusive_lock"]


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
        handle.close()
