"""``embed`` listing under faults (issue 14): nothing under the folder is skipped silently.

The other CLI fault cases of the issue (unreadable folders, --skip-errors listing / metadata / exit status 3,
--out checked before compute, atomic output, resume after an interruption, Ctrl-C while importing) were already
met on main by the redesign and are tested in tests/test_embed_cli.py.
"""

import os

from kornia_siglip2._embed import list_images


def test_symlinked_folders_are_followed(tmp_path):
    """Main: os.walk did not descend into symlinked folders, so their images were left out without a word."""
    root, other = tmp_path / "photos", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    other.mkdir()
    (root / "a" / "x.png").write_bytes(b"")
    (other / "y.jpg").write_bytes(b"")
    os.symlink(other, root / "linked")
    os.symlink(root, root / "a" / "cycle")  # a link to an ancestor: not walked again (it would never end)
    assert list_images(root).files == ["a/x.png", "linked/y.jpg"]


def test_failed_npy_write_keeps_sidecar_and_array_together(tmp_path, monkeypatch):
    """Main replaced the .json sidecar before writing the .npy: a failure then left new metadata on old rows."""
    import numpy as np
    import pytest
    import torch

    from kornia_siglip2._embed import sidecar_path, write_output

    out = tmp_path / "emb.npy"
    write_output(out, torch.zeros(2, 4), {"files": ["a.png", "b.png"]})
    before = out.read_bytes(), sidecar_path(out).read_bytes()

    def full_disk(handle, array):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_output(out, torch.ones(3, 4), {"files": ["a.png", "b.png", "c.png"]})
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.npy"]  # no temporary left
