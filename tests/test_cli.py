"""The command line as a user runs it: subprocesses, offline, on the demo's tiny checkpoint and images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kornia_siglip2.cli import main
from kornia_siglip2.demo import DEMO_LABELS
from kornia_siglip2.zero_shot import ZeroShotClassifier


def _command(*args):
    return [sys.executable, "-m", "kornia_siglip2", *map(str, args)]


def run_cli(*args, timeout=600):  # a hang guard, not a speed claim
    # offline; one thread: the tiny models gain nothing from a second one, and it thrashes on a shared machine
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(_command(*args), capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result, status, *fragments):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run, kept on disk: its checkpoint and images serve the other commands."""
    workdir = tmp_path_factory.mktemp("demo")
    return run_cli("demo", "--workdir", workdir), workdir


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """Every other subprocess of this file, success and error paths, on the demo's files.

    Sequential: each run is mostly interpreter start-up and imports, CPU-bound, and concurrent runs on a shared
    2-core machine were slower, not faster.
    """
    _, workdir = demo
    folder = tmp_path_factory.mktemp("cli")
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    checkpoint, images = workdir / "checkpoint", sorted((workdir / "images").glob("*.png"))
    commands = {
        "classify": ("classify", *images, "--labels", "red circle", "a dog", "--model", checkpoint),
        "embed": (
            "embed",
            workdir / "images",
            "--out",
            folder / "e.safetensors",
            "--model",
            checkpoint,
            "--batch-size",
            3,
        ),
        "compare": ("compare", "--model", checkpoint),
        "unknown_model": ("classify", images[0], "--labels", "cat", "--model", "nobody/no-such-siglip"),
        "no_labels": ("classify", images[0], "--model", checkpoint),
        "unreadable": ("classify", broken, "--labels", "cat", "--model", checkpoint),
    }
    return {name: run_cli(*args) for name, args in commands.items()}, folder


class TestDemo:
    def test_runs_and_passes(self, demo):
        result, workdir = demo
        assert result.returncode == 0, result.stdout + result.stderr
        assert "RANDOM" in result.stdout  # says clearly that the weights are random
        assert "PASS: demo finished" in result.stdout
        assert "FAIL" not in result.stdout
        for label in DEMO_LABELS:
            assert label in result.stdout
        assert sorted(path.name for path in (workdir / "images").iterdir()) == [
            "blue_square.png",
            "green_triangle.png",
            "red_circle.png",
            "yellow_ring.png",
        ]
        assert (workdir / "checkpoint" / "model.safetensors").is_file()

    def test_quiet_stderr(self, demo):
        result, _ = demo
        assert result.stderr == ""  # no transformers warnings or progress bars


class TestClassify:
    def test_table(self, demo, runs):
        _, workdir = demo
        result = runs[0]["classify"]
        images = sorted((workdir / "images").glob("*.png"))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.strip().splitlines()
        assert "sigmoid" in lines[0]
        assert lines[1].split()[:1] == ["image"] and "a dog" in lines[1]
        rows = [line.split() for line in lines[2:]]
        assert [row[0] for row in rows] == [str(image) for image in images]
        printed = torch.tensor([[float(value) for value in row[1:]] for row in rows])
        classifier = ZeroShotClassifier.from_pretrained(workdir / "checkpoint")
        with torch.no_grad():
            expected = classifier(images, ["red circle", "a dog"])
        torch.testing.assert_close(printed, expected, rtol=0, atol=6e-5)  # printed with 4 decimals

    def test_errors(self, runs):
        results = runs[0]
        assert_one_line_error(results["unknown_model"], 1, "classify: error:", "nobody/no-such-siglip")
        assert_one_line_error(results["no_labels"], 2, "--labels")
        assert_one_line_error(results["unreadable"], 1, "Cannot read image", "broken.png")


class TestEmbed:
    def test_safetensors(self, demo, runs):
        from safetensors import safe_open

        _, workdir = demo
        results, folder = runs
        out = folder / "e.safetensors"
        result = results["embed"]
        assert result.returncode == 0, result.stderr
        assert "wrote 4 embeddings of dimension 64" in result.stdout
        assert "embedding images" in result.stderr  # two batches: a progress bar
        with safe_open(out, framework="pt") as handle:
            embeddings = handle.get_tensor("image_embeds")
            files = json.loads(handle.metadata()["files"])
        assert files == sorted(path.name for path in (workdir / "images").iterdir())
        classifier = ZeroShotClassifier.from_pretrained(workdir / "checkpoint", load_tokenizer=False)
        expected = classifier.embed_images([workdir / "images" / name for name in files], batch_size=4)
        torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)

    def test_npy_in_process(self, demo, tmp_path, capsys):
        _, workdir = demo
        out = tmp_path / "embeddings.npy"
        assert main(["embed", str(workdir / "images"), "--out", str(out), "--model", str(workdir / "checkpoint")]) == 0
        embeddings = np.load(out)
        assert embeddings.shape == (4, 64)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
        assert "wrote 4 embeddings" in capsys.readouterr().out

    def test_errors_in_process(self, demo, tmp_path, capsys):
        _, workdir = demo
        checkpoint = str(workdir / "checkpoint")
        (tmp_path / "empty").mkdir()
        cases = [
            (["embed", str(workdir / "images"), "--out", str(tmp_path / "x.txt"), "--model", checkpoint], ".npy"),
            (["embed", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npy"), "--model", checkpoint], "no images"),
            (["embed", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npy")], "not a folder"),
        ]
        for argv, fragment in cases:
            assert main(argv) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and fragment in err[0]


class TestCompare:
    def test_demo_checkpoint(self, runs):
        result = runs[0]["compare"]
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == ""
        assert "verdict: PASS" in result.stdout
        for fragment in ("state dict: 88 keys in both, 0 only ours", "weights: max |ours - transformers| = 0"):
            assert fragment in result.stdout
        for output in ("image features", "text features", "logits_per_image"):
            assert output in result.stdout

    def test_fixed_resolution_without_tokenizer(self, siglip_checkpoint, capsys):
        """A checkpoint without tokenizer files is compared on random ids; fixed-resolution path."""
        assert main(["compare", "--model", str(siglip_checkpoint)]) == 0
        out = capsys.readouterr().out
        assert "random id sequences" in out and "verdict: PASS" in out

    def test_failed_parity_exits_nonzero(self, siglip2_checkpoint, capsys):
        assert main(["compare", "--model", str(siglip2_checkpoint), "--atol", "-1"]) == 1
        assert "verdict: FAIL" in capsys.readouterr().out

    def test_unknown_model_in_process(self, capsys):
        assert main(["compare", "--model", "nobody/no-such-siglip"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "compare: error:" in err[0] and "nobody/no-such-siglip" in err[0]


class TestCommandLine:
    def test_bad_command_line_in_process(self, capsys):
        assert main(["classify", "x.png"]) == 2  # no --labels
        assert main([]) == 2  # no command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("error:" in line and "--help" in line for line in err)

    def test_help(self, capsys):
        assert main(["--help"]) == 0
        out = capsys.readouterr().out
        for command in ("classify", "embed", "compare", "demo"):
            assert command in out
