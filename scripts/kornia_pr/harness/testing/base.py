"""A minimal stand-in for Kornia's ``testing/base.py``, written for the PR checks of kornia_siglip2.

Kornia's tests import ``BaseTester`` from its repository's ``testing`` package, which the kornia wheel does not ship.
This module offers the part of that interface the rendered tests use, with the same behaviour as Kornia's main
``b4f5a78``: ``BaseTester.assert_close`` (tolerances chosen from the dtypes when none are given: float32
``rtol=1e-4, atol=1e-5``, float64 ``1e-5, 1e-5``, float16 ``1e-3``, bfloat16 ``7.8e-3``) and
``BaseTester.gradcheck`` (inputs cast to float64 with ``requires_grad``, ``fast_mode=True``). In a Kornia checkout the
rendered tests run against Kornia's own file instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.autograd import gradcheck as _gradcheck

__all__ = ["BaseTester", "assert_close"]

_DTYPE_TOLERANCES = {
    torch.bfloat16: (7.8e-3, 7.8e-3),
    torch.float16: (1e-3, 1e-3),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-5, 1e-5),
}


def assert_close(actual: Any, expected: Any, *, rtol: Optional[float] = None, atol: Optional[float] = None) -> None:
    """``torch.testing.assert_close`` with tolerances from the dtypes of both sides when neither is given."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if rtol is None and atol is None:
        pairs = [_DTYPE_TOLERANCES.get(t.dtype, (0.0, 0.0)) for t in (actual, expected)]
        rtol, atol = max(p[0] for p in pairs), max(p[1] for p in pairs)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_stride=False, equal_nan=False)


class BaseTester:
    """Base class of the rendered tests: ``test_smoke``, ``test_exception``, ``test_cardinality``, ...."""

    @staticmethod
    def assert_close(
        actual: Any,
        expected: Any,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        low_tolerance: bool = False,
    ) -> None:
        """Assert closeness; ``low_tolerance`` takes the square root of the dtype tolerances."""
        if rtol is None and atol is None and isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
            pairs = [_DTYPE_TOLERANCES.get(t.dtype, (0.0, 0.0)) for t in (actual, expected)]
            rtol, atol = max(p[0] for p in pairs), max(p[1] for p in pairs)
            if low_tolerance:
                rtol, atol = rtol**0.5, atol**0.5
        assert_close(actual, expected, rtol=rtol, atol=atol)

    @staticmethod
    def gradcheck(
        func: Callable[..., Union[torch.Tensor, Sequence[torch.Tensor]]],
        inputs: Union[torch.Tensor, Sequence[Any]],
        *,
        raise_exception: bool = True,
        fast_mode: bool = True,
        **kwargs: Any,
    ) -> bool:
        """``torch.autograd.gradcheck`` on the inputs cast to float64, the floating ones requiring grad."""

        def cast(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            value = value.detach().to(torch.float64)
            return value.requires_grad_(True) if value.is_floating_point() else value

        inputs = cast(inputs) if isinstance(inputs, torch.Tensor) else [cast(v) for v in inputs]
        return _gradcheck(func, inputs, raise_exception=raise_exception, fast_mode=fast_mode, **kwargs)
