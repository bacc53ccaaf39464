"""Write the lock file ``.ci/constraints.txt`` from ``pip freeze`` of a fresh venv (``make lock``).

Usage::

    python scripts/write_lock.py FREEZE_OUTPUT > .ci/constraints.txt

Drops the project's own editable line and writes torch without its local build label (``2.13.0+cpu`` ->
``2.13.0``), so the pin holds for the CPU and the CUDA builds that ``TORCH_SPEC`` picks; pins pip too.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

__all__ = ["main"]

HEADER = """\
# The lock file: every package `make install`, `make docs` and `make wheel` install, at the versions the suite
# passed on. Used as `pip install -c .ci/constraints.txt ...` by the Makefile and .ci/run.
# Regenerate with `make lock` (a fresh venv, newest releases, `pip freeze`), then run `make test`.
# A new dependency: add it to pyproject.toml and pin it here (keep the list sorted).
# torch: the version only; the build (CPU or CUDA) comes from the Makefile's TORCH_SPEC.
"""


def main(argv: list[str]) -> int:
    """Print the lock file for the ``pip freeze`` output in ``argv[1]``."""
    pins = {"pip": f"pip=={importlib.metadata.version('pip')}"}
    for line in Path(argv[1]).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-") == "kornia-siglip2":
            continue
        pins[name.lower()] = f"{name}=={version.split('+')[0] if name == 'torch' else version}"
    sys.stdout.write(HEADER + "".join(pins[key] + "\n" for key in sorted(pins)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
