#!/usr/bin/env bash
# Release check: build the sdist and wheel, then prove the wheel installs and imports in a fresh virtual
# environment (no --system-site-packages, not the project's .venv, run from outside the source tree).
#
#   scripts/check_wheel.sh                 # `make wheel`
#   OFFLINE=1 scripts/check_wheel.sh       # no package index: build without isolation, install from WHEELHOUSE
#
# Environment:
#   BUILD_PY    Python that runs `python -m build` (default .venv/bin/python; needs `pip install build`)
#   PYTHON      Python that creates the fresh venv (default python3)
#   TORCH_SPEC  torch requirement installed first, as the Makefile does (default torch==2.13.0, the CPU build
#               where the index serves it); pip arguments may follow, e.g. "torch==2.13.0 --index-url URL"
#   CONSTRAINTS pip constraints file for the fresh venv (default .ci/constraints.txt, the lock file; empty: none)
#   OFFLINE=1   build with --no-isolation (setuptools from BUILD_PY's environment) and install with
#               `pip --no-index --find-links "$WHEELHOUSE"`: every dependency must be a wheel there
#   WHEELHOUSE  folder of wheels for OFFLINE=1 (torch, kornia, kornia_rs, safetensors, huggingface_hub, numpy and
#               their dependencies)
#   KEEP=1      keep the temporary venv and print its path
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BUILD_PY=${BUILD_PY:-.venv/bin/python}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CONSTRAINTS=${CONSTRAINTS-.ci/constraints.txt}
DIST=${DIST:-dist}
OFFLINE=${OFFLINE:-0}

step() { printf '\n== %s\n' "$*"; }

step "build sdist + wheel into $DIST/"
rm -rf "$DIST" build/lib build/bdist.*
if [ "$OFFLINE" = 1 ]; then
  "$BUILD_PY" -m build --no-isolation --skip-dependency-check --outdir "$DIST" .
else
  "$BUILD_PY" -m build --outdir "$DIST" .
fi
WHEEL=$(ls "$DIST"/kornia_siglip2-*-py3-none-any.whl)
SDIST=$(ls "$DIST"/kornia_siglip2-*.tar.gz)
echo "wheel: $WHEEL"
echo "sdist: $SDIST"

step "wheel contents: the package only, with its metadata"
"$BUILD_PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({name.split("/")[0] for name in names})
stray = [name for name in top if not (name == "kornia_siglip2" or name.endswith(".dist-info"))]
assert not stray, f"unexpected top-level entries in the wheel: {stray}"
for required in ("kornia_siglip2/__init__.py", "kornia_siglip2/decoders/locca.py"):
    assert required in names, f"{required} missing from the wheel"
metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(metadata).decode()
for field in ("Name: kornia_siglip2", "License-Expression: Apache-2.0", "Requires-Python: >=3.10", "Requires-Dist: torch"):
    assert field in text, f"{field!r} missing from METADATA"
print(f"{len(names)} files; top level {top}")
print("\n".join(line for line in text.splitlines() if line.startswith(("Version:", "Project-URL:", "Classifier:"))))
EOF

VENV=$(mktemp -d)/venv
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $VENV"; else rm -rf "$(dirname "$VENV")"; fi; }
trap cleanup EXIT

step "fresh venv: $VENV"
"$PYTHON" -m venv "$VENV"
INSTALL=("$VENV/bin/python" -m pip install --quiet)
if [ -n "$CONSTRAINTS" ]; then
  case "$CONSTRAINTS" in /*) ;; *) CONSTRAINTS="$ROOT/$CONSTRAINTS" ;; esac
  INSTALL+=(-c "$CONSTRAINTS")
fi
if [ "$OFFLINE" = 1 ]; then
  : "${WHEELHOUSE:?OFFLINE=1 needs WHEELHOUSE=<folder of wheels>}"
  INSTALL+=(--no-index --find-links "$WHEELHOUSE")
fi
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip arguments (--index-url URL)
"${INSTALL[@]}" $TORCH_SPEC     # the CPU build first, as the Makefile does
"${INSTALL[@]}" "$WHEEL"

step "import and run from outside the source tree"
cd "$(dirname "$VENV")"
"$VENV/bin/python" - "$ROOT" <<'EOF'
import importlib.metadata
import pathlib
import sys

import torch

import kornia_siglip2
from kornia_siglip2 import SigLip2, SigLip2Config, patchify

root = pathlib.Path(sys.argv[1]).resolve()
location = pathlib.Path(kornia_siglip2.__file__).resolve()
assert root not in location.parents, f"imported the source tree ({location}), not the installed wheel"
assert importlib.metadata.version("kornia_siglip2") == kornia_siglip2.__version__
config = SigLip2Config.from_hf_dict({
    "model_type": "siglip2",
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "patch_size": 4, "num_patches": 16},
    "text_config": {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2},
})
model = SigLip2(config).eval()
patches, grid_thw = patchify(torch.rand(2, 3, 8, 12), 4)
with torch.no_grad():
    logits = model(torch.randint(0, 50, (3, 64)), patches=patches, grid_thw=grid_thw).logits_per_image
assert logits.shape == (2, 3)
print(f"kornia_siglip2 {kornia_siglip2.__version__} from {location.parent}")
print(f"torch {torch.__version__}, kornia {importlib.metadata.version('kornia')}; forward OK {tuple(logits.shape)}")
EOF
"$VENV/bin/kornia-siglip2" --help > /dev/null && echo "console script kornia-siglip2: OK"

step "wheel check passed: $WHEEL"
