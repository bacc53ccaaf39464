"""The import graph: layers that only point down, no cycles, and a light ``import kornia_siglip2``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kornia_siglip2"

# One unit per top-level module or folder (subpackage, with everything below it). Lower numbers are lower
# layers: a module may import a module of its own unit or of a unit of a lower layer, never one of its own
# layer in another unit, never one above. No per-module exceptions: a folder is one layer.
LAYERS = {
    "errors": 0,
    "config": 1,
    "loading": 1,
    "images": 1,
    "locks": 1,
    "packing": 1,
    "hub": 2,
    "resample": 2,
    "attention": 3,
    "outputs": 3,
    "preprocess": 3,
    "tokenizer": 3,
    "layers": 4,
    "vision": 5,
    "text": 5,
    "decoders": 5,
    "pretrained": 5,
    "model": 6,
    "vision_model": 6,
    "lens": 7,
    "zero_shot": 7,
    "export": 7,
    "losses": 8,
    "training": 9,
    "_demo": 9,
    "_embed": 9,
    "demo": 10,
    "cli": 10,
    "train": 10,
    "__main__": 11,
    "": 11,  # the package root
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The top-level module or folder ``module`` belongs to (``""`` for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    unit = _unit(module)
    if unit not in LAYERS:
        raise AssertionError(f"{module}: its unit {unit!r} has no layer in tests/test_imports.py: add it to LAYERS")
    return LAYERS[unit]


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _package_imports(path: Path) -> set[str]:
    """Every kornia_siglip2 module ``path`` imports, at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("kornia_siglip2")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("kornia_siglip2"):
                # `from kornia_siglip2 import _embed` imports the submodule, not the package root
                submodules = [f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")]
                found |= set(submodules) if submodules else {base}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _package_imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_imports_point_down():
    upward = []
    for module, imports in _graph().items():
        for target in imports:
            if target == "kornia_siglip2" and module != "kornia_siglip2":
                upward.append(f"{module} imports the package root")
                continue
            if _unit(target) == _unit(module):
                continue
            source_layer, target_layer = _layer(module), _layer(target)
            if target_layer >= source_layer:
                upward.append(
                    f"{module} ({_unit(module) or 'root'}, layer {source_layer}) imports {target} "
                    f"({_unit(target)}, layer {target_layer})"
                )
    assert not upward, "\n".join(sorted(upward))


def test_no_unit_cycles():
    """The folder-level graph is acyclic too (implied by the layers, checked on its own for a clear message)."""
    edges = {}
    for module, imports in _graph().items():
        edges.setdefault(_unit(module), set()).update(_unit(target) for target in imports if target != "kornia_siglip2")
    for unit, targets in edges.items():
        for target in targets - {unit}:
            assert unit not in edges.get(target, set()), f"folders {unit!r} and {target!r} import each other"


def test_no_cycles():
    graph = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done or node not in graph:
            return
        if node in visiting:
            cycles.append(" -> ".join([*path[path.index(node) :], node]))
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            # a package importing its own submodules (an __init__ re-export) is not a cycle
            if target.startswith(node + "."):
                continue
            visit(target, [*path, node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


FORBIDDEN = (
    "transformers",
    "kornia",
    "kornia.augmentation",
    "kornia_siglip2.losses",
    "kornia_siglip2.decoders",
    "kornia_siglip2.training",
    "PIL",
)


def test_plain_import_is_light():
    """The inference stack loads no training code, transformers or Kornia (whose import loads kornia.augmentation)."""
    code = (
        "import sys\n"
        "from kornia_siglip2 import NaFlexImagePreprocessor, SigLip2, ZeroShotClassifier, logit_lens\n"
        f"print([name for name in {FORBIDDEN!r} if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"import kornia_siglip2 loaded {result.stdout.strip()}"
