import pytest
import torch
import torch.nn.functional as F
from conftest import VISION, naflex_positions_reference, tolerance

from kornia_siglip2 import ImageLayout, VisionConfig, VisionTransformer, load_vision_tower, patchify

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

    def test_dynamo(self, device, dtype):
        """Inductor, one graph: the NaFlex tower on a batch packed outside the compiled region."""
        from kornia_siglip2 import PackedImages

        torch._dynamo.reset()
        tower = _tower(True, device, dtype)
        packed = PackedImages(
            torch.rand(6 + 16 + 8, 48, device=device, dtype=dtype), torch.tensor([[1, 2, 3], [1, 4, 4], [1, 8, 1]])
        )
        compiled = torch.compile(lambda x: tower(x).pooler_output, fullgraph=True)
        torch.testing.assert_close(compiled(packed), tower(packed).pooler_output, **tolerance(dtype))

    @pytest.mark.parametrize("naflex", [False, True], ids=["fixed", "naflex"])
    def test_dynamo_inference(self, device, dtype, naflex):
        """Inductor under ``torch.inference_mode``, one graph: the CPU inference kernels (oneDNN linears with
        fused epilogues, the varlen attention operator) are called from the compiled code, eager's values."""
        from kornia_siglip2 import PackedImages

        torch._dynamo.reset()
        tower = _tower(naflex, device, dtype)
        if naflex:
            images = PackedImages(
                torch.rand(6 + 16 + 8, 48, device=device, dtype=dtype), torch.tensor([[1, 2, 3], [1, 4, 4], [1, 8, 1]])
            )
        else:
            images = torch.rand(2, 3, 16, 16, device=device, dtype=dtype)
        compiled = torch.compile(lambda x: tower(x).pooler_output, fullgraph=True)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(images), tower(images).pooler_output, **tolerance(dtype))

    def test_dynamo_fixed_resolution(self, device, dtype):
        """Inductor, one graph: the fixed-resolution tower on images (B, C, H, W)."""
        torch._dynamo.reset()
        tower = _tower(False, device, dtype)
        images = torch.rand(2, 3, 16, 16, device=device, dtype=dtype)
        compiled = torch.compile(lambda x: tower(x).last_hidden_state, fullgraph=True)
        torch.testing.assert_close(compiled(images), tower(images).last_hidden_state, **tolerance(dtype))

    @pytest.mark.parametrize("height, width", [*NAFLEX_GRIDS, (8, 1), (2, 1), (1, 7), (4, 1), (5, 6)])
    def test_grid_positions_equal_resize(self, height, width):
        """The traced path's matmul resize equals the eager antialiased interpolate (and, but for one-column
        grids, where it follows torch's CPU kernel, the independent float64 formula at float64 precision)."""
        from kornia_siglip2.packing import image_blocks

        tower = _tower(True, dtype=torch.float64)
        token_grid = image_blocks(torch.tensor([[1, height, width]]), height * width, 1, height * width)[2]
        positions = tower.embeddings.grid_positions(token_grid)
        torch.testing.assert_close(positions, tower.embeddings.resized_positions(height, width), atol=1e-12, rtol=1e-12)
        if width != 1 or height in (1, 4):
            table = tower.embeddings.position_embedding.weight.reshape(4, 4, -1)
            torch.testing.assert_close(
                positions, naflex_positions_reference(table, height, width), atol=1e-12, rtol=1e-12
            )


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


# grids of several shapes (smaller, larger and equal to the 4 x 4 table, one patch) for token dropping
DROP_GRIDS = [(3, 5), (7, 9), (4, 4), (1, 1), (2, 6)]


def _dropped_padded_inputs(dtype, grids=DROP_GRIDS, keep=0.5, seed=0):
    """transformers' padded NaFlex input with holes: ``pixel_attention_mask`` False at dropped patches.

    Each image keeps a random ``max(1, round(keep * h * w))`` of its ``h * w`` patches; padding is False too.
    Returns the padded inputs and our packed equivalent ``(patches, grid_thw, keep_mask)``.
    """
    generator = torch.Generator().manual_seed(seed)
    length = max(h * w for h, w in grids)
    pixel_values = torch.randn(len(grids), length, 48, generator=generator, dtype=torch.float64).to(dtype)
    mask = torch.zeros(len(grids), length, dtype=torch.bool)
    for row, (h, w) in enumerate(grids):
        kept = torch.randperm(h * w, generator=generator)[: max(1, round(keep * h * w))]
        mask[row, kept] = True
    spatial_shapes = torch.tensor(grids)
    padded = dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=spatial_shapes)
    keep_mask = torch.cat([mask[row, : h * w] for row, (h, w) in enumerate(grids)])
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    return padded, (pixel_values[mask], grid_thw, keep_mask)


class TestTokenDropping:
    """NaViT token dropping: ``keep_mask`` over the full grids, only the kept patches packed."""

    @staticmethod
    def _pair(hf_siglip2, siglip2_checkpoint, dtype):
        import copy

        reference = copy.deepcopy(hf_siglip2.vision_model).to(dtype).eval()
        ours = load_vision_tower(siglip2_checkpoint).to(dtype).eval()
        return reference, ours

    def _compare(self, hf_siglip2, siglip2_checkpoint, dtype, atol):
        reference, ours = self._pair(hf_siglip2, siglip2_checkpoint, dtype)
        padded, (patches, grid_thw, keep_mask) = _dropped_padded_inputs(dtype)
        with torch.no_grad():
            expected = reference(**padded)
            out = ours(patches, grid_thw, keep_mask=keep_mask)
        kept = padded["pixel_attention_mask"]
        assert out.last_hidden_state.shape == (int(kept.sum()), 32)
        assert out.cu_seqlens.tolist()[1:] == kept.sum(-1).cumsum(0).tolist()
        pooled_error = (out.pooler_output - expected.pooler_output).abs().max().item()
        token_error = (out.last_hidden_state - expected.last_hidden_state[kept]).abs().max().item()
        assert pooled_error < atol and token_error < atol, (pooled_error, token_error)
        # the test can fail: the same images with all their patches give other features
        full = ours(patches.new_zeros(int(grid_thw.prod(-1).sum()), 48).index_put_((keep_mask,), patches), grid_thw)
        assert (full.pooler_output - out.pooler_output).abs().max() > 1e-2

    def test_matches_transformers_masked_full_grid_float32(self, hf_siglip2, siglip2_checkpoint):
        """Dropped tokens == transformers on the full padded grid with pixel_attention_mask False there."""
        self._compare(hf_siglip2, siglip2_checkpoint, torch.float32, atol=1e-5)

    def test_matches_transformers_masked_full_grid_float64(
        self, hf_siglip2, siglip2_checkpoint, float64_naflex_positions
    ):
        """float64 with transformers' position resize in float64 (conftest): agreement to 1e-12."""
        self._compare(hf_siglip2, siglip2_checkpoint, torch.float64, atol=1e-12)

    @pytest.mark.parametrize("grids", [[(3, 5), (8, 2), (3, 5)], [(4, 4), (4, 4)]], ids=["mixed", "one-grid"])
    def test_keep_all_is_bitwise_no_mask(self, grids):
        """Every patch kept: bit for bit the output without keep_mask (the one-grid and mixed-grid paths)."""
        tower = _tower(True)
        grid_thw = torch.tensor([[1, h, w] for h, w in grids])
        patches = torch.rand(int(grid_thw.prod(-1).sum()), 48)
        keep_mask = torch.ones(patches.shape[0], dtype=torch.bool)
        with torch.no_grad():
            expected = tower(patches, grid_thw)
            out = tower(patches, grid_thw, keep_mask=keep_mask)
        assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(out.pooler_output, expected.pooler_output)

    def test_one_grid_positions_independent(self):
        """Positions of kept tokens, one grid and several frames: the resized table at each kept place."""
        tower = _tower(True, dtype=torch.float64)
        grids = [(1, 3, 5), (2, 3, 5)]  # 3 frames of the one grid
        keep_mask = torch.rand(45, generator=torch.Generator().manual_seed(3)) < 0.5
        keep_mask[[0, 15, 30]] = True
        patches = torch.zeros(int(keep_mask.sum()), 48, dtype=torch.float64)
        position_index = keep_mask.nonzero().flatten()
        embedded = tower.embeddings(patches, grids, position_index=position_index)
        table = naflex_positions_reference(tower.embeddings.position_embedding.weight.reshape(4, 4, -1), 3, 5)
        bias = tower.embeddings.patch_embedding.bias
        torch.testing.assert_close(embedded, table.repeat(3, 1)[keep_mask] + bias, atol=1e-12, rtol=1e-12)

    def test_gradients_flow(self):
        tower = _tower(True, dtype=torch.float64)
        _, (patches, grid_thw, keep_mask) = _dropped_padded_inputs(torch.float64)
        patches.requires_grad_(True)
        tower(patches, grid_thw, keep_mask=keep_mask).pooler_output.square().sum().backward()
        assert patches.grad is not None and bool((patches.grad.abs().sum(-1) > 0).all())
        table_grad = tower.embeddings.position_embedding.weight.grad
        assert table_grad is not None and bool(table_grad.abs().sum() > 0)
        assert all(parameter.grad is not None for parameter in tower.parameters())

    def test_gradcheck(self):
        tower = _tower(True, dtype=torch.float64, num_hidden_layers=1)
        grid_thw = torch.tensor([[1, 2, 2], [1, 1, 3]])
        keep_mask = torch.tensor([True, False, False, True, False, True, True])
        patches = torch.rand(4, 48, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: tower(x, grid_thw, keep_mask=keep_mask).pooler_output, (patches,))

    def test_exception(self):
        tower = _tower(True)
        grid_thw = torch.tensor([[1, 2, 3]])
        keep = torch.tensor([True, False, True, True, False, False])
        with pytest.raises(TypeError, match="keep_mask must be a bool tensor"):
            tower(torch.rand(3, 48), grid_thw, keep_mask=keep.long())
        with pytest.raises(ValueError, match=r"keep_mask must have shape \(6,\)"):
            tower(torch.rand(3, 48), grid_thw, keep_mask=keep[:5])
        with pytest.raises(ValueError, match="keep_mask keeps 3 patches but patches has 4 rows"):
            tower(torch.rand(4, 48), grid_thw, keep_mask=keep)
        with pytest.raises(ValueError, match=r"keeps no patch of frame\(s\) \[1\]"):
            tower(torch.rand(3, 48), torch.tensor([[1, 2, 3], [1, 1, 2]]), keep_mask=torch.cat([keep, keep[4:]]))
        with pytest.raises(ValueError, match=r"keep_mask .* packed patches"):
            tower(torch.rand(1, 3, 8, 12), keep_mask=keep)
        with pytest.raises(ValueError, match="keep_mask goes into the ImageLayout"):
            tower(torch.rand(6, 48), ImageLayout.from_grid_thw(grid_thw), keep_mask=keep)

    def test_dynamo_fullgraph(self):
        tower = _tower(True)
        grid_thw = torch.tensor([[1, 2, 3], [1, 4, 4]])
        keep_mask = torch.rand(22, generator=torch.Generator().manual_seed(0)) < 0.6
        keep_mask[[0, 6]] = True
        layout = ImageLayout.from_grid_thw(grid_thw, keep_mask=keep_mask)
        patches = torch.rand(int(keep_mask.sum()), 48)
        compiled = torch.compile(lambda x: tower(x, layout).pooler_output, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(patches), tower(patches, layout).pooler_output, **tolerance(torch.float32))
