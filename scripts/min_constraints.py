"""Print the constraints of ``make test-min``: every declared lower bound as an exact pin.

Usage::

    python scripts/min_constraints.py pyproject.toml [.ci/constraints.txt] > constraints-min.txt

Each ``name>=X`` of ``[project] dependencies`` and of the ``text`` extra becomes ``name==X`` (torch excepted:
it comes from the Makefile's ``TORCH_SPEC``, the local CPU wheel here). The test runners (pytest,
pytest-benchmark, ruff, hypothesis) keep their pins from the lock file: the run measures the libraries, not the tools.
Everything else (the other ``dev`` tools such as matplotlib and build, every transitive dependency) is left
to pip's resolver, which picks releases compatible with these pins (matplotlib 3.10 for numpy 1.24, ...).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["lower_bounds", "main"]

TOOLS = ("pytest", "pytest-benchmark", "ruff", "hypothesis")
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][A-Za-z0-9.]*)\s*$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _array(text: str, key: str) -> list[str]:
    """The quoted strings of the TOML array ``key = [...]`` (the first one in ``text``)."""
    match = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]\s*$", text, flags=re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"pyproject.toml has no `{key} = [...]` array.")
    return re.findall(r'"([^"]+)"', match.group(1))


def lower_bounds(pyproject: str) -> dict[str, str]:
    """``{name: lower bound}`` of the core dependencies and the ``text`` extra, torch excluded."""
    bounds = {}
    for requirement in _array(pyproject, "dependencies") + _array(pyproject, "text"):
        match = REQUIREMENT.match(requirement)
        if match and _normalize(match.group(1)) != "torch":
            bounds[match.group(1)] = match.group(2)
    return bounds


def main(argv: list[str]) -> int:
    """Write the constraints for ``argv[1]`` (pyproject.toml) and ``argv[2]`` (the lock file) to stdout."""
    pyproject = Path(argv[1]).read_text(encoding="utf-8")
    lock_path = argv[2] if len(argv) > 2 else ".ci/constraints.txt"
    pins = {}
    for line in Path(lock_path).read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[_normalize(name)] = version
    lines = [f"{name}=={version}" for name, version in lower_bounds(pyproject).items()]
    lines += [f"{name}=={pins[name]}" for name in TOOLS if name in pins]
    sys.stdout.write("# make test-min: the declared lower bounds (tools from the lock file)\n")
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
