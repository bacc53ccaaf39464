"""Minimal pytest fixtures compatible with Kornia's ``conftest.py``, for the rendered PR tests of kornia_siglip2.

Kornia's tests take ``device``, ``dtype`` and ``torch_optimizer`` fixtures, parametrized from ``--device``,
``--dtype`` and ``--optimizer`` (or the ``KORNIA_TEST_DEVICE`` / ``KORNIA_TEST_DTYPE`` / ``KORNIA_TEST_OPTIMIZER``
environment variables); a comma-separated list runs each value. As in Kornia, tests whose name contains ``dynamo`` are
deselected unless ``KORNIA_TEST_OPTIMIZER`` is set, and ``@pytest.mark.slow`` tests need ``--runslow``. Written from
the behaviour of Kornia main ``b4f5a78``'s fixtures; the kornia wheel does not ship them.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("KORNIA_TEST_DEVICE", "cpu"))
    parser.addoption("--dtype", default=os.environ.get("KORNIA_TEST_DTYPE", "float32"))
    parser.addoption("--optimizer", default=os.environ.get("KORNIA_TEST_OPTIMIZER", "inductor"))
    parser.addoption("--runslow", action="store_true", default=os.environ.get("KORNIA_TEST_RUNSLOW", "") == "true")


def _values(config: pytest.Config, option: str, every: list[str]) -> list[str]:
    raw = config.getoption(option)
    return every if raw == "all" else raw.split(",")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device_name" in metafunc.fixturenames:
        metafunc.parametrize("device_name", _values(metafunc.config, "--device", ["cpu", "cuda"]))
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", _values(metafunc.config, "--dtype", list(DTYPES)))
    if "optimizer_backend" in metafunc.fixturenames:
        metafunc.parametrize("optimizer_backend", _values(metafunc.config, "--optimizer", ["inductor"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("KORNIA_TEST_OPTIMIZER", "").strip():
        items[:] = [item for item in items if "dynamo" not in item.name.lower()]
    if not config.getoption("--runslow"):
        skip = pytest.mark.skip(reason="need --runslow option to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture()
def device(device_name: str) -> torch.device:
    if device_name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(device_name)


@pytest.fixture()
def dtype(dtype_name: str) -> torch.dtype:
    return DTYPES[dtype_name]


@pytest.fixture()
def torch_optimizer(optimizer_backend: str):
    if not optimizer_backend:
        return lambda module: module
    if optimizer_backend == "jit":
        return torch.jit.script
    torch._dynamo.reset()
    return partial(torch.compile, backend=optimizer_backend)
