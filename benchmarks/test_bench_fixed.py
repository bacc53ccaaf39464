"""Fixed resolution 224 (SigLIP, SigLIP 2 fixed-res): ours vs transformers ``SiglipModel`` vs Kornia 0.9."""

import pytest

IMPLEMENTATIONS = ["ours", "transformers", "kornia"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ["fixed_b1", "fixed_b32"])
def test_fixed_resolution(bench_case, case, implementation):
    bench_case(case, implementation)
