"""Training run folders under faults (issue 29): resume point, damaged checkpoints, divergence, locks, options.

Each test failed on main before the fix: a damaged ``latest`` restarted from step 0 over the checkpoints, a
checkpoint with NaN weights or a missing layer resumed, a diverged run exited 0 and exported NaN weights, two runs
on one ``--out`` interleaved, a cut metrics line stayed, and nonsense options were accepted.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import RunsACommand, recipe_options, tiny_siglip2_config

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.training import recipe
from kornia_siglip2.training.checkpoint import LATEST, find_resume_checkpoint
from kornia_siglip2.training.recipe import RecipeConfig, run_lock, train
from kornia_siglip2.training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults_training")
    write_synthetic_dataset(root / "data", 12, seed=0, min_side=12, max_side=40)
    (root / "tiny.json").write_text(json.dumps(tiny_siglip2_config()))
    return root


def _options(root: Path, out: Path | str, **overrides) -> dict:
    return recipe_options(root, out, **{"save_every": 1, **overrides})


@pytest.fixture(scope="module")
def two_steps(root: Path) -> Path:
    """A finished 2-step run with checkpoints step-1 and step-2."""
    out = root / "two-steps"
    train(RecipeConfig(**_options(root, out)))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


class TestResumePoint:
    @pytest.mark.parametrize("damage", ["deleted", "garbage", "stale", "names-a-file", "incomplete"])
    def test_damaged_latest_resumes_from_the_newest_checkpoint(self, root, two_steps, tmp_path, damage, capsys):
        """Main: a stale, garbage or deleted ``latest`` restarted from step 0 and overwrote the run."""
        run = _copy(two_steps, tmp_path)
        pointer = run / "checkpoints" / LATEST
        if damage == "deleted":
            pointer.unlink()
        elif damage == "garbage":
            pointer.write_bytes(b"\xff\xfe\x00garbage")
        elif damage == "stale":  # names a checkpoint the rotation removed
            pointer.write_text("step-00000000\n")
        elif damage == "incomplete":  # names a folder whose files are not all there
            (run / "checkpoints" / "step-00000001" / "optimizer.json").unlink()
            pointer.write_text("step-00000001\n")
        else:
            pointer.write_text("trainer.json\n")
        assert find_resume_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000002"
        records = train(RecipeConfig(**_options(root, run, steps=3)))
        assert [record["step"] for record in records] == [3]
        assert "newest complete checkpoint" in capsys.readouterr().err
        assert _steps(run / "metrics.jsonl") == [1, 2, 3]

    def test_latest_naming_an_older_complete_checkpoint_rewinds(self, root, two_steps, tmp_path, capsys):
        """Editing ``latest`` to an older complete checkpoint rewinds the run (with a note), as on main."""
        run = _copy(two_steps, tmp_path)
        (run / "checkpoints" / LATEST).write_text("step-00000001\n")
        records = train(RecipeConfig(**_options(root, run, steps=3)))
        assert [record["step"] for record in records] == [2, 3]
        assert "older than the complete step-00000002" in capsys.readouterr().err
        assert _steps(run / "metrics.jsonl") == [1, 2, 3]

    def test_incomplete_checkpoints_refuse_a_silent_restart(self, root, two_steps, tmp_path):
        run = _copy(two_steps, tmp_path)
        for folder in (run / "checkpoints").glob("step-*"):
            (folder / "model.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="none is complete"):
            train(RecipeConfig(**_options(root, run, steps=3)))

    def test_no_checkpoint_starts_fresh(self, tmp_path):
        assert find_resume_checkpoint(tmp_path / "nothing") is None


class TestDamagedCheckpoint:
    def _damage(self, run: Path, change) -> Path:
        path = run / "checkpoints" / "step-00000002" / "model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
        return path

    def test_nan_weights_refuse_to_resume(self, root, two_steps, tmp_path):
        """Main: a checkpoint with NaN weights resumed and trained on NaN."""
        run = _copy(two_steps, tmp_path)

        def poison(tensors):
            name = next(key for key in tensors if key.endswith("weight"))
            tensors[name][0] = math.nan

        path = self._damage(run, poison)
        with pytest.raises(ValueError, match="non-finite") as error:
            train(RecipeConfig(**_options(root, run, steps=3)))
        assert str(path) in str(error.value)

    def test_missing_layer_refuses_to_resume(self, root, two_steps, tmp_path):
        """Main: a checkpoint missing a layer's weights resumed."""
        run = _copy(two_steps, tmp_path)
        path = self._damage(run, lambda tensors: tensors.pop(next(key for key in tensors if "layers.0" in key)))
        with pytest.raises(ValueError, match="missing") as error:
            train(RecipeConfig(**_options(root, run, steps=3)))
        assert str(path) in str(error.value)

    def test_truncated_file_is_named(self, root, two_steps, tmp_path):
        run = _copy(two_steps, tmp_path)
        path = run / "checkpoints" / "step-00000002" / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(ValueError, match="damaged") as error:
            train(RecipeConfig(**_options(root, run, steps=3)))
        assert str(path) in str(error.value)


class TestDivergence:
    def test_nan_loss_stops_without_exporting(self, root, tmp_path, monkeypatch):
        """Main: a run whose loss became NaN went on, exited 0 and exported non-finite weights."""
        real = recipe.sigmoid_loss
        calls = []

        def diverging(*args, **kwargs):
            calls.append(1)
            loss = real(*args, **kwargs)
            return loss * math.nan if len(calls) >= 2 else loss

        monkeypatch.setattr(recipe, "sigmoid_loss", diverging)
        out = tmp_path / "nan"
        with pytest.raises(FloatingPointError, match="step 2"):
            train(RecipeConfig(**_options(root, out, steps=3)))
        assert not (out / "final").exists()
        assert sorted(path.name for path in (out / "checkpoints").glob("step-*")) == ["step-00000001"]

    def test_nan_weights_are_never_exported(self, root, tmp_path, monkeypatch):
        real = torch.optim.AdamW.step

        def poisoning_step(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
        out = tmp_path / "inf"
        with pytest.raises(FloatingPointError, match="non-finite weights"):
            train(RecipeConfig(**_options(root, out, steps=1)))
        assert not (out / "final").exists() and not list((out / "checkpoints").glob("step-*"))

    def test_huge_learning_rate_diverges_with_an_error_not_exit_0(self, root, tmp_path, monkeypatch):
        """Learning rate 1e6 (allowed by raising the cap): stopped as soon as anything is non-finite."""
        monkeypatch.setattr(recipe, "MAX_LEARNING_RATE", math.inf)
        out = tmp_path / "huge-lr"
        with pytest.raises(FloatingPointError):
            train(RecipeConfig(**_options(root, out, steps=6, learning_rate=1e6, grad_clip=None, warmup_steps=0)))
        assert not (out / "final").exists()


class TestOptions:
    @pytest.mark.parametrize(
        "option",
        [
            {"learning_rate": 1e6},
            {"learning_rate": math.nan},
            {"learning_rate": -1e-3},
            {"min_lr_ratio": -1.0},
            {"min_lr_ratio": 2.0},
            {"grad_clip": math.nan},
            {"grad_clip": math.inf},
            {"weight_decay": -0.1},
            {"warmup_steps": -1},
            {"ema_momentum": 1.5},
            {"token_budget": 0},
            {"device": "no-such-device"},
        ],
    )
    def test_out_of_range_refused_up_front(self, root, option, tmp_path):
        name = next(iter(option))
        with pytest.raises(ValueError, match=name):
            RecipeConfig(**_options(root, tmp_path / "x", **option))
        assert not (tmp_path / "x").exists()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_without_cuda(self, root, tmp_path):
        """Main: --device cuda on a CPU machine failed later with torch's own message."""
        with pytest.raises(ValueCheckError, match="CUDA is not available"):
            RecipeConfig(**_options(root, tmp_path / "x", device="cuda"))

    def test_min_lr_ratio_never_negative(self, root, tmp_path):
        with pytest.raises(ValueCheckError, match="min_lr_ratio"):
            recipe.main(["--data", "d", "--out", str(tmp_path), "--model-config", "c", "--min-lr-ratio", "-1"])

    def test_parallel_none_under_a_launcher_refuses(self, root, tmp_path, monkeypatch):
        """Main: torchrun with --parallel none trained different weights per rank and exported rank 0's."""
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueCheckError, match="--parallel none"):
            train(RecipeConfig(**_options(root, tmp_path / "x")))


class TestRunFolder:
    def test_second_run_on_the_same_out_refused(self, root, tmp_path):
        """Main: two runs on one --out interleaved metrics.jsonl and overwrote each other's checkpoints."""
        out = tmp_path / "locked"
        with run_lock(out), pytest.raises(RuntimeError, match="Another training run"):
            train(RecipeConfig(**_options(root, out)))
        assert not (out / "metrics.jsonl").exists()
        train(RecipeConfig(**_options(root, out, steps=1)))  # released: the next run goes ahead

    def test_cut_metrics_line_and_duplicate_steps_repaired_on_resume(self, root, two_steps, tmp_path):
        """Main: after a crash mid-write, metrics.jsonl kept a cut line, and the resumed steps were logged twice."""
        run = _copy(two_steps, tmp_path)
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines(keepends=True)
        # step 3 was logged but its checkpoint never written, then the disk filled up in the middle of step 4
        step3 = json.dumps({**json.loads(lines[-1]), "step": 3}) + "\n"
        metrics.write_text("".join(lines) + step3 + '{"step": 4, "lo')
        shutil.rmtree(run / "checkpoints" / "step-00000001")
        train(RecipeConfig(**_options(root, run, steps=4)))
        assert _steps(metrics) == [1, 2, 3, 4]
        assert all(line.endswith("\n") for line in metrics.read_text().splitlines(keepends=True))


def test_cli_refuses_out_of_range_options_with_non_zero_exit(root, tmp_path):
    """Main: ``--learning-rate 1e6`` ran, diverged to NaN and exited 0."""
    import subprocess
    import sys

    options = _options(root, tmp_path / "cli", learning_rate=1e6)
    command = [sys.executable, "-m", "kornia_siglip2.train"]
    for name in ("data", "out", "model_config", "learning_rate", "device", "parallel"):
        command += ["--" + name.replace("_", "-"), str(options[name])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode != 0 and "learning_rate (--learning-rate) must be in" in result.stderr
    assert not (tmp_path / "cli" / "final").exists()


def test_hostile_model_config_names_file_and_field(root, tmp_path):
    """Main: ``--model-config`` with 10**5 layers built for minutes; a string width failed deep inside torch."""
    for change, message in [
        ({"num_hidden_layers": 10**5}, "vision_config.num_hidden_layers 100000 is above"),
        ({"hidden_size": "16"}, "vision_config.hidden_size must be an integer"),
    ]:
        config = tiny_siglip2_config()
        config["vision_config"].update(change)
        path = tmp_path / "hostile.json"
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message) as error:
            train(RecipeConfig(**_options(root, tmp_path / "x", model_config=str(path))))
        assert str(path) in str(error.value)


@pytest.fixture(scope="module")
def two_sharded_steps(root: Path) -> Path:
    """A finished 2-step run (one process) with sharded checkpoints step-1 and step-2."""
    out = root / "two-sharded-steps"
    train(RecipeConfig(**_options(root, out, checkpoint_format="sharded")))
    return out


def _metrics(out: Path) -> dict[int, float]:
    return {
        record["step"]: record["loss"] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    }


class TestShardedCheckpoint:
    def test_resume_equals_uninterrupted(self, root, two_sharded_steps, tmp_path):
        """The checked loader still resumes a real sharded checkpoint: step 2 from step 1 as in the full run."""
        run = _copy(two_sharded_steps, tmp_path)
        (run / "checkpoints" / LATEST).write_text("step-00000001\n")
        shutil.rmtree(run / "checkpoints" / "step-00000002")
        (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
        train(RecipeConfig(**_options(root, run, checkpoint_format="sharded")))
        assert _metrics(run)[2] == _metrics(two_sharded_steps)[2]

    @pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
    def test_metadata_that_runs_code_is_refused_before_it_runs(self, root, two_sharded_steps, tmp_path, protocol):
        """Main: torch.distributed.checkpoint unpickles ``.metadata``; a crafted one ran a command on resume."""
        run = _copy(two_sharded_steps, tmp_path)
        marker = tmp_path / "ran"
        metadata = run / "checkpoints" / "step-00000002" / "dcp" / ".metadata"
        metadata.write_bytes(pickle.dumps({"payload": RunsACommand(f"touch {marker}")}, protocol=protocol))
        with pytest.raises(ValueCheckError, match="system") as error:
            train(RecipeConfig(**_options(root, run, steps=3, checkpoint_format="sharded")))
        assert str(metadata) in str(error.value)
        assert not marker.exists()

    @staticmethod
    def _rewrite(run: Path, change) -> Path:
        """Rewrite step 2's sharded state through torch.distributed.checkpoint's own converters, changed."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

        folder = run / "checkpoints" / "step-00000002" / "dcp"
        plain = run / "state.pt"
        dcp_to_torch_save(folder, plain)
        state = torch.load(plain, weights_only=True)
        change(state)
        torch.save(state, plain)
        shutil.rmtree(folder)
        torch_save_to_dcp(plain, folder)
        return folder

    @pytest.mark.parametrize("part", ["model", "optimizer"])
    def test_nan_refuses_to_resume(self, root, two_sharded_steps, tmp_path, part):
        """Main: the checks of a full checkpoint (finite, names, shapes) did not run on a sharded one."""
        run = _copy(two_sharded_steps, tmp_path)

        def poison(state):
            tensors = state["model"] if part == "model" else next(iter(state["optimizer"]["state"].values()))
            name = next(key for key, value in tensors.items() if value.is_floating_point() and value.dim() >= 1)
            tensors[name].view(-1)[0] = math.nan

        folder = self._rewrite(run, poison)
        with pytest.raises(ValueError, match="non-finite") as error:
            train(RecipeConfig(**_options(root, run, steps=3, checkpoint_format="sharded")))
        assert str(folder) in str(error.value)

    def test_missing_layer_refuses_to_resume(self, root, two_sharded_steps, tmp_path):
        run = _copy(two_sharded_steps, tmp_path)

        def drop(state):
            state["model"].pop(next(key for key in state["model"] if "layers.0" in key))

        folder = self._rewrite(run, drop)
        with pytest.raises(ValueError, match="missing") as error:
            train(RecipeConfig(**_options(root, run, steps=3, checkpoint_format="sharded")))
        assert str(folder) in str(error.value)


def test_forked_child_does_not_keep_the_run_lock(tmp_path):
    """A forked child (a DataLoader worker) closes its copy of the lock: the lock dies with the parent's file."""
    import os
    import signal

    from kornia_siglip2.locks import exclusive_lock

    lock = tmp_path / ".lock"
    read, write = os.pipe()
    with exclusive_lock(lock, lambda: "busy"):
        child = os.fork()
        if child == 0:  # the child outlives the parent's hold, as workers outlive a killed trainer
            os.close(read)
            os.write(write, b"x")
            signal.pause()
            os._exit(0)
        os.close(write)
        os.read(read, 1)
    try:
        with exclusive_lock(lock, lambda: "busy"):  # the parent let go; the live child must not hold it
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
