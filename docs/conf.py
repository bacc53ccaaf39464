"""Sphinx configuration of the kornia_siglip2 documentation (``make docs``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package without installing it (the Makefile installs it anyway)

import kornia_siglip2  # noqa: E402

project = "kornia_siglip2"
author = "kornia_siglip2 developers"
copyright = "kornia_siglip2 developers, Apache-2.0"
release = kornia_siglip2.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "make_figures.py"]
# pages of other engineers that are only ever included into another page, never built on their own
exclude_patterns += ["benchmarks_table.md"]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google docstrings (Kornia's style): Args / Returns / Raises / Example
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as :ivar:, so autodoc members do not duplicate them
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_mock_imports: list[str] = []
autoclass_content = "class"

# Furo, the theme of Kornia's own documentation: a fluid content column, wide code blocks and tables that scroll
# instead of being cut; docs/_static/custom.css widens the column for the benchmark tables
html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = f"kornia_siglip2 {release}"
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
    "top_of_page_buttons": [],
}
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# Doctests are run by pytest, not by `sphinx-build -b doctest`: `--doctest-modules` runs every docstring
# example of the package (`make test`), and tests/test_docs.py runs the `>>>` examples of the guide pages.


def _data_docstring_from_defining_module(app, what, name, obj, options, lines):
    """Give a re-exported constant the ``#:`` comment of the module that defines it.

    autodoc reads ``#:`` comments only in the module a name is documented from; for
    ``kornia_siglip2.losses.DISTRIBUTED_MODES`` that is ``losses/__init__.py``, which has none, and autodoc then
    shows the docstring of ``tuple`` or ``dict``. Look the comment up where the constant is defined instead.
    """

    def words(text: str) -> list[str]:
        return text.split()

    if what != "data" or (lines and words("\n".join(lines)) != words(type(obj).__doc__ or "")):
        return
    from sphinx.pycode import ModuleAnalyzer

    attribute = name.rsplit(".", 1)[-1]
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("kornia_siglip2") or getattr(module, attribute, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attribute))
        except Exception:  # a module without source: keep looking
            continue
        if comment:
            lines[:] = list(comment)
            return
    lines.clear()  # no comment anywhere: better nothing than the docstring of the builtin type


#: Written by ``python -m benchmarks.report`` after ``make bench``, not by this build; until a benchmark run has
#: written them, the benchmarks page says so instead of failing ``sphinx-build -W``.
BENCHMARK_OUTPUTS = ("benchmarks_table.md", "_static/bench_throughput.png")
_NOT_YET = (
    "```{{note}}\nNo benchmark {what} yet: run `make bench`, then "
    "`python -m benchmarks.report benchmarks/results/latest.json`.\n```"
)


def _tolerate_missing_benchmark_outputs(app, docname, source):
    """Replace the include / image of a benchmark output that does not exist yet by a note."""
    if docname != "benchmarks":
        return
    text = source[0]
    if not (DOCS / BENCHMARK_OUTPUTS[0]).is_file():
        text = text.replace(
            "```{include} benchmarks_table.md\n```", "# Encoder benchmarks\n\n" + _NOT_YET.format(what="results")
        )
    if not (DOCS / BENCHMARK_OUTPUTS[1]).is_file():
        text = re.sub(
            r"```\{image\} _static/bench_throughput\.png\n(?::[^\n]*\n)*```", _NOT_YET.format(what="plot"), text
        )
    source[0] = text


def setup(app):
    """Register the docstring fix-up and the benchmark placeholder above."""
    app.connect("autodoc-process-docstring", _data_docstring_from_defining_module)
    app.connect("source-read", _tolerate_missing_benchmark_outputs)
