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
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _devices(option: str) -> list[str]:
    if option == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return option.split(",")


def _dtypes(option: str) -> list[str]:
    if option == "all":
        return ["float32", "float64", "bfloat16"]
    return option.split(",")


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
