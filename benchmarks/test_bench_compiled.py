"""Graph-compiled inference: ours under ``torch.compile`` (inductor, fullgraph) vs transformers under
``torch.compile`` vs ours exported to ONNX in onnxruntime; ours eager and transformers eager are the entries of
``test_bench_fixed.py`` / ``test_bench_naflex.py`` of the same run (the report sets them side by side).

- fixed resolution 224, batch 1 and 32;
- NaFlex ``naflex_default`` (8 images of mixed aspect ratios, transformers padded to 256 patches, ours packed),
  ``naflex_equal`` (8 equal 14 x 14 grids) and ``naflex_native`` (the mixed batch: 64 ... 1024 patches).

Ours gets a ``PackedImages`` built outside the compiled function; compilation and one warm run happen before
the timed rounds. onnxruntime runs float32 only (its CPU provider has no bfloat16 kernels for these graphs).
"""

import pytest

from benchmarks.cases import COMPILED


@pytest.mark.parametrize("implementation", COMPILED)
@pytest.mark.parametrize("case", ["fixed_b1", "fixed_b32", "naflex_default", "naflex_equal", "naflex_native"])
def test_compiled(bench_case, case, implementation, bench_dtype):
    if implementation == "ours_onnxruntime" and bench_dtype != "float32":
        pytest.skip("onnxruntime: float32 only")
    pytest.importorskip("onnxruntime" if implementation == "ours_onnxruntime" else "torch")
    bench_case(case, implementation)
