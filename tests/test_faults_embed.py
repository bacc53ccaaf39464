"""``embed`` under faults, part 2 (issue 29): provenance of kept chunks, verified merge, hostile folders, locks.

Each case failed on main: a resume after the model folder got new weights kept the old model's chunks; a chunk
replaced by a copy of another or cut short merged silently; two folders linked to each other listed 82 rows for
2 images; a FIFO named ``*.png`` hung; a non-UTF-8 name crashed even with ``--skip-errors``; an all-unreadable
folder wrote shape (0, 0); dangling links and loops read "permission denied"; a damaged chunk or parts manifest
gave a message naming no file; two identical commands at once crashed one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kornia_siglip2 import _embed as embed
from kornia_siglip2._demo import build_tiny_checkpoint, write_shape_images
from kornia_siglip2.cli import main

WIDTH = 64  # the tiny checkpoint's vision width


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), patch_size=8, max_num_patches=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_shape_images(root)
    (root / "second").mkdir()
    for path in sorted(root.glob("*.png"))[:2]:
        shutil.copy(path, root / "second" / path.name)
    return root  # 6 images


def run_embed(*args):
    return main(["embed", *map(str, args), "--workers", "0", "--no-progress"])


def read(path):
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor("image_embeds"), handle.metadata()


def _rank(folder, out, checkpoint, rank, chunk_size=1, world_size=2):
    return run_embed(
        folder, "--out", out, "--model", checkpoint, "--chunk-size", chunk_size, "--world-size", world_size,
        "--rank", rank,
    )  # fmt: skip


class TestProvenance:
    def test_resume_after_the_model_changed_refuses(self, images, tmp_path, capsys):
        """Main: resumed with the old model's chunks; 48 of 200 rows came from the old weights, unmarked."""
        model = build_tiny_checkpoint(tmp_path / "model", patch_size=8, max_num_patches=64, seed=0)
        out = tmp_path / "e.safetensors"
        assert _rank(images, out, model, 0) == 0  # rank 0's chunks kept, no output yet
        assert not out.exists()
        capsys.readouterr()
        build_tiny_checkpoint(tmp_path / "model", patch_size=8, max_num_patches=64, seed=1)  # new weights
        assert _rank(images, out, model, 1) == 1
        err = capsys.readouterr().err
        assert "model's weight or config files" in err and "model_sha256" in err and str(out) in err
        assert not out.exists()

    def test_chunk_replaced_by_a_copy_of_another_is_named(self, checkpoint, images, tmp_path, capsys):
        """Main: 6 rows merged with one image twice and one missing, exit 0."""
        out = tmp_path / "e.safetensors"
        assert _rank(images, out, checkpoint, 0) == 0
        parts = tmp_path / "e.safetensors.parts"
        shutil.copy(parts / "chunk-000000.safetensors", parts / "chunk-000002.safetensors")
        capsys.readouterr()
        assert _rank(images, out, checkpoint, 1) == 1
        err = capsys.readouterr().err
        assert "chunk-000002.safetensors" in err and "copied" in err
        assert not out.exists()

    def test_chunk_cut_short_is_named(self, checkpoint, images, tmp_path, capsys):
        """Main: a chunk rewritten with fewer rows merged silently (images missing, exit 0)."""
        out = tmp_path / "e.safetensors"
        assert _rank(images, out, checkpoint, 0, chunk_size=2) == 0
        chunk = tmp_path / "e.safetensors.parts" / "chunk-000002.safetensors"
        embeddings, metadata = read(chunk)
        with safe_open(chunk, framework="pt") as handle:
            rows = handle.get_tensor("rows")
        save_file({"image_embeds": embeddings[:1].contiguous(), "rows": rows[:1].contiguous()}, chunk, metadata)
        capsys.readouterr()
        assert _rank(images, out, checkpoint, 1, chunk_size=2) == 1
        err = capsys.readouterr().err
        assert str(chunk) in err and "do not cover" in err

    def test_damaged_chunk_named_on_resume(self, checkpoint, images, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        assert _rank(images, out, checkpoint, 0) == 0
        chunk = tmp_path / "e.safetensors.parts" / "chunk-000000.safetensors"
        chunk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
        capsys.readouterr()
        assert _rank(images, out, checkpoint, 0) == 1
        err = capsys.readouterr().err
        assert str(chunk) in err and "damaged" in err

    def test_damaged_parts_manifest_named(self, checkpoint, images, tmp_path, capsys):
        out = tmp_path / "e.safetensors"
        parts = tmp_path / "e.safetensors.parts"
        parts.mkdir()
        (parts / "manifest.json").write_text('{"version": 2, "num_fi')
        assert run_embed(images, "--out", out, "--model", checkpoint) == 1
        err = capsys.readouterr().err
        assert str(parts / "manifest.json") in err and "Traceback" not in err

    def test_chunks_record_their_provenance(self, checkpoint, images, tmp_path):
        out = tmp_path / "e.safetensors"
        assert _rank(images, out, checkpoint, 0, chunk_size=4) == 0
        parts = tmp_path / "e.safetensors.parts"
        manifest = json.loads((parts / "manifest.json").read_text())
        assert manifest["model_sha256"] == embed.model_fingerprint(checkpoint) and manifest["width"] == WIDTH
        _, metadata = read(parts / "chunk-000000.safetensors")
        assert metadata["chunk"] == "0" and len(metadata["run"]) == len(metadata["files_sha256"]) == 64


class TestHostileFolders:
    def test_folders_linked_to_each_other_listed_once(self, tmp_path):
        """Main: a/ -> b and b/ -> a linked to each other gave 82 rows for 2 images."""
        root = tmp_path / "photos"
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            (root / name / f"{name}.png").write_bytes(b"")
        os.symlink(root / "b", root / "a" / "to_b")
        os.symlink(root / "a", root / "b" / "to_a")
        listing = embed.list_images(root)
        assert len(listing.files) == 2
        assert {Path(name).name for name in listing.files} == {"a.png", "b.png"}
        assert listing.duplicates  # the second names are recorded, not dropped silently

    def test_file_linked_twice_is_one_row(self, tmp_path):
        (tmp_path / "x.png").write_bytes(b"")
        os.symlink(tmp_path / "x.png", tmp_path / "y.png")
        listing = embed.list_images(tmp_path)
        assert listing.files == ["x.png"] and listing.duplicates == [{"file": "y.png", "same_as": "x.png"}]

    def test_dangling_link_and_self_loop_have_their_reason(self, tmp_path):
        """Main: both were recorded as 'permission denied'."""
        (tmp_path / "ok.png").write_bytes(b"")
        os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
        os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
        listing = embed.list_images(tmp_path, skip_errors=True)
        reasons = {entry["file"]: entry["error"] for entry in listing.skipped}
        assert listing.files == ["ok.png"]
        assert "dangling" in reasons["dangling.png"] and "loop" in reasons["loop.png"]
        with pytest.raises(OSError, match=r"(dangling|loop)\.png: (dangling symbolic link|symbolic link loop)"):
            embed.list_images(tmp_path)

    def test_fifo_is_never_opened(self, checkpoint, images, tmp_path):
        """Main: a FIFO named *.png made embed wait forever. Run as a process with a timeout."""
        root = tmp_path / "photos"
        shutil.copytree(images, root)
        os.mkfifo(root / "pipe.png")
        command = [sys.executable, "-m", "kornia_siglip2", "embed", str(root), "--model", str(checkpoint)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        refused = subprocess.run(
            [*command, "--out", str(tmp_path / "a.safetensors"), "--workers", "0"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert refused.returncode == 1 and "pipe.png" in refused.stderr and "FIFO" in refused.stderr
        skipped = subprocess.run(
            [*command, "--out", str(tmp_path / "b.safetensors"), "--workers", "0", "--skip-errors", "--no-progress"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert skipped.returncode == 3, skipped.stderr
        embeddings, metadata = read(tmp_path / "b.safetensors")
        assert embeddings.shape == (6, WIDTH)
        assert json.loads(metadata["skipped"])[0]["file"] == "pipe.png"

    def test_non_utf8_name_is_embedded_and_recorded_escaped(self, checkpoint, images, tmp_path, capsys):
        """Main: a file name that is not UTF-8 crashed the run, even with --skip-errors."""
        root = tmp_path / "photos"
        shutil.copytree(images, root)
        source = next(root.glob("*.png"))
        os.rename(source, os.path.join(os.fsencode(root), b"caf\xe9.png"))
        for flags in ([], ["--skip-errors"]):
            out = tmp_path / f"e{len(flags)}.safetensors"
            assert run_embed(root, "--out", out, "--model", checkpoint, *flags) == 0, capsys.readouterr().err
            embeddings, metadata = read(out)
            files = json.loads(metadata["files"])
            assert "caf\\xe9.png" in files and embeddings.shape == (6, WIDTH)

    def test_all_unreadable_keeps_the_width(self, checkpoint, tmp_path, capsys):
        """Main: every image unreadable gave image_embeds of shape (0, 0)."""
        root = tmp_path / "broken"
        root.mkdir()
        for name in ("a.png", "b.jpg"):
            (root / name).write_bytes(b"not an image")
        for suffix in (".safetensors", ".npy"):
            out = tmp_path / f"e{suffix}"
            assert run_embed(root, "--out", out, "--model", checkpoint, "--skip-errors") == 3
            if suffix == ".safetensors":
                assert read(out)[0].shape == (0, WIDTH)
            else:
                import numpy as np

                assert np.load(out).shape == (0, WIDTH)
        assert "dimension 64" in capsys.readouterr().out


def test_second_identical_command_is_refused(checkpoint, images, tmp_path, capsys):
    """Main: two identical commands at once: one merged and removed the parts, the other crashed."""
    import fcntl

    out = tmp_path / "e.safetensors"
    parts = tmp_path / "e.safetensors.parts"
    parts.mkdir()
    with open(parts / ".rank-0.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first command, still running
        assert run_embed(images, "--out", out, "--model", checkpoint) == 1
    err = capsys.readouterr().err
    assert "another embed process" in err and str(parts) in err
    assert run_embed(images, "--out", out, "--model", checkpoint) == 0  # once it is done, the command runs
    assert read(out)[0].shape == (6, WIDTH) and not parts.exists()


def test_model_fingerprint_sees_new_weights_of_the_same_shapes(tmp_path):
    """A large weight file is fingerprinted by header and sampled blocks: retrained weights change it, cheaply."""
    import time

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    generator = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(3, 4_000_000, generator=generator)}, folder / "model.safetensors")  # 48 MB
    start = time.perf_counter()
    before = embed.model_fingerprint(folder)
    assert time.perf_counter() - start < 2.0
    assert embed.model_fingerprint(folder) == before
    save_file({"w": torch.randn(3, 4_000_000, generator=generator)}, folder / "model.safetensors")
    assert embed.model_fingerprint(folder) != before


def test_two_identical_commands_at_once_never_crash(checkpoint, images, tmp_path):
    """Two real processes on one --out: each either writes the output or is refused by the lock; none crashes."""
    out = tmp_path / "e.safetensors"
    command = [sys.executable, "-m", "kornia_siglip2", "embed", str(images), "--out", str(out)]
    command += ["--model", str(checkpoint), "--chunk-size", "1", "--workers", "0", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [(process.wait(timeout=300), *process.communicate(timeout=60)) for process in processes]
    for code, _, err in results:
        assert code == 0 or (code == 1 and "another embed process" in err), err
    assert any(code == 0 for code, _, _ in results)
    embeddings, metadata = read(out)
    assert embeddings.shape == (6, WIDTH) and len(json.loads(metadata["files"])) == 6
