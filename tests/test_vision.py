import pytest
import torch
import torch.nn.functional as F
from conftest import VISION, naflex_positions_reference, tolerance

from kornia_siglip2 import PackedGrid, VisionConfig, VisionTransformer, patchify

# NaFlex grids that shrink, grow, keep and mix both along the two axes of the tests' 4 x 4 position table
NAFLEX_GRIDS = [(3, 5), (8, 2), (4, 4), (1, 1), (7, 9)]


def _tower(naflex, device="cpu", dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    position_embedding = "naflex" if naflex else "fixed"
    config = VisionConfig(
        **dict(VISION, num_patches=16, image_size=16, position_embedding=position_embedding, **overrides)
    )
    return VisionTransformer(config).to(device, dtype).eval()


class TestVisionTransformer:
    @pytest.mark.parametrize("naflex", [True, False])
    def test_smoke(self, naflex, device, dtype):
        out = _tower(naflex, device, dtype)(*patchify(torch.rand(2, 3, 16, 16, device=device, dtype=dtype), 4))
        assert out.pooler_output.dtype == dtype and out.cu_seqlens.tolist() == [0, 16, 32]

    def test_cardinality(self, device, dtype):
        tower = _tower(True, device, dtype)
        patches = torch.rand(6 + 2 * 12, 48, device=device, dtype=dtype)
        out = tower(patches, torch.tensor([[1, 2, 3], [2, 3, 4]]), output_hidden_states=True)
        assert out.last_hidden_state.shape == (30, 32) and out.pooler_output.shape == (3, 32)
        assert len(out.hidden_states) == 3

    def test_without_head(self):
        out = _tower(True, vision_use_head=False)(*patchify(torch.rand(1, 3, 8, 8), 4))
        assert out.pooler_output is None

    @pytest.mark.parametrize("height, width", NAFLEX_GRIDS)
    def test_naflex_positions_float64_exact(self, height, width):
        """Exactness: our float64 resize is float64 end to end, against two independent float64 computations."""
        tower = _tower(True, dtype=torch.float64)
        table = tower.embeddings.position_embedding.weight.detach()
        resized = tower.embeddings.resized_positions(height, width)
        assert resized.dtype == torch.float64
        grid = table.reshape(4, 4, -1)
        # the explicit separable triangle-filter formula (tests/conftest.py), and float64 F.interpolate
        torch.testing.assert_close(resized, naflex_positions_reference(grid, height, width), atol=1e-12, rtol=1e-12)
        interpolated = F.interpolate(
            grid.permute(2, 0, 1)[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        torch.testing.assert_close(resized, interpolated[0].flatten(1).t(), atol=1e-12, rtol=1e-12)

    @pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
    def test_naflex_positions_match_transformers(self, table_dtype):
        """Agreement: transformers resizes in float32 for every dtype, so the bound is float32 rounding.

        Each resized row is a convex combination of at most k = 16 table rows; float32 rounds the table, the
        weights (a few operations each) and the k-term sum: error <= (k + 10) u max|table|, u = 2**-24
        (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1). In float32 our own resize rounds too,
        hence twice that.
        """
        from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

        tower = _tower(True, dtype=table_dtype)
        table = tower.embeddings.position_embedding.weight.detach()
        shapes = torch.tensor(NAFLEX_GRIDS)
        max_length = int(shapes.prod(-1).max())
        expected = Siglip2VisionEmbeddings.resize_positional_embeddings(table.reshape(4, 4, -1), shapes, max_length)
        bound = 2 * (16 + 10) * 2.0**-24 * table.abs().max().item()
        for row, (height, width) in enumerate(shapes.tolist()):
            resized = tower.embeddings.resized_positions(height, width)
            torch.testing.assert_close(resized, expected[row, : height * width], atol=bound, rtol=0)
        # the bound is not vacuous: a half-pixel shift of the sampling grid is far outside it
        shifted = (
            F.interpolate(
                table.reshape(4, 4, -1).permute(2, 0, 1)[None], size=(3, 5), mode="bilinear", align_corners=True
            )[0]
            .flatten(1)
            .t()
        )
        assert (shifted - expected[0, :15]).abs().max().item() > 100 * bound

    def test_resize_once_per_distinct_grid(self, monkeypatch):
        calls = []
        original = F.interpolate
        monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k["size"]) or original(*a, **k))
        tower = _tower(True)
        patches = torch.rand(3 * 6 + 16, 48)
        tower(patches, torch.tensor([[1, 2, 3], [1, 4, 4], [1, 2, 3], [1, 2, 3]]))
        assert sorted(calls) == [(2, 3), (4, 4)]

    def test_fixed_table_is_used_as_is_at_training_grid(self, monkeypatch):
        monkeypatch.setattr(F, "interpolate", lambda *a, **k: pytest.fail("no resize at the training grid"))
        _tower(False)(*patchify(torch.rand(2, 3, 16, 16), 4))

    def test_mask_token_replaces_patch_embedding(self):
        tower = _tower(True, dtype=torch.float64)
        patches, grid_thw = patchify(torch.rand(1, 3, 8, 8, dtype=torch.float64), 4)
        mask = torch.tensor([True, False, True, False])
        token = torch.randn(32, dtype=torch.float64)
        embedded = tower.embeddings(patches, [(1, 2, 2)], mask, token)
        positions = tower.embeddings.resized_positions(2, 2)
        torch.testing.assert_close(embedded[mask], token + positions[mask])
        out = tower(patches, grid_thw, mask=mask, mask_token=token)
        assert not torch.allclose(out.pooler_output, tower(patches, grid_thw).pooler_output)

    def test_exception(self):
        tower = _tower(True)
        with pytest.raises(ValueError, match=r"describes 6 patches .* 7 rows"):
            tower(torch.rand(7, 48), torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueError, match=r"shape \(num_patches, 48\)"):
            tower(torch.rand(6, 47), torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueError, match=r"\(num_images, 3\)"):
            tower(torch.rand(6, 48), torch.tensor([2, 3]))
        with pytest.raises(ValueError, match=r"mask must have shape \(6,\)"):
            tower(torch.rand(6, 48), torch.tensor([[1, 2, 3]]), mask=torch.ones(5, dtype=torch.bool))

    def test_gradcheck(self):
        tower = _tower(True, dtype=torch.float64, num_hidden_layers=1)
        patches = torch.rand(5, 48, dtype=torch.float64, requires_grad=True)
        grid_thw = torch.tensor([[1, 1, 2], [1, 1, 3]])
        assert torch.autograd.gradcheck(lambda x: tower(x, grid_thw).pooler_output, (patches,))

    def test_dynamo_fullgraph(self, device, dtype):
        tower = _tower(True, device, dtype)
        patches = torch.rand(6 + 16, 48, device=device, dtype=dtype)
        grid = PackedGrid.from_grid_thw(torch.tensor([[1, 2, 3], [1, 4, 4]]), device)
        compiled = torch.compile(lambda x: tower(x, grid).pooler_output, fullgraph=True)
        torch.testing.assert_close(compiled(patches), tower(patches, grid).pooler_output, **tolerance(dtype))


class TestCompiledBlocks:
    def test_mixed_grids_one_pair_of_graphs(self):
        """Compiled blocks: eager answers on batches of other grids, no new graph after the first batch."""
        from torch._dynamo.utils import counters

        from kornia_siglip2 import compile_blocks

        torch._dynamo.reset()
        counters.clear()
        tower, eager = _tower(True), _tower(True)
        compile_blocks(tower, backend="aot_eager")
        try:
            for grids in ([(3, 5), (8, 2)], [(4, 4)], [(1, 1), (7, 9), (4, 4), (2, 6)]):
                grid_thw = torch.tensor([[1, h, w] for h, w in grids])
                patches = torch.rand(int(grid_thw.prod(-1).sum()), 48)
                with torch.no_grad():
                    out = tower(patches, grid_thw)
                    expected = eager(patches, grid_thw)
                torch.testing.assert_close(out.pooler_output, expected.pooler_output, **tolerance(torch.float32))
                torch.testing.assert_close(
                    out.last_hidden_state, expected.last_hidden_state, **tolerance(torch.float32)
                )
            assert counters["stats"]["unique_graphs"] == 2
        finally:
            torch._dynamo.reset()
