# Quick start: `make demo` (offline main job) and `make test` (the test suite), each on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# the lock file: every package the commands below install, at the versions the suite was proven on
CONSTRAINTS ?= .ci/constraints.txt
# torch is installed first, from this spec, so the `torch` requirement pulls no other build. The default is the
# CPU build on this machine (a local wheel); elsewhere plain `torch==2.13.0` from PyPI is the CUDA build on Linux.
# CPU only:  make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# CUDA:      make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# `make test-latest`: the newest releases (no lock); `make test-min`: the declared lower bounds
LATEST_VENV ?= .venv-latest
MIN_VENV ?= .venv-min
TEST_CMD = HF_HUB_OFFLINE=1 $(1)/bin/python -m pytest tests kornia_siglip2 -q $(PYTEST_ARGS)

.PHONY: install demo test test-all test-dtypes test-latest test-min lint format bench bench-full bench-quick bench-targets gpu-check docs \
	kornia-patch kornia-prs kornia-prs-latest wheel \
	lock versions clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip -c $(CONSTRAINTS)
	$(PY) -m pip install --quiet $(TORCH_SPEC) -c $(CONSTRAINTS)
	$(PY) -m pip install --quiet -e ".[dev]" -c $(CONSTRAINTS)
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m kornia_siglip2 demo

test: install
	$(call TEST_CMD,$(VENV))

# every dtype, and the property tests (tests/test_properties.py) with hypothesis' deep example budget
test-all: install
	HYPOTHESIS_PROFILE=deep HF_HUB_OFFLINE=1 $(PY) -m pytest tests kornia_siglip2 -q --dtype all $(PYTEST_ARGS)

# the tests that take a dtype, in the two dtypes `make test` does not run (CI runs `make test` and this; `make test-all`
# runs everything in every dtype, with the deep hypothesis profile)
test-dtypes: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests kornia_siglip2 -q --dtype float64,bfloat16 -m dtypes $(PYTEST_ARGS)

# a fresh venv with the newest release of every dependency (torch from TORCH_SPEC), then the same suite
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" \
		"$$($(LATEST_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')"
	$(MAKE) --no-print-directory versions VENV=$(LATEST_VENV)
	$(call TEST_CMD,$(LATEST_VENV))

# a fresh venv with every declared lower bound of pyproject.toml (torch from TORCH_SPEC), then the same suite
test-min:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python scripts/min_constraints.py pyproject.toml $(CONSTRAINTS) > $(MIN_VENV)/constraints-min.txt
	$(MIN_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(MIN_VENV)/bin/python -m pip install --quiet -e ".[dev]" -c $(MIN_VENV)/constraints-min.txt
	$(MAKE) --no-print-directory versions VENV=$(MIN_VENV)
	$(call TEST_CMD,$(MIN_VENV))

# rewrite the lock file from a fresh venv with the newest releases (then run `make test` and commit it)
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet $(TORCH_SPEC)
	.venv-lock/bin/python -m pip install --quiet -e ".[dev,docs]"
	.venv-lock/bin/python -m pip freeze > .venv-lock/freeze.txt
	.venv-lock/bin/python scripts/write_lock.py .venv-lock/freeze.txt > $(CONSTRAINTS)
	rm -rf .venv-lock

# the versions a venv runs (what a test report should name)
versions:
	@$(PY) -c "import importlib.metadata as m; \
	print(' '.join(f'{n}=={m.version(n)}' for n in ('torch', 'transformers', 'tokenizers', 'huggingface_hub', \
	'kornia', 'safetensors', 'numpy', 'pillow', 'pytest')))"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# `make bench`: tiny (fp32/bf16/fp16) + 4-layer ViT-B width (fp32/bf16); bench-full adds the 12-layer ViT-B
bench: install
	$(PY) -m pytest benchmarks -q -m "not slow" --benchmark-json=benchmarks/results/latest.json $(PYTEST_ARGS)
	$(PY) -m benchmarks.report benchmarks/results/latest.json

bench-full: install
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/latest.json $(PYTEST_ARGS)
	$(PY) -m benchmarks.report benchmarks/results/latest.json

# under a minute on 2 quiet cores: the tiny model in every dtype, one short table, where it wrote its files
bench-quick: install
	$(PY) -m benchmarks.quick $(PYTEST_ARGS)

# issue 17's CPU speed targets, met or not: ours / ours plain path / transformers in alternating rounds (minutes)
TARGETS_ARGS ?= --rounds 7
bench-targets: install
	$(PY) -m benchmarks.targets $(TARGETS_ARGS)

# on a CUDA machine: flash/cuDNN varlen parity tests + mixed-batch speed, report in benchmarks/results/gpu_check.md
gpu-check: install
	PY=$(PY) benchmarks/gpu_check.sh

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]" -c $(CONSTRAINTS)
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) docs/make_figures.py
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# The Kornia PR series (scripts/kornia_pr/series/*.patch over the release in scripts/kornia_pr/base.json; see
# docs/upstreaming.md): `make kornia-prs` builds the base from the release's sdist (PyPI), applies the series with
# `git am -3` and checks each PR (CI runs it); `make kornia-patch PR=N` checks PRs 1..N; KORNIA_REPO=PATH (a clone of
# kornia/kornia) checks inside Kornia's tree with its own tests. `make kornia-prs-latest`: the newest Kornia release,
# for people (a new release must not block CI).
KORNIA_TOOLS := build/kornia_tools
KORNIA_REPO ?=
PR ?=
KORNIA_CHECK = $(PY) scripts/kornia_patch.py check --tools $(KORNIA_TOOLS) $(if $(KORNIA_REPO),--kornia-repo $(KORNIA_REPO))

$(KORNIA_TOOLS)/.installed: scripts/kornia_pr/tools.txt
	$(PY) -m pip install --quiet --upgrade --target $(KORNIA_TOOLS) -r scripts/kornia_pr/tools.txt
	touch $@

kornia-patch: install $(KORNIA_TOOLS)/.installed
	$(KORNIA_CHECK) $(if $(PR),--pr $(PR))

kornia-prs: install $(KORNIA_TOOLS)/.installed
	$(KORNIA_CHECK)

kornia-prs-latest: install $(KORNIA_TOOLS)/.installed
	$(KORNIA_CHECK) --kornia latest --out build/kornia_pr_latest

wheel: install
	BUILD_PY=$(PY) TORCH_SPEC="$(TORCH_SPEC)" CONSTRAINTS=$(CONSTRAINTS) scripts/check_wheel.sh

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(MIN_VENV) build dist *.egg-info .pytest_cache .ruff_cache docs/_build
