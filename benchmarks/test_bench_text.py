"""Text tower, 64-token texts: ours vs transformers (batch 256 on ViT-B, 64 on the tiny model)."""

import pytest


@pytest.mark.parametrize("implementation", ["ours", "transformers"])
def test_text_tower(bench_case, encoder_size, implementation):
    bench_case("text_b256" if encoder_size == "base" else "text_b64", implementation)  # 4-layer ViT-B: b64 too
