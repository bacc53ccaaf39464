"""Shared fixtures: Kornia-style ``device``/``dtype`` parametrization and tiny random HF checkpoints.

Options (as in Kornia): ``--device cpu|cuda|all`` (default cpu) and
``--dtype float32|float64|bfloat16|all`` (default float32; comma lists work too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Tiny tower sizes: text width differs from vision width, so a swapped projection cannot pass.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
TEXT = dict(
    vocab_size=99,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    projection_size=32,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=1,
)
SIGLIP_IMAGE_SIZE = 16  # 4 x 4 patches of 4 pixels
SIGLIP2_NUM_PATCHES = 16  # a 4 x 4 NaFlex position table


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", action="store", default="cpu", help="cpu, cuda, all, or a comma list")
    parser.addoption("--dtype", action="store", default="float32", help="float32, float64, bfloat16, all")


def _devices(option: str) -> list[str]:
    if option == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return option.split(",")


def _dtypes(option: str) -> list[str]:
    if option == "all":
        return ["float32", "float64", "bfloat16"]
    return option.split(",")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `-m dtypes` selects the tests that take the dtype fixture (what `make test-dtypes` runs in float64 / bfloat16)
    for item in items:
        if "dtype" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.dtypes)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        names = _devices(metafunc.config.getoption("--device"))
        metafunc.parametrize("device", [torch.device(name) for name in names], ids=names)
    if "dtype" in metafunc.fixturenames:
        names = _dtypes(metafunc.config.getoption("--dtype"))
        metafunc.parametrize("dtype", [DTYPES[name] for name in names], ids=names)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Parity tolerances of the issue: fp32 atol 1e-5 / rtol 1e-4, fp64 1e-10, bf16 3e-2."""
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-10}
    if dtype in (torch.bfloat16, torch.float16):
        return {"atol": 3e-2, "rtol": 3e-2}
    return {"atol": 1e-5, "rtol": 1e-4}


# transformers resizes the NaFlex position table in float32 for every model dtype on CPU (modeling_siglip2.py,
# `Siglip2VisionEmbeddings.resize_positional_embeddings`: up to 5.23 `F.interpolate` on the table cast to float32,
# from 5.24 float32 interpolation weights times `table.float()`). Its float64 NaFlex model therefore carries
# float32 rounding in every position embedding: each one is a convex combination of at most k table rows
# (k = 16 for the tests' 4 x 4 table), so its error is bounded by about (k + 10) u max|table| (the table's
# rounding to float32, the weights' few float32 operations, a k-term float32 sum; u = 2**-24; Higham, Accuracy
# and Stability of Numerical Algorithms, 2nd ed., sec. 3.1) = 1.5e-6 max|table|, and the LayerNorm'd 2-layer
# towers pass that on at the same relative order. A float64 comparison with transformers' NaFlex tower can only
# claim float32 accuracy: `naflex_tolerance` returns the float32 tolerance for float64. The float64 claim itself
# is tested against `naflex_positions_reference` below (`float64_naflex_positions` swaps it into transformers).
def naflex_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance against transformers' NaFlex vision tower: float32's for float64 (see above), else `tolerance`."""
    return tolerance(torch.float32 if dtype == torch.float64 else dtype)


def naflex_positions_reference(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Independent float64 NaFlex position resize: ``(side, side, D)`` table -> ``(height * width, D)``.

    Bilinear with antialias (``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``, which is
    PIL's triangle filter): along each axis, output ``o`` of ``n`` from ``m`` inputs has the centre
    ``c = (o + 0.5) m / n - 0.5``, the support ``s = max(m / n, 1)`` and the weights
    ``max(0, 1 - |i - c| / s)`` over inputs ``i``, normalized to sum 1; the 2-D resize is the outer product.
    Written from that formula, not with ``F.interpolate``, and computed in float64 whatever the table's dtype.
    """

    def weights(size_in: int, size_out: int) -> torch.Tensor:
        scale = size_in / size_out
        center = (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5
        source = torch.arange(size_in, dtype=torch.float64)
        w = (1 - (source[None, :] - center[:, None]).abs() / max(scale, 1.0)).clamp(min=0)
        return w / w.sum(-1, keepdim=True)  # (size_out, size_in)

    rows, cols = weights(table.shape[0], height), weights(table.shape[1], width)
    resized = torch.einsum("hi,wj,ijd->hwd", rows, cols, table.detach().double())
    return resized.reshape(height * width, -1)


@pytest.fixture
def float64_naflex_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' NaFlex embeddings with the float64 `naflex_positions_reference` instead of its float32 resize.

    Everything else of transformers' tower stays its own code, so a float64 comparison at 1e-10 tests the rest
    of the arithmetic. The padded rows get the first position, as transformers' own resize does.
    """
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    def resize(positional_embeddings, spatial_shapes, max_length):
        out = positional_embeddings.new_empty(spatial_shapes.shape[0], max_length, positional_embeddings.shape[-1])
        for row, (height, width) in enumerate(spatial_shapes.tolist()):
            resized = naflex_positions_reference(positional_embeddings, height, width).to(out.dtype)
            out[row, : height * width] = resized
            out[row, height * width :] = resized[0]
        return out

    monkeypatch.setattr(Siglip2VisionEmbeddings, "resize_positional_embeddings", staticmethod(resize))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (zero biases, unit norms) so a dropped or swapped weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)


def make_hf_siglip(seed: int = 0):
    """A tiny random transformers ``SiglipModel`` (SigLIP v1 / SigLIP 2 fixed resolution)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(TEXT), vision_config=dict(VISION, image_size=SIGLIP_IMAGE_SIZE))
    model = SiglipModel(config).eval()
    _perturb(model, seed)
    return model


def make_hf_siglip2(seed: int = 0):
    """A tiny random transformers ``Siglip2Model`` (SigLIP 2 NaFlex)."""
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(seed)
    config = Siglip2Config(text_config=dict(TEXT), vision_config=dict(VISION, num_patches=SIGLIP2_NUM_PATCHES))
    model = Siglip2Model(config).eval()
    _perturb(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_siglip():
    return make_hf_siglip(seed=0)


@pytest.fixture(scope="session")
def hf_siglip2():
    return make_hf_siglip2(seed=1)


@pytest.fixture(scope="session")
def siglip_checkpoint(tmp_path_factory: pytest.TempPathFactory, hf_siglip) -> Path:
    """Folder with ``config.json`` + ``model.safetensors`` of the tiny ``SiglipModel``."""
    folder = tmp_path_factory.mktemp("siglip")
    hf_siglip.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def siglip2_checkpoint(tmp_path_factory: pytest.TempPathFactory, hf_siglip2) -> Path:
    """Folder with ``config.json`` + ``model.safetensors`` of the tiny ``Siglip2Model`` (NaFlex)."""
    folder = tmp_path_factory.mktemp("siglip2")
    hf_siglip2.save_pretrained(folder, safe_serialization=True)
    return folder


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


# Property tests (tests/test_properties.py, hypothesis): a small example budget in the default run, more under
# HYPOTHESIS_PROFILE=deep (`make test-all`). No deadline: timing is never asserted in this suite.
try:
    import os as _os

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "default", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("deep", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a dev dependency; without it tests/test_properties.py is skipped
    pass
