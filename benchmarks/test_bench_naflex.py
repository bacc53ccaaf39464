"""NaFlex inference: ours vs transformers ``Siglip2Model`` on padded batches (Kornia 0.9 has no NaFlex).

- ``naflex_default``: transformers' default pipeline, 8 images of different aspect ratios scaled to the
  256-patch budget; both models get the same padded ``pixel_values`` + mask + ``spatial_shapes``.
- ``naflex_native``: native resolutions of 64 ... 1024 patches; ours runs them packed, transformers padded
  to the longest.
"""

import pytest

from benchmarks.cases import DEFAULT_GRIDS, naflex_default_grids


def test_default_grids_are_transformers():
    assert naflex_default_grids() == DEFAULT_GRIDS


@pytest.mark.parametrize("implementation", ["ours", "transformers"])
@pytest.mark.parametrize("case", ["naflex_default", "naflex_equal", "naflex_native"])
def test_naflex(bench_case, case, implementation):
    bench_case(case, implementation)
