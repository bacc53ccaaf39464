"""``embed`` at scale and under faults: row order, metadata, skipped files, resume, several processes, atomic output.

Also the command line's start-up: ``--help`` without torch, Ctrl-C while importing, folders for ``classify``.
"""

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from kornia_siglip2 import _embed as embed
from kornia_siglip2._demo import build_tiny_checkpoint, write_shape_images
from kornia_siglip2.cli import main
from kornia_siglip2.zero_shot import ZeroShotClassifier


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), patch_size=8, max_num_patches=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images in nested folders, names whose sort order differs from the walk order, one noise JPEG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    paths = write_shape_images(root / "b")
    (root / "a" / "z").mkdir(parents=True)
    paths[0].rename(root / "a" / "z" / "first.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(root / "a" / "noise.jpg", quality=90)
    (root / "notes.txt").write_text("not an image")
    return root


def expected_files(root):
    return sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*") if path.suffix.lower() in embed.IMAGE_SUFFIXES
    )


def reference(checkpoint, root, files):
    """Each image alone through the Python API: an independent computation of every row."""
    classifier = ZeroShotClassifier.from_pretrained(checkpoint, load_tokenizer=False)
    return torch.cat([classifier.embed_images([root / name], batch_size=1) for name in files])


def read_safetensors(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor("image_embeds"), handle.metadata()


def run_embed(*args):
    return main(["embed", *map(str, args), "--workers", "0", "--no-progress"])


class TestOutput:
    def test_rows_files_and_metadata(self, checkpoint, folder, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        assert run_embed(folder, "--out", out, "--model", checkpoint, "--batch-size", 2) == 0
        line = capsys.readouterr().out.strip()
        assert "image_embeds" in line and "'files'" in line and "[5, 64]" in line
        embeddings, metadata = read_safetensors(out)
        files = json.loads(metadata["files"])
        assert files == expected_files(folder)  # sorted relative paths: a/noise.jpg, a/z/first.png, b/...
        assert files[0] == "a/noise.jpg" and json.loads(metadata["skipped"]) == []
        assert metadata["row_order"] == embed.ROW_ORDER and metadata["dtype"] == "float32"
        torch.testing.assert_close(embeddings, reference(checkpoint, folder, files), rtol=1e-4, atol=1e-5)
        assert not (tmp_path / "e.safetensors.parts").exists()
        assert sorted(path.name for path in tmp_path.iterdir()) == ["e.safetensors"]  # no temporary files left

    def test_npy_sidecar(self, checkpoint, folder, tmp_path):
        out = tmp_path / "e.npy"
        assert run_embed(folder, "--out", out, "--model", checkpoint) == 0
        array = np.load(out)
        side = json.loads((tmp_path / "e.json").read_text())
        assert side["files"] == expected_files(folder) and side["shape"] == list(array.shape) == [5, 64]
        np.testing.assert_allclose(np.linalg.norm(array, axis=-1), 1.0, rtol=1e-5)

    def test_workers_and_token_budget(self, checkpoint, folder, tmp_path):
        """DataLoader workers and a token budget smaller than one batch give the same rows as one process."""
        one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
        assert run_embed(folder, "--out", one, "--model", checkpoint) == 0
        argv = ["embed", str(folder), "--out", str(many), "--model", str(checkpoint), "--no-progress"]
        assert main([*argv, "--workers", "2", "--max-tokens", "70", "--chunk-size", "2"]) == 0
        (first, meta_one), (second, meta_many) = read_safetensors(one), read_safetensors(many)
        assert meta_one["files"] == meta_many["files"]
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)

    def test_decoders(self, checkpoint, folder, tmp_path):
        """Pillow decoding equals transformers' load_image exactly; kornia-rs JPEGs differ by a few levels only."""
        from transformers.image_utils import load_image as hf_load_image

        path = folder / "a" / "noise.jpg"
        pillow = embed.decode_pillow(path)
        theirs = torch.from_numpy(np.array(hf_load_image(str(path)).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(pillow, theirs)
        fast = embed.decode_kornia_rs(path)
        assert fast.shape == pillow.shape and fast.dtype == torch.uint8
        # another JPEG decoder (chroma upsampling, IDCT): not pixel-exact, close on average; measured mean 0.9 here
        assert 0 < (fast.float() - pillow.float()).abs().mean() < 2
        assert torch.equal(
            embed.decode_kornia_rs(folder / "b" / "blue_square.png"),
            embed.decode_pillow(folder / "b" / "blue_square.png"),
        )

    def test_draft_decoder(self, checkpoint, tmp_path):
        """pillow-draft: a reduced decode of large JPEGs, the same grid, pixels within a few levels.

        Reference: Pillow's full decode + ``Image.resize`` (what transformers' processor does), then the same
        patchify; the draft path must give the grid of the full image (not of the reduced decode).
        """
        from PIL import Image

        classifier = ZeroShotClassifier.from_pretrained(checkpoint, load_tokenizer=False)
        preprocessor = classifier.preprocessor
        rng = np.random.default_rng(3)
        small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
        for index, (height, width) in enumerate(((1203, 1601), (700, 333))):
            smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16)
            photo = np.clip(smooth + rng.normal(0, 5, (height, width, 1)), 0, 255).astype(np.uint8)
            path = tmp_path / f"photo{index}.jpg"
            Image.fromarray(photo).save(path, quality=90)
            pixels, source = embed.decode_pillow_draft(path, lambda h, w: embed.target_size(preprocessor, h, w))
            assert source == (height, width)
            target = embed.target_size(preprocessor, height, width)
            # the reduced decode really is reduced, and still >= 2x the target on both sides
            assert pixels.shape[-2] < height and pixels.shape[-1] < width
            assert pixels.shape[-2] >= 2 * target[0] and pixels.shape[-1] >= 2 * target[1]
            draft = embed.preprocess_with_pillow(preprocessor, pixels, source)
            with Image.open(path) as opened:
                full = np.asarray(opened.convert("RGB").resize(target[::-1], Image.Resampling.BICUBIC, None))
            exact = preprocessor([torch.from_numpy(full.copy()).permute(2, 0, 1)])
            assert torch.equal(draft.grid_thw, exact.grid_thw)
            levels = (draft.patches - exact.patches).abs() * 255 / 2  # normalized with mean = std = 0.5
            # measured 1.66 / 11 levels (mean / max) at a 21x reduction of this noisy image, 0.2 / 6 on photos
            assert levels.mean() < 2.5 and levels.max() < 20, (levels.mean(), levels.max())
            assert levels.max() > 0  # not the full decode in disguise
        # a PNG and a JPEG too small to reduce: the full decode, exactly
        png = tmp_path / "small.png"
        Image.fromarray(small).save(png)
        for path in (png, tmp_path / "photo1.jpg"):
            pixels, _ = embed.decode_pillow_draft(path, lambda h, w: (h, w))
            assert torch.equal(pixels, embed.decode_pillow(path))

    def test_unknown_decoder(self, folder):
        with pytest.raises(ValueError, match="decoder must be one of pillow, kornia-rs, pillow-draft, got 'pilow'"):
            embed._Images(folder, [], [], None, "pilow")

    def test_draft_decoder_command(self, checkpoint, folder, tmp_path):
        exact, draft = tmp_path / "exact.safetensors", tmp_path / "draft.safetensors"
        assert run_embed(folder, "--out", exact, "--model", checkpoint) == 0
        assert run_embed(folder, "--out", draft, "--model", checkpoint, "--decoder", "pillow-draft") == 0
        (first, meta_exact), (second, meta_draft) = read_safetensors(exact), read_safetensors(draft)
        assert meta_exact["files"] == meta_draft["files"]
        # the test images are too small to reduce: the same rows
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)

    def test_auto_dtype(self, monkeypatch):
        monkeypatch.setattr(embed, "cpu_has_native_bf16", lambda: True)
        assert embed.auto_dtype(torch.device("cpu")) == torch.bfloat16
        monkeypatch.setattr(embed, "cpu_has_native_bf16", lambda: False)
        assert embed.auto_dtype(torch.device("cpu")) == torch.float32


class TestFaults:
    @pytest.fixture
    def broken(self, folder, tmp_path):
        import shutil

        root = tmp_path / "photos"
        shutil.copytree(folder, root)
        (root / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return root

    def test_corrupt_file_is_an_error(self, checkpoint, broken, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        assert run_embed(broken, "--out", out, "--model", checkpoint, "--chunk-size", 2) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "corrupt.png" in err[0] and "--skip-errors" in err[0]
        assert not out.exists()
        assert list((tmp_path / "e.safetensors.parts").glob("chunk-*"))  # the chunks before the bad file are kept

    def test_skip_errors(self, checkpoint, broken, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        assert run_embed(broken, "--out", out, "--model", checkpoint, "--skip-errors") == 3
        err = capsys.readouterr().err
        assert "skipped b/corrupt.png" in err and "--allow-skipped" in err and "Traceback" not in err
        embeddings, metadata = read_safetensors(out)
        assert [entry["file"] for entry in json.loads(metadata["skipped"])] == ["b/corrupt.png"]
        files = json.loads(metadata["files"])
        assert files == [name for name in expected_files(broken) if name != "b/corrupt.png"]
        assert embeddings.shape == (len(files), 64)
        assert run_embed(broken, "--out", out, "--model", checkpoint, "--skip-errors", "--allow-skipped") == 0

    def test_unreadable_folder(self, checkpoint, folder, tmp_path, monkeypatch, capsys):
        """os.walk's errors are not swallowed (as root, chmod cannot make a folder unreadable: simulate it)."""
        real_scandir = os.scandir

        def scandir(path="."):
            if str(path).endswith(os.sep + "z"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
        out = tmp_path / "e.safetensors"
        assert run_embed(folder, "--out", out, "--model", checkpoint) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot read folder" in err[0] and "a/z" in err[0] and "--skip-errors" in err[0]
        assert run_embed(folder, "--out", out, "--model", checkpoint, "--skip-errors") == 3
        _, metadata = read_safetensors(out)
        assert json.loads(metadata["skipped"])[0]["file"] == "a/z/"
        assert "a/z/first.png" not in json.loads(metadata["files"])

    def test_bad_out_fails_before_compute(self, folder, tmp_path, capsys):
        """A model that does not exist is never reached: the output is checked first."""
        (tmp_path / "dir.npy").mkdir()
        (tmp_path / "file").write_text("")
        for out, fragment in [
            (tmp_path / "dir.npy", "is a folder"),
            (tmp_path / "file" / "e.npy", "cannot be written"),
        ]:
            assert run_embed(folder, "--out", out, "--model", tmp_path / "no-model") == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and fragment in err[0] and str(out) in err[0]

    def test_interrupt_then_resume(self, checkpoint, folder, tmp_path, monkeypatch, capsys):
        out = tmp_path / "e.safetensors"
        real_encode, calls = embed._encode, []

        def interrupted(*args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_encode(*args)

        monkeypatch.setattr(embed, "_encode", interrupted)
        assert run_embed(folder, "--out", out, "--model", checkpoint, "--chunk-size", 1) == 130
        assert "rerun the same command to resume" in capsys.readouterr().err
        kept = sorted((tmp_path / "e.safetensors.parts").glob("chunk-*"))
        assert len(kept) == 2 and not out.exists()
        monkeypatch.setattr(embed, "_encode", real_encode)
        assert run_embed(folder, "--out", out, "--model", checkpoint, "--chunk-size", 1) == 0
        assert "2 chunk(s) resumed" in capsys.readouterr().out
        embeddings, metadata = read_safetensors(out)
        files = json.loads(metadata["files"])
        torch.testing.assert_close(embeddings, reference(checkpoint, folder, files), rtol=1e-4, atol=1e-5)

    def test_resume_refuses_another_job(self, checkpoint, folder, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        parts = tmp_path / "e.safetensors.parts"
        parts.mkdir()
        (parts / "manifest.json").write_text(json.dumps({"version": 1, "num_files": 99}))
        assert run_embed(folder, "--out", out, "--model", checkpoint) == 1
        err = capsys.readouterr().err
        assert "different run" in err and "num_files" in err

    def test_failed_write_keeps_previous_output(self, checkpoint, folder, tmp_path, monkeypatch, capsys):
        out = tmp_path / "e.safetensors"
        assert run_embed(folder, "--out", out, "--model", checkpoint) == 0
        before = out.read_bytes()

        def full_disk(tensors, filename, metadata=None):
            with open(filename, "wb") as handle:
                handle.write(b"half")
            raise OSError(28, "No space left on device")

        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
        assert run_embed(folder, "--out", out, "--model", checkpoint) == 1
        assert "No space left" in capsys.readouterr().err
        assert out.read_bytes() == before
        assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_two_processes_equal_one(checkpoint, folder, tmp_path):
    """Two ranks (separate processes, sharing the output folder) write the same file as one process."""
    one = tmp_path / "one.safetensors"
    assert run_embed(folder, "--out", one, "--model", checkpoint, "--chunk-size", 2) == 0
    two = tmp_path / "two.safetensors"
    common = ["embed", folder, "--out", two, "--model", checkpoint, "--chunk-size", 2, "--world-size", 2]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "kornia_siglip2", *map(str, common), "--rank", str(rank), "--workers", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert sum("wrote 5 embeddings" in stdout for stdout, _ in outputs) == 1  # exactly one rank merged
    (first, meta_one), (second, meta_two) = read_safetensors(one), read_safetensors(two)
    assert json.loads(meta_one["files"]) == json.loads(meta_two["files"]) == expected_files(folder)
    torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two.safetensors.parts").exists()


class TestStartup:
    def test_help_without_torch(self):
        code = (
            "import runpy, sys\n"
            "sys.argv = ['kornia_siglip2', '--help']\n"
            "try:\n    runpy.run_module('kornia_siglip2', run_name='__main__')\n"
            "except SystemExit as stop:\n    assert stop.code in (0, None)\n"
            "print('TORCH', 'torch' in sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert "classify" in result.stdout and "TORCH False" in result.stdout

    def test_ctrl_c_while_importing(self, monkeypatch, capsys):
        import builtins

        real_import = builtins.__import__

        def interrupted(name, *args, **kwargs):
            if name == "kornia_siglip2.cli":
                raise KeyboardInterrupt
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", interrupted)
        with pytest.raises(SystemExit) as stop:
            runpy.run_module("kornia_siglip2", run_name="__main__")
        assert stop.value.code == 130
        assert capsys.readouterr().err.strip() == "kornia-siglip2: interrupted"

    def test_classify_folder(self, checkpoint, folder, capsys):
        assert main(["classify", str(folder / "b"), "--labels", "cat", "--model", str(checkpoint)]) == 0
        rows = capsys.readouterr().out.strip().splitlines()[2:]
        assert [row.split()[0] for row in rows] == [str(folder / "b" / name) for name in expected_files(folder / "b")]

    def test_classify_missing(self, tmp_path, capsys):
        assert main(["classify", str(tmp_path / "nothing"), "--labels", "cat"]) == 1
        assert "no such image file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["naflex", "naflex_bicubic", "fixed"])
def test_pillow_shortcut_is_bit_exact(kind):
    """The workers resize with Pillow itself: the same tensors as the preprocessor's Pillow replay."""
    from kornia_siglip2.preprocess import NaFlexImagePreprocessor, SigLipImagePreprocessor

    preprocessor = {
        "naflex": NaFlexImagePreprocessor(16, 256),
        "naflex_bicubic": NaFlexImagePreprocessor(8, 64, resample="bicubic"),
        "fixed": SigLipImagePreprocessor(32),
    }[kind]
    generator = torch.Generator().manual_seed(0)
    for height, width in [(480, 640), (1000, 100), (37, 91), (32, 32), (7, 300)]:
        pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        fast, reference = embed.preprocess_with_pillow(preprocessor, pixels), preprocessor([pixels])
        if kind == "fixed":
            assert torch.equal(fast, reference), (height, width)
        else:
            assert torch.equal(fast.patches, reference.patches) and torch.equal(fast.grid_thw, reference.grid_thw)
    assert embed.preprocess_with_pillow(preprocessor, torch.rand(3, 20, 20)) is None  # float: the tensor path
