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
