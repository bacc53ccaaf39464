"""The package's one error contract for argument checks.

Every check of a user's argument raises :class:`ValueCheckError` (wrong value or shape) or
:class:`TypeCheckError` (wrong type): subclasses of the builtin ``ValueError`` / ``TypeError``, so ``except
ValueError`` catches every bad-argument error of the package. The helpers follow Kornia's ``KORNIA_CHECK``
family (same arguments, messages formatted only on failure so ``torch.compile`` does not specialise on them)
but never import Kornia: ``import kornia`` loads all of ``kornia.augmentation``, which the inference core
does not need. Unlike Kornia's checks they cannot be switched off: a wrong argument must never become a
silent wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["TypeCheckError", "ValueCheckError", "check", "check_shape", "check_type"]

Message = str | Callable[[], str]


class ValueCheckError(ValueError):
    """An argument has a wrong value or shape (a ``ValueError``)."""


class TypeCheckError(TypeError):
    """An argument has a wrong type or dtype (a ``TypeError``)."""


def _text(message: Message) -> str:
    return message() if callable(message) else message


def check(condition: bool, message: Message) -> None:
    """Raise :class:`ValueCheckError` with ``message`` unless ``condition`` holds.

    Args:
        condition: what must be true.
        message: the error text, or a function returning it (called only on failure).

    Raises:
        ValueCheckError: ``condition`` is false.

    Example:
        >>> check(2 > 1, "never raised")
        >>> try:
        ...     check(False, lambda: "width must be positive")
        ... except ValueError as error:
        ...     print(error)
        width must be positive
    """
    if not condition:
        raise ValueCheckError(_text(message))


def check_type(condition: bool, message: Message) -> None:
    """Raise :class:`TypeCheckError` with ``message`` unless ``condition`` holds.

    Example:
        >>> try:
        ...     check_type(isinstance(3, str), "name must be a str")
        ... except TypeError as error:
        ...     print(error)
        name must be a str
    """
    if not condition:
        raise TypeCheckError(_text(message))


def check_shape(tensor: torch.Tensor, shape: Sequence[str], message: Message | None = None) -> None:
    """Check a tensor's shape against named dimensions, as Kornia's ``KORNIA_CHECK_SHAPE``.

    Args:
        tensor: the tensor to check.
        shape: one entry per dimension: a name (any size) or digits (that size); a leading or trailing
            ``"*"`` stands for any number of dimensions.
        message: what the tensor is, put in front of the mismatch.

    Raises:
        TypeCheckError: ``tensor`` is not a tensor.
        ValueCheckError: the shape does not match.

    Example:
        >>> check_shape(torch.rand(2, 3, 8, 8), ["B", "3", "H", "W"])
        >>> try:
        ...     check_shape(torch.rand(2, 8), ["B", "3", "H", "W"], "images must be (B, 3, H, W).")
        ... except ValueError as error:
        ...     print(error)
        images must be (B, 3, H, W). Shape mismatch: expected ['B', '3', 'H', 'W'], got (2, 8).
    """
    check_type(
        isinstance(tensor, torch.Tensor),
        lambda: f"{_text(message) + ' ' if message else ''}Expected a tensor, got {type(tensor).__name__}.",
    )
    dims = list(shape)
    actual = tuple(tensor.shape)
    if dims and dims[0] == "*":
        dims = dims[1:]
        ok = len(actual) >= len(dims)
        actual_tail = actual[len(actual) - len(dims) :] if ok else actual
    elif dims and dims[-1] == "*":
        dims = dims[:-1]
        ok = len(actual) >= len(dims)
        actual_tail = actual[: len(dims)] if ok else actual
    else:
        ok = len(actual) == len(dims)
        actual_tail = actual
    ok = ok and all(not dim.isdigit() or int(dim) == size for dim, size in zip(dims, actual_tail, strict=False))
    check(ok, lambda: f"{_text(message) + ' ' if message else ''}Shape mismatch: expected {list(shape)}, got {actual}.")
