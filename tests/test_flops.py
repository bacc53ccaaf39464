"""The analytic FLOP formulas of ``benchmarks/flops.py`` against ``torch.utils.flop_counter.FlopCounterMode``.

Counted with SDPA's math backend, whose attention is plain ``bmm`` calls that torch's counter knows, so
the check does not rely on our mapping of the CPU flash kernel; ``count_flops`` (that mapping) must then
give the same numbers on the default backend.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kornia_siglip2 import SigLip2, SigLip2Config, attention
from kornia_siglip2.packing import patchify


def _load_flops():
    """``benchmarks/flops.py`` by path (``benchmarks`` is not an installed package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "flops.py"
    spec = importlib.util.spec_from_file_location("benchmark_flops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


flops = _load_flops()

WIDTH, MLP_WIDTH, LAYERS, HEADS, PATCH = 32, 64, 2, 4, 4
TEXT_WIDTH, TEXT_MLP, PROJECTION = 48, 96, 40


def _model(naflex: bool) -> SigLip2:
    vision = {
        "hidden_size": WIDTH,
        "intermediate_size": MLP_WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "patch_size": PATCH,
    }
    vision.update({"num_patches": 16} if naflex else {"image_size": 16})
    text = {
        "vocab_size": 100,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": TEXT_MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 16,
        "projection_size": PROJECTION,
    }
    model_type = "siglip2" if naflex else "siglip"
    config = SigLip2Config.from_hf_dict({"model_type": model_type, "vision_config": vision, "text_config": text})
    torch.manual_seed(0)
    return SigLip2(config)


def _math_count(fn) -> int:
    """torch's own counter on the plain path: math SDPA, no oneDNN fused linears (which torch's table lacks)."""
    fused, attention.FUSED_CPU_KERNELS = attention.FUSED_CPU_KERNELS, False
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        attention.FUSED_CPU_KERNELS = fused
    return counter.get_total_flops()


def _packed_batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Three images of different grids (2x3, 4x4, 1x5 patches) plus a repeated grid: groups of equal lengths."""
    parts = [patchify(torch.rand(1, 3, h * PATCH, w * PATCH), PATCH) for h, w in ((2, 3), (4, 4), (1, 5), (4, 4))]
    patches = torch.cat([p for p, _ in parts])
    grid_thw = torch.cat([g for _, g in parts])
    return patches, grid_thw, [6, 16, 5, 16]


class TestVisionFlops:
    @pytest.mark.parametrize("naflex", [True, False])
    def test_forward(self, naflex):
        # parameters frozen rather than torch.no_grad(): FlopCounterMode's module tracker needs autograd on
        model = _model(naflex).eval().requires_grad_(False)
        patches, grid_thw, seqlens = _packed_batch()
        expected = flops.vision_tower_flops(seqlens, WIDTH, MLP_WIDTH, LAYERS, 3 * PATCH**2)
        assert _math_count(lambda: model.encode_image(patches=patches, grid_thw=grid_thw)) == expected
        assert flops.count_flops(lambda: model.encode_image(patches=patches, grid_thw=grid_thw)) == expected

    def test_training_step(self):
        model = _model(naflex=True).train()
        patches, grid_thw, seqlens = _packed_batch()
        forward = flops.vision_tower_flops(seqlens, WIDTH, MLP_WIDTH, LAYERS, 3 * PATCH**2)
        expected = flops.training_flops(forward, 2 * sum(seqlens) * 3 * PATCH**2 * WIDTH)

        def step():
            model.encode_image(patches=patches, grid_thw=grid_thw).square().mean().backward()

        assert _math_count(step) == expected
        assert flops.count_flops(step) == expected

    def test_transformers_agrees(self, hf_siglip):
        """transformers' fixed-resolution tower (conv patch embedding, padded-free batch) counts the same."""
        config = hf_siglip.config.vision_config
        images = torch.rand(3, 3, config.image_size, config.image_size)
        seqlens = [(config.image_size // config.patch_size) ** 2] * 3
        expected = flops.vision_tower_flops(
            seqlens, config.hidden_size, config.intermediate_size, config.num_hidden_layers, 3 * config.patch_size**2
        )
        assert _math_count(lambda: hf_siglip.get_image_features(pixel_values=images)) == expected


class TestTextFlops:
    def test_forward(self):
        model = _model(naflex=True).eval().requires_grad_(False)
        input_ids = torch.randint(0, 100, (3, 16))
        expected = flops.text_tower_flops(3, 16, TEXT_WIDTH, TEXT_MLP, LAYERS, PROJECTION)
        assert _math_count(lambda: model.encode_text(input_ids)) == expected
        assert flops.count_flops(lambda: model.encode_text(input_ids)) == expected

    def test_vit_b_example(self):
        # ViT-B/16 at 224 px: ~35.4 GFLOPs per image, the figure the ViT literature quotes (17.6 GMACs)
        assert flops.vision_tower_flops([196], 768, 3072, 12, 768) == 35_416_584_192


class TestMatmulPeak:
    def test_positive(self):
        assert flops.matmul_peak_flops(size=64, repeats=2) > 0
