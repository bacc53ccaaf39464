"""Checkpoints: a run killed mid-way (SIGKILL) and resumed equals the uninterrupted run, bit for bit in float64.

Also with the full SigLIP 2 objective, killed after the self-distillation switch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import kill_at_step, tiny_siglip2_config

from kornia_siglip2 import SigLip2
from kornia_siglip2.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kornia_siglip2.training.recipe import RecipeConfig, train
from kornia_siglip2.training.synthetic import write_synthetic_dataset

TINY = tiny_siglip2_config()
STEPS = 10


def _options(root: Path, out: str) -> dict:
    return dict(
        data=str(root / "data" / "manifest.jsonl"),
        out=str(root / out),
        model_config=str(root / "tiny.json"),
        text_length=12,
        parallel="none",
        precision="fp64",
        token_budget=48,
        max_num_patches=(8, 16),
        steps=STEPS,
        accumulation=2,
        learning_rate=0.01,
        warmup_steps=2,
        ema_momentum=0.9,
        save_every=2,
        num_workers=0,
        threads=1,
        device="cpu",
        seed=1,
    )


def _command(options: dict) -> list[str]:
    command = [sys.executable, "-m", "kornia_siglip2.train"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        command += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return command


def _last_losses(metrics: Path) -> dict[int, float]:
    # a resumed run logs the steps after its checkpoint again: the last line of each step is what was kept
    return {record["step"]: record["loss"] for record in map(json.loads, metrics.read_text().splitlines())}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint")
    write_synthetic_dataset(root / "data", 29, seed=4, min_side=12, max_side=40)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def test_kill_and_resume_equals_uninterrupted(root):
    reference = train(RecipeConfig(**_options(root, "uninterrupted")))
    options = _options(root, "killed")
    metrics = root / "killed" / "metrics.jsonl"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # kill it once step 5 is logged: past the step-4 checkpoint, before the end
    kill_at_step(_command(options), metrics, 5, environment)
    killed_at = latest_checkpoint(root / "killed" / "checkpoints")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < STEPS
    subprocess.run(_command(options), env=environment, check=True, stdout=subprocess.DEVNULL, timeout=180)

    expected = {record["step"]: record["loss"] for record in reference}
    assert _last_losses(metrics) == expected  # bit for bit
    final = SigLip2.from_pretrained(root / "killed" / "final", dtype=torch.float64).state_dict()
    uninterrupted = SigLip2.from_pretrained(root / "uninterrupted" / "final", dtype=torch.float64).state_dict()
    for name, tensor in uninterrupted.items():
        assert torch.equal(final[name], tensor), name
    ema = load_file(root / "killed" / "checkpoints" / f"step-{STEPS:08d}" / "ema.safetensors")
    ema_reference = load_file(root / "uninterrupted" / "checkpoints" / f"step-{STEPS:08d}" / "ema.safetensors")
    assert ema.keys() == ema_reference.keys()
    assert all(torch.equal(ema[name], ema_reference[name]) for name in ema)


FULL_STEPS = 8
FULL = dict(
    objective="siglip2",
    distill_start=0.5,  # self-distillation from step 5 on
    size_factor=0.25,
    locca_num_bins=16,
    distill_heads=(16, 8, 32),
    num_local_views=2,
    teacher_momentum=0.9,
    steps=FULL_STEPS,
)


def test_kill_and_resume_equals_uninterrupted_full_objective(root):
    """Killed after the switch: the resumed run needs the saved teacher, centers, heads and switch flag."""
    options = {**_options(root, "full-uninterrupted"), **FULL}
    reference = train(RecipeConfig(**options))
    assert [record["distillation"] for record in reference] == [False] * 4 + [True] * 4
    options = {**_options(root, "full-killed"), **FULL}
    metrics = root / "full-killed" / "metrics.jsonl"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # step 7 is logged after the step-6 checkpoint is complete: the teacher was reset at step 5, updated twice
    kill_at_step(_command(options), metrics, 7, environment)
    killed_at = latest_checkpoint(root / "full-killed" / "checkpoints")
    assert killed_at is not None and killed_at.name in ("step-00000006", "step-00000008")
    if killed_at.name == "step-00000008":
        pytest.skip("the run finished its last checkpoint before the kill landed")
    saved = load_file(killed_at / "model.safetensors")
    assert bool(saved["loss._extra_state"]) and saved["loss.distillation.global_center"].abs().sum() > 0
    subprocess.run(_command(options), env=environment, check=True, stdout=subprocess.DEVNULL, timeout=180)

    expected = {record["step"]: record["loss"] for record in reference}
    assert _last_losses(metrics) == expected  # bit for bit
    for name in ("model.safetensors", "ema.safetensors"):
        resumed = load_file(root / "full-killed" / "checkpoints" / f"step-{FULL_STEPS:08d}" / name)
        uninterrupted = load_file(root / "full-uninterrupted" / "checkpoints" / f"step-{FULL_STEPS:08d}" / name)
        assert resumed.keys() == uninterrupted.keys()
        for key, tensor in uninterrupted.items():
            assert torch.equal(resumed[key], tensor), key


def test_files_are_safetensors_and_json_written_atomically(tmp_path):
    model = torch.nn.Linear(3, 2).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    # a save that died half-way leaves a temporary folder that is neither "latest" nor in the way
    (tmp_path / ".tmp-step-00000009").mkdir()
    path = save_checkpoint(tmp_path, 9, model, optimizer, {"position": 4})
    assert latest_checkpoint(tmp_path) == path
    assert {file.suffix for file in path.iterdir()} == {".safetensors", ".json"}
    assert not list(tmp_path.glob(".tmp-*"))
    other = torch.nn.Linear(3, 2).double()
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = load_checkpoint(path, other, other_optimizer)
    assert state["position"] == 4 and state["step"] == 9
    assert torch.equal(other.weight, model.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(other_optimizer.state[other.weight][key], optimizer.state[model.weight][key])
    for step in (10, 11, 12):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000011", "step-00000012"]
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path, other, other_optimizer)
