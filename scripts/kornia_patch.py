"""Render kornia_siglip2 into Kornia's layout and conventions: ``build/kornia_patch/kornia/models/siglip2/``.

What the rendering does, file by file (``MODULE_MAP``):

- moves each module to its place in ``kornia/models/siglip2/`` (Kornia's own names where Kornia 0.9 has a
  counterpart: ``vision.py`` -> ``vision_encoder.py``, ``text.py`` -> ``text_encoder.py``, ``preprocess.py`` ->
  ``preprocessor.py``, ``hub.py`` -> ``builder.py``);
- prepends Kornia's Apache-2.0 license header (the one its ``add-license-header`` pre-commit hook manages);
- rewrites every ``kornia_siglip2`` reference (imports, docstrings, doctests, cross-references) to
  ``kornia.models.siglip2`` with the renamed modules, so ``kornia_siglip2.vision.X`` becomes
  ``kornia.models.siglip2.vision_encoder.X``;
- drops the package's own ``__version__`` (Kornia has one version);
- leaves the code itself alone: ``KORNIA_CHECK`` / ``KORNIA_CHECK_SHAPE`` calls, shapes in docstrings and
  doctests stay as they are;
- re-sorts imports (isort, ``I001``) and formats with ruff under ``scripts/kornia_ruff.toml`` (Kornia's
  pre-commit runs ``ruff --fix`` and ``ruff format`` too: ``kornia`` is first-party there, which moves the
  rewritten imports into one block).

Not rendered: ``cli.py``, ``__main__.py`` (Kornia has no per-model command line) and ``_demo.py`` (tiny
checkpoints written with transformers, for the demo and tests). ``UPSTREAM_NOTES.md`` in the output lists
what still needs a human: imports outside torch / kornia / the standard library (Kornia allows only
PyTorch), doctests that use an unrendered module, and the ``REFERENCE n`` citations of this project's notes.

Usage: ``python scripts/kornia_patch.py [--out build/kornia_patch] [--ruff PATH]``; then
``ruff check --config scripts/kornia_ruff.toml build/kornia_patch`` passes.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EXCLUDED", "LICENSE_HEADER", "MODULE_MAP", "PatchReport", "main", "render"]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kornia_siglip2"
RUFF_CONFIG = Path(__file__).resolve().parent / "kornia_ruff.toml"
TARGET_PACKAGE = "kornia.models.siglip2"
TARGET_DIR = Path("kornia", "models", "siglip2")

#: The header Kornia's ``add-license-header`` pre-commit hook keeps on every Python file (from kornia 0.9).
LICENSE_HEADER = """\
# LICENSE HEADER MANAGED BY add-license-header
#
# Copyright 2018 Kornia Team
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#

"""

#: Our module (relative to ``kornia_siglip2/``) -> its file in ``kornia/models/siglip2/``. Sub-packages
#: (``losses/``) keep their layout.
MODULE_MAP = {
    "__init__.py": "__init__.py",
    "config.py": "config.py",
    "packing.py": "packing.py",
    "attention.py": "attention.py",
    "layers.py": "layers.py",
    "vision.py": "vision_encoder.py",
    "text.py": "text_encoder.py",
    "model.py": "model.py",
    "hub.py": "builder.py",
    "preprocess.py": "preprocessor.py",
    "resample.py": "resample.py",
    "tokenizer.py": "tokenizer.py",
    "zero_shot.py": "zero_shot.py",
    "lens.py": "lens.py",
}

#: Modules left out of the patch, with the reason.
EXCLUDED = {
    "cli.py": "command line; Kornia has no per-model CLI",
    "__main__.py": "entry point of the command line",
    "_demo.py": "tiny checkpoints built with transformers, for the demo and the tests",
    "demo.py": "public face of _demo.py (offline example assets)",
    "_embed.py": "the command line's folder-embedding machinery (workers, chunks, ranks)",
}

_ALLOWED_ROOTS = {"torch", "kornia", "__future__"}


@dataclass
class PatchReport:
    """What :func:`render` wrote and what it leaves to a human."""

    files: list[Path] = field(default_factory=list)
    third_party: dict[str, set[str]] = field(default_factory=dict)
    unrendered_uses: dict[str, set[str]] = field(default_factory=dict)
    citations: dict[str, int] = field(default_factory=dict)


def _target(relative: Path) -> Path:
    if len(relative.parts) == 1:
        return Path(MODULE_MAP[relative.name])
    return relative  # sub-packages keep their layout


def _module_renames() -> list[tuple[str, str]]:
    """``kornia_siglip2.<module>`` -> ``kornia.models.siglip2.<new module>`` for every renamed module."""
    renames = []
    for source, target in MODULE_MAP.items():
        old, new = source.removesuffix(".py"), target.removesuffix(".py")
        if old != new and old != "__init__":
            renames.append((f"kornia_siglip2.{old}", f"{TARGET_PACKAGE}.{new}"))
    return renames


def _exported_names() -> set[str]:
    """Names the package ``__init__`` exports: cross-references to them can use the package path."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {element.value for element in node.value.elts if isinstance(element, ast.Constant)}
    return set()


def rewrite(text: str, exported: set[str] = frozenset()) -> str:
    """Rewrite every ``kornia_siglip2`` reference of a module's source to ``kornia.models.siglip2``.

    A Sphinx cross-reference ``~kornia_siglip2.<module>.<Name>`` to a name the package exports becomes
    ``~kornia.models.siglip2.<Name>``: the same length, where the full new path would push lines past 120.
    """
    if exported:
        names = "|".join(sorted(map(re.escape, exported), key=len, reverse=True))
        text = re.sub(rf"~kornia_siglip2\.[a-z_]+\.({names})\b", rf"~{TARGET_PACKAGE}.\1", text)
    # the optional-dependency hint names our extra; in Kornia it names the packages
    text = text.replace("'kornia_siglip2[text]'", "transformers sentencepiece tokenizers protobuf")
    for old, new in _module_renames():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    text = re.sub(r"\bkornia_siglip2\b", TARGET_PACKAGE, text)
    # the sub-package has no version of its own
    text = re.sub(r'^__version__ = ".*"\n', "", text, flags=re.MULTILINE)
    return re.sub(r'^\s*"__version__",\n', "", text, flags=re.MULTILINE)


def raw_docstrings(source: str) -> str:
    r"""Write docstrings that contain a backslash as raw strings (Kornia's ``D301``), with the same value.

    The docstring's value as ``ast`` reads it (``\\math`` in the source text reads ``\math``) is written back
    between raw triple quotes: exact unless the value holds triple quotes or ends in a backslash, and such a
    docstring is left as it is.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        literal = node.body[0].value
        if not (isinstance(literal, ast.Constant) and isinstance(literal.value, str)):
            continue
        value = literal.value
        start = offsets[literal.lineno - 1] + literal.col_offset
        end = offsets[literal.end_lineno - 1] + literal.end_col_offset
        original = source[start:end]
        if "\\" not in original or original[:1] in "rR" or '"""' in value or value.endswith("\\"):
            continue
        edits.append((start, end, f'r"""{value}"""'))
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    return source


def _stdlib() -> set[str]:
    return set(sys.stdlib_module_names)


def _scan(path: Path, source: str, report: PatchReport) -> None:
    """Record, in a rendered module, third-party imports, uses of unrendered modules and REFERENCE citations."""
    name = path.as_posix()
    stdlib = _stdlib()
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        for module in modules:
            root = module.split(".")[0]
            if root not in _ALLOWED_ROOTS and root not in stdlib:
                report.third_party.setdefault(name, set()).add(module)
    for module in EXCLUDED:
        stem = module.removesuffix(".py")
        if re.search(rf"\b{re.escape(TARGET_PACKAGE)}\.{re.escape(stem)}\b", source):
            report.unrendered_uses.setdefault(name, set()).add(stem)
    count = len(re.findall(r"\bREFERENCE \d+", source))
    if count:
        report.citations[name] = count


def _sources() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if "__pycache__" in relative.parts or (len(relative.parts) == 1 and relative.name in EXCLUDED):
            continue
        if len(relative.parts) == 1 and relative.name not in MODULE_MAP:
            raise KeyError(f"kornia_siglip2/{relative} has no place in MODULE_MAP or EXCLUDED: add it to one.")
        files.append(relative)
    return files


def _ruff(ruff: str, arguments: list[str], cwd: Path) -> None:
    subprocess.run([ruff, *arguments], cwd=cwd, check=True, capture_output=True, text=True)


def _notes(report: PatchReport) -> str:
    lines = [
        "# Upstream notes for kornia/models/siglip2",
        "",
        "Generated by `scripts/kornia_patch.py` from kornia_siglip2. What a human still has to do before a PR:",
        "",
        "## Imports outside torch, kornia and the standard library",
        "",
        "Kornia's CONTRIBUTING allows only PyTorch; use `kornia.core.download.download_hf_file` and",
        "`kornia.core.safetensors.load_safetensors` instead of huggingface_hub / safetensors, and keep",
        "transformers (tokenizer) and pillow (image files) optional, imported lazily.",
        "",
    ]
    lines += [f"- `{name}`: {', '.join(sorted(modules))}" for name, modules in sorted(report.third_party.items())]
    lines += ["", "## Doctests or references that use modules not in the patch", ""]
    lines += [
        f"- `{name}`: {', '.join(sorted(modules))} (excluded: {'; '.join(EXCLUDED[m + '.py'] for m in modules)})"
        for name, modules in sorted(report.unrendered_uses.items())
    ]
    lines += ["", "## Citations of this project's REFERENCE notes to replace by public sources", ""]
    lines += [f"- `{name}`: {count}" for name, count in sorted(report.citations.items())]
    lines += ["", "## Not rendered", ""]
    lines += [f"- `kornia_siglip2/{name}`: {why}" for name, why in EXCLUDED.items()]
    return "\n".join(lines) + "\n"


def render(out: str | Path, ruff: str | None = None) -> PatchReport:
    """Write the patch under ``out`` (emptied first) and return what was written.

    Args:
        out: output folder; the modules land in ``out/kornia/models/siglip2/``.
        ruff: the ruff executable (default: the one next to this Python, else ``ruff`` on ``PATH``).

    Returns:
        the written files (relative to ``out``) and the notes of ``UPSTREAM_NOTES.md``.

    Raises:
        KeyError: a new top-level module of the package is neither mapped nor excluded.
        subprocess.CalledProcessError: ruff failed to sort the imports or to format.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    report = PatchReport()
    exported = _exported_names()
    for relative in _sources():
        target = TARGET_DIR / _target(relative)
        source = raw_docstrings(rewrite((PACKAGE / relative).read_text(encoding="utf-8"), exported))
        _scan(target, source, report)
        destination = out / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(LICENSE_HEADER + source, encoding="utf-8")
        report.files.append(target)
    (out / "UPSTREAM_NOTES.md").write_text(_notes(report), encoding="utf-8")
    ruff = ruff or _default_ruff()
    config = ["--config", str(RUFF_CONFIG)]
    # Kornia's pre-commit runs `ruff check --fix` (safe fixes only) before `ruff format`: the same here. On
    # Python 3.11 that turns a self-returning TypeVar into typing.Self (PYI019); the TypeVar left unused is then
    # deleted (PYI018, whose fix ruff marks unsafe only because it deletes code) and its import with it (F401).
    fix = ["check", *config, "--fix", "--exit-zero", "--quiet", str(TARGET_DIR)]
    _ruff(ruff, fix, out)
    _ruff(ruff, [*fix, "--unsafe-fixes", "--select", "PYI018"], out)
    _ruff(ruff, fix, out)
    _ruff(ruff, ["format", *config, "--quiet", str(TARGET_DIR)], out)
    return report


def _default_ruff() -> str:
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.is_file() else (shutil.which("ruff") or "ruff")


def main(argv: list[str] | None = None) -> int:
    """Render the patch and print where it went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "kornia_patch"), help="output folder")
    parser.add_argument("--ruff", default=None, help="ruff executable (default: next to python, else PATH)")
    args = parser.parse_args(argv)
    report = render(args.out, args.ruff)
    print(f"wrote {len(report.files)} files under {Path(args.out) / TARGET_DIR}")
    print(f"notes: {Path(args.out) / 'UPSTREAM_NOTES.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
