"""The error contract as documented: every ``Raises:`` entry names a real exception class, and is what is raised."""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from kornia_siglip2 import errors

PACKAGE = Path(__file__).resolve().parents[1] / "kornia_siglip2"
# an entry of a Google-style ``Raises:`` section: ``    ExceptionName: text``
ENTRY = re.compile(r"^\s+([A-Za-z_][\w.]*):")


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _documented(module) -> list[tuple[str, object]]:
    """The module's own functions, classes and their methods that have a docstring."""
    found = []
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            found.append((name, value))
        elif inspect.isclass(value):
            found.append((name, value))
            for member, attribute in vars(value).items():
                function = attribute.__func__ if isinstance(attribute, (classmethod, staticmethod)) else attribute
                if inspect.isfunction(function) or isinstance(attribute, property):
                    found.append((f"{name}.{member}", function.fget if isinstance(attribute, property) else function))
    return found


def _raised_names(docstring: str) -> list[str]:
    """The class names of the entries of the ``Raises:`` sections (entries sit 4 spaces in, text wraps deeper)."""
    names, section_indent = [], None
    for line in docstring.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() == "Raises:":
            section_indent = indent
        elif section_indent is not None and line.strip():
            if indent <= section_indent:
                section_indent = None
            elif indent == section_indent + 4 and (match := ENTRY.match(line)):
                names.append(match.group(1))
    return names


def test_every_raises_entry_names_an_exception_class():
    """``Raises:`` names builtins, ``kornia_siglip2.errors`` classes or classes the module can see, nothing else."""
    unknown = []
    for module_name in _modules():
        if module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        for name, value in _documented(module):
            docstring = inspect.getdoc(value) or ""
            for raised in _raised_names(docstring):
                candidate = (
                    getattr(builtins, raised, None) or getattr(errors, raised, None) or getattr(module, raised, None)
                )
                if not (inspect.isclass(candidate) and issubclass(candidate, BaseException)):
                    unknown.append(f"{module_name}.{name}: Raises {raised}")
    assert not unknown, "\n".join(unknown)


def test_from_pretrained_raises_the_documented_class_for_missing_weights(siglip2_checkpoint, tmp_path):
    """``SigLip2.from_pretrained`` documents ValueCheckError for missing weights: that class, not a bare ValueError."""
    from safetensors.torch import load_file, save_file

    from kornia_siglip2 import SigLip2, load_vision_tower

    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text((Path(siglip2_checkpoint) / "config.json").read_text())
    tensors = load_file(Path(siglip2_checkpoint) / "model.safetensors")
    dropped = next(key for key in tensors if key.endswith("post_layernorm.weight"))
    save_file({key: value for key, value in tensors.items() if key != dropped}, folder / "model.safetensors")
    assert "ValueCheckError" in inspect.getdoc(SigLip2.from_pretrained)
    with pytest.raises(errors.ValueCheckError, match="post_layernorm"):
        SigLip2.from_pretrained(folder)
    if dropped.startswith("vision_model."):
        with pytest.raises(errors.ValueCheckError, match="post_layernorm"):
            load_vision_tower(folder, dtype=torch.float32)
