# Quick start: `make demo` (offline main job) and `make test` (the test suite), each on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all lint format bench bench-quick docs kornia-patch wheel clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build first, so no multi-GB CUDA build is pulled by the `torch` requirement
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m kornia_siglip2 demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests kornia_siglip2 -q $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m slow --runslow $(PYTEST_ARGS)

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests kornia_siglip2 -q --runslow --dtype all $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/latest.json $(PYTEST_ARGS)
	$(PY) -m benchmarks.report benchmarks/results/latest.json

bench-quick: install
	$(PY) -m pytest benchmarks -q -m "not large and not slow" --benchmark-json=benchmarks/results/quick.json $(PYTEST_ARGS)
	$(PY) -m benchmarks.report benchmarks/results/quick.json --summary benchmarks/results/quick_summary.json \
		--markdown benchmarks/results/quick_table.md --plot benchmarks/results/quick_throughput.png

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) docs/make_figures.py
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

kornia-patch: install
	$(PY) scripts/kornia_patch.py --out build/kornia_patch
	$(PY) -m ruff check --config scripts/kornia_ruff.toml build/kornia_patch

wheel: install
	$(PY) -m pip install --quiet build
	BUILD_PY=$(PY) scripts/check_wheel.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache docs/_build
