"""Training step (forward + backward of the vision tower, no optimizer): ours vs transformers (and Kornia 0.9).

The loss is the mean square of the pooled features; every implementation starts each step with
``zero_grad(set_to_none=True)``. Kornia 0.9 runs the fixed-resolution case only (it has no NaFlex).
"""

import pytest

from benchmarks.cases import CASES

CASE_IMPLEMENTATIONS = [
    pytest.param(case, implementation, id=f"{case}-{implementation}")
    for case in ("fixed_b8_train", "naflex_default_train", "naflex_native_train")
    for implementation in CASES[case].implementations
]


@pytest.mark.parametrize(("case", "implementation"), CASE_IMPLEMENTATIONS)
def test_training_step(bench_case, case, implementation):
    bench_case(case, implementation)
