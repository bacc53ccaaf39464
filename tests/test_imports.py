"""The import graph: layers that only point down, no cycles, and a light ``import kornia_siglip2``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kornia_siglip2"

# Lower numbers are lower layers: a module may import modules of a lower layer, or of its own layer inside
# its own subpackage. The first matching prefix decides (longest prefixes first).
LAYERS = {
    "kornia_siglip2.errors": 0,
    "kornia_siglip2.config": 1,
    "kornia_siglip2.loading": 1,
    "kornia_siglip2.packing": 2,
    "kornia_siglip2.hub": 2,
    "kornia_siglip2.resample": 2,
    "kornia_siglip2.attention": 3,
    "kornia_siglip2.outputs": 3,
    "kornia_siglip2.preprocess": 3,
    "kornia_siglip2.tokenizer": 3,
    "kornia_siglip2.layers": 4,
    "kornia_siglip2.vision": 5,
    "kornia_siglip2.text": 5,
    "kornia_siglip2.decoders": 5,
    # the training package's __init__ re-exports only the EMA teacher and the views, which the
    # self-distillation loss uses; the data pipeline and the recipe sit above the losses (layer 9)
    "kornia_siglip2.training": 5,
    "kornia_siglip2.model": 6,
    "kornia_siglip2.lens": 7,
    "kornia_siglip2.zero_shot": 7,
    "kornia_siglip2.losses": 8,
    "kornia_siglip2.training.data": 9,
    "kornia_siglip2.training.objective": 9,
    "kornia_siglip2.training.recipe": 9,
    "kornia_siglip2.training.checkpoint": 9,
    "kornia_siglip2.training.synthetic": 9,
    "kornia_siglip2._demo": 9,
    "kornia_siglip2._embed": 9,
    "kornia_siglip2.demo": 10,
    "kornia_siglip2.cli": 10,
    "kornia_siglip2.train": 10,
    "kornia_siglip2.__main__": 11,
    "kornia_siglip2": 11,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in tests/test_imports.py: add it to LAYERS")


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
            source_layer, target_layer = _layer(module), _layer(target)
            same_subpackage = target.rpartition(".")[0] == module.rpartition(".")[0] != "kornia_siglip2"
            parent_package = module.startswith(target + ".") or target.startswith(module + ".")
            if target_layer > source_layer or (
                target_layer == source_layer and not (same_subpackage or parent_package)
            ):
                upward.append(f"{module} (layer {source_layer}) imports {target} (layer {target_layer})")
    assert not upward, "\n".join(sorted(upward))


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
