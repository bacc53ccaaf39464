"""The documentation site: every public name in the API reference, the guide's examples run, pages and figures exist.

``make docs`` builds the site with ``sphinx-build -W``; these checks run in ``make test`` without Sphinx.
"""

from __future__ import annotations

import doctest
import importlib
import re
import tempfile
from pathlib import Path

import pytest

import kornia_siglip2
import kornia_siglip2.losses

DOCS = Path(__file__).resolve().parents[1] / "docs"
PACKAGE = Path(kornia_siglip2.__file__).resolve().parent
API = DOCS / "api.rst"
# one autodoc directive per documented object: ".. autoclass:: kornia_siglip2.SigLip2"
DIRECTIVE = re.compile(r"^\.\. auto(?:class|function|data|module|method|attribute|exception):: (\S+)\s*$", re.M)
# modules that are not API: the command line's entry point and the demo's tiny assets
PRIVATE_MODULES = {"__init__", "__main__", "_demo"}


def _documented() -> set[str]:
    return set(DIRECTIVE.findall(API.read_text(encoding="utf-8")))


def _documented_names() -> set[str]:
    return {target.rsplit(".", 1)[-1] for target in _documented()}


@pytest.mark.parametrize("package", [kornia_siglip2, kornia_siglip2.losses], ids=lambda package: package.__name__)
def test_every_public_name_is_in_the_api_reference(package):
    documented = _documented()
    missing = [name for name in package.__all__ if f"{package.__name__}.{name}" not in documented]
    assert not missing, f"add to docs/api.rst (as `.. autoclass:: {package.__name__}.<name>` etc.): {missing}"


def test_every_public_module_is_in_the_api_reference():
    """A new module (say ``inspect.py``) must get a section; re-exported names count as documented."""
    documented = _documented()
    documented_names = _documented_names()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        if relative.name in PRIVATE_MODULES or any(part.startswith("_") for part in relative.parts):
            continue
        module_name = ".".join(("kornia_siglip2", *relative.parts))
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", [])
        covered = module_name in documented or (names and all(name in documented_names for name in names))
        if not covered:
            undocumented = [name for name in names if name not in documented_names]
            missing.append(f"{module_name} {undocumented}")
    assert not missing, f"document these modules or names in docs/api.rst: {missing}"


def test_api_reference_targets_exist():
    """Every autodoc target imports, so a renamed object fails here and not only in `make docs`."""
    for target in sorted(_documented()):
        module_name, _, attribute = target.rpartition(".")
        try:
            importlib.import_module(target)
            continue
        except ImportError:
            pass
        # a class member ("pkg.Class.method") resolves one level further up
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            parent, _, class_name = module_name.rpartition(".")
            owner = getattr(importlib.import_module(parent), class_name)
        assert hasattr(owner, attribute), target
        assert module_name  # a bare name is not an autodoc target


GUIDE_PAGES = sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.parts and ">>> " in path.read_text())


def test_guide_pages_have_examples():
    names = {path.relative_to(DOCS).as_posix() for path in GUIDE_PAGES}
    assert {"guide/loading.md", "guide/packing.md", "guide/zero_shot.md", "guide/losses.md"} <= names


@pytest.mark.parametrize("page", GUIDE_PAGES, ids=lambda path: path.relative_to(DOCS).as_posix())
def test_guide_examples_run(page, monkeypatch, tmp_path):
    """The ``>>>`` examples of the Markdown pages are doctests (offline: tiny checkpoints)."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() folders land here
    result = doctest.testfile(
        str(page), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {page.name} failed (see above)"


def _toctree_entries() -> list[str]:
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", text, re.S):
        entries += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith(":")]
    return entries


def test_toctree_pages_exist():
    missing = [
        entry for entry in _toctree_entries() if not any((DOCS / f"{entry}{s}").is_file() for s in (".md", ".rst"))
    ]
    assert not missing, f"index.md lists pages that do not exist: {missing}"


# written by `python -m benchmarks.report` after `make bench`; docs/conf.py shows a note until they exist
BENCHMARK_OUTPUTS = ("benchmarks_table.md", "_static/bench_throughput.png")


def test_included_files_and_images_exist():
    pages = [path for path in DOCS.rglob("*.md") if "_build" not in path.parts]
    missing = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"```\{(?:include|image)\} (\S+)", text):
            if target not in BENCHMARK_OUTPUTS and not (page.parent / target).resolve().is_file():
                missing.append(f"{page.relative_to(DOCS)} -> {target}")
    assert not missing, missing


@pytest.mark.parametrize("name", BENCHMARK_OUTPUTS)
def test_benchmark_outputs(name):
    if not (DOCS / name).is_file():
        pytest.skip(f"docs/{name} not generated yet: make bench, then python -m benchmarks.report")
    assert (DOCS / name).stat().st_size > 0


def test_make_figures(tmp_path):
    """The figures are drawn from real package calls and come out deterministic."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    assert make_figures.main(["--out", str(tmp_path / "a")]) == 0
    assert make_figures.main(["--out", str(tmp_path / "b")]) == 0
    for name in ("packing.png", "naflex_resize.png"):
        first, second = (tmp_path / folder / name for folder in ("a", "b"))
        assert first.stat().st_size > 10_000
        assert first.read_bytes() == second.read_bytes(), f"{name} is not deterministic"
