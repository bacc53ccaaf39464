"""Benchmark suites (pytest-benchmark); see benchmarks/conftest.py and docs/benchmarks.md."""
