"""Hostile ``config.json`` (issue 29): one validation before anything is allocated, naming the field and the file.

On main these gave messages naming neither (``hidden_size`` 2**30 / 0 / -32 / "32" / 32.0 / true / null,
``patch_size`` 0, ``layer_norm_eps`` "abc", ``num_channels`` 0, a list as ``vision_config``, dtype float8 /
complex, 100,000-deep JSON), or loaded and ran (``patch_size`` -4, ``layer_norm_eps`` -1: non-finite output), and
``num_hidden_layers`` 10**5 built for minutes before anything was checked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kornia_siglip2 import SigLip2
from kornia_siglip2.config import NO_LIMITS_ENV, validate_hf_config
from kornia_siglip2.model import load_vision_tower


def _checkpoint(source: Path, tmp_path: Path, change) -> Path:
    """The tiny checkpoint's weights (linked) under a changed config.json."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    os.symlink(source / "model.safetensors", folder / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    changed = change(config)
    text = changed if isinstance(changed, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


def _set(tower: str, field: str, value):
    def change(config):
        config[tower][field] = value

    return change


CASES = [
    ("vision_config", "hidden_size", 2**30, "vision_config.hidden_size 1073741824 is above the sane bound"),
    ("vision_config", "hidden_size", 0, "vision_config.hidden_size must be positive"),
    ("vision_config", "hidden_size", -32, "vision_config.hidden_size must be positive"),
    ("vision_config", "hidden_size", "32", "vision_config.hidden_size must be an integer, got str"),
    ("vision_config", "hidden_size", 32.0, "vision_config.hidden_size must be an integer, got float"),
    ("vision_config", "hidden_size", True, "vision_config.hidden_size must be an integer, got bool"),
    ("text_config", "hidden_size", None, "text_config.hidden_size must be an integer, got NoneType"),
    ("vision_config", "patch_size", 0, "vision_config.patch_size must be positive"),
    ("vision_config", "patch_size", -4, "vision_config.patch_size must be positive"),
    ("vision_config", "layer_norm_eps", "abc", "vision_config.layer_norm_eps must be a finite number"),
    ("vision_config", "layer_norm_eps", -1, r"vision_config.layer_norm_eps must be in \(0, 1\)"),
    ("text_config", "layer_norm_eps", float("nan"), "text_config.layer_norm_eps must be a finite number"),
    ("vision_config", "num_channels", 0, "vision_config.num_channels must be positive"),
    ("vision_config", "num_attention_heads", 5, "vision_config.hidden_size 32 must be divisible by"),
    ("vision_config", "vision_use_head", "yes", "vision_config.vision_use_head must be true or false"),
    ("vision_config", "hidden_act", ["gelu"], "vision_config.hidden_act must be a string"),
    ("text_config", "vocab_size", 2**40, "text_config.vocab_size .* is above the sane bound"),
]


@pytest.mark.parametrize(("tower", "field", "value", "message"), CASES, ids=[f"{c[1]}={c[2]!r}" for c in CASES])
def test_bad_field_names_field_and_file(siglip2_checkpoint, tmp_path, tower, field, value, message):
    folder = _checkpoint(siglip2_checkpoint, tmp_path, _set(tower, field, value))
    with pytest.raises(ValueError, match=message) as error:
        SigLip2.from_pretrained(folder)
    assert str(folder / "config.json") in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda config: config.update(vision_config=[1, 2]), "vision_config must be a JSON object"),
        (lambda config: config.update(torch_dtype="float8_e4m3fn"), "torch_dtype 'float8_e4m3fn' is not a floating"),
        (lambda config: config.update(dtype="complex64"), "dtype 'complex64' is not a floating"),
        (lambda config: config.update(dtype="no_such_type"), "dtype 'no_such_type'"),
        (lambda config: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["vision_config-list", "float8", "complex", "unknown-dtype", "deep-json"],
)
def test_bad_structure_names_the_file(siglip2_checkpoint, tmp_path, change, message):
    folder = _checkpoint(siglip2_checkpoint, tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        SigLip2.from_pretrained(folder)
    assert str(folder / "config.json") in str(error.value)


def test_huge_layer_count_refused_before_allocation(siglip2_checkpoint, tmp_path):
    """Main: 10**5 layers built for minutes (10**7: MemoryError after 2 minutes) before any check."""
    folder = _checkpoint(siglip2_checkpoint, tmp_path, _set("vision_config", "num_hidden_layers", 10**5))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"vision_config\.num_hidden_layers 100000 is above the sane bound"):
        SigLip2.from_pretrained(folder)
    assert time.perf_counter() - start < 1.0


def test_limits_can_be_lifted(siglip2_checkpoint, tmp_path, monkeypatch):
    """With the override the bound is not checked: the load then fails on the weights, as it should."""
    folder = _checkpoint(siglip2_checkpoint, tmp_path, _set("text_config", "max_position_embeddings", 2**21))
    with pytest.raises(ValueError, match="above the sane bound"):
        SigLip2.from_pretrained(folder)
    monkeypatch.setenv(NO_LIMITS_ENV, "1")
    with pytest.raises(ValueError, match="position_embedding"):
        SigLip2.from_pretrained(folder)


def test_vision_only_loader_validates_too(siglip2_checkpoint, tmp_path):
    folder = _checkpoint(siglip2_checkpoint, tmp_path, _set("vision_config", "patch_size", -4))
    with pytest.raises(ValueError, match=r"vision_config\.patch_size must be positive") as error:
        load_vision_tower(folder)
    assert str(folder / "config.json") in str(error.value)


def test_valid_configs_pass_unchanged(siglip_checkpoint, siglip2_checkpoint):
    for folder in (siglip_checkpoint, siglip2_checkpoint):
        config = json.loads((Path(folder) / "config.json").read_text())
        assert validate_hf_config(config) == SigLip2.from_pretrained(folder).config
