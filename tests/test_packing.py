import pytest
import torch

from kornia_siglip2.packing import (
    ImageLayout,
    PackedImages,
    VarlenLayout,
    check_grid_thw,
    grid_thw_to_cu_seqlens,
    grid_thw_to_seqlens,
    pack_inputs,
    packed_to_padded,
    padded_to_packed,
    patchify,
    unpatchify,
)


class TestPatchify:
    def test_smoke(self, device, dtype):
        patches, grid_thw = patchify(torch.rand(2, 3, 8, 12, device=device, dtype=dtype), patch_size=4)
        assert patches.device.type == device.type and patches.dtype == dtype
        assert grid_thw.tolist() == [[1, 2, 3], [1, 2, 3]]

    def test_cardinality(self, device, dtype):
        patches, grid_thw = patchify(torch.rand(5, 1, 16, 32, device=device, dtype=dtype), patch_size=8)
        assert patches.shape == (5 * 2 * 4, 8 * 8 * 1)
        assert grid_thw.shape == (5, 3) and grid_thw.dtype == torch.int64

    def test_order_matches_reference_formula(self, device):
        # Siglip2ImageProcessor: x.reshape(C, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h*w, p*p*C), per image
        images = torch.rand(2, 3, 8, 12, device=device)
        patches, _ = patchify(images, 4)
        expected = torch.cat([x.reshape(3, 2, 4, 3, 4).permute(1, 3, 2, 4, 0).reshape(6, 48) for x in images])
        assert torch.equal(patches, expected)

    def test_order_matches_transformers(self):
        np = pytest.importorskip("numpy")
        module = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
        image = torch.rand(3, 8, 12)
        reference = module.convert_image_to_patches(image.numpy(), 4)  # channels-first (C, H, W)
        patches, _ = patchify(image[None], 4)
        assert torch.equal(patches, torch.from_numpy(np.asarray(reference)))

    def test_drop_remainder_equals_conv2d_with_stride_patch(self):
        # a Conv2d with kernel = stride = p (transformers' fixed-resolution patch embedding) floors the grid
        images = torch.rand(2, 3, 31, 20, dtype=torch.float64)
        conv = torch.nn.Conv2d(3, 5, kernel_size=7, stride=7, bias=False).double()
        expected = conv(images).flatten(2).transpose(1, 2).reshape(-1, 5)  # [B * 4 * 2, 5]
        patches, grid_thw = patchify(images, 7, drop_remainder=True)
        assert grid_thw.tolist() == [[1, 4, 2], [1, 4, 2]]
        weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # the Linear over (py, px, c)
        torch.testing.assert_close(patches @ weight.t(), expected, atol=1e-12, rtol=1e-12)

    def test_exception(self):
        with pytest.raises(ValueError, match="not divisible by patch_size 4"):
            patchify(torch.rand(1, 3, 10, 12), 4)
        with pytest.raises(ValueError, match="smaller than one patch"):
            patchify(torch.rand(1, 3, 3, 12), 4, drop_remainder=True)
        with pytest.raises(Exception, match="shape"):
            patchify(torch.rand(3, 8, 8), 4)

    def test_unpatchify_roundtrip(self, device, dtype):
        images = torch.rand(3, 3, 8, 4, device=device, dtype=dtype)
        frames = unpatchify(*patchify(images, 4), patch_size=4)
        assert torch.equal(torch.cat(frames), images)

    def test_gradcheck(self, device):
        images = torch.rand(1, 2, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: patchify(x, 2)[0], (images,))

    def test_dynamo(self, device, dtype):
        images = torch.rand(2, 3, 8, 8, device=device, dtype=dtype)
        compiled = torch.compile(lambda x: patchify(x, 4)[0], fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(images), patchify(images, 4)[0])


class TestGridThw:
    def test_seqlens_and_cu_seqlens(self, device):
        grid_thw = torch.tensor([[1, 2, 3], [2, 1, 4], [1, 5, 5]], device=device)
        assert grid_thw_to_seqlens(grid_thw).tolist() == [6, 4, 4, 25]
        cu_seqlens = grid_thw_to_cu_seqlens(grid_thw)
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 6, 10, 14, 39]

    def test_exception(self):
        with pytest.raises(ValueError, match=r"shape \(num_images, 3\)"):
            check_grid_thw(torch.ones(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="integers"):
            check_grid_thw(torch.ones(1, 3))
        with pytest.raises(ValueError, match="positive"):
            check_grid_thw(torch.tensor([[1, 0, 3]]))
        with pytest.raises(ValueError, match=r"describes 6 patches .* but patches has 7 rows"):
            check_grid_thw(torch.tensor([[1, 2, 3]]), num_tokens=7)


class TestPaddedPacked:
    def test_roundtrip(self, device, dtype):
        grid_thw = torch.tensor([[1, 2, 3], [1, 1, 2], [1, 3, 3]], device=device)
        seqlens = grid_thw_to_seqlens(grid_thw)
        tokens = torch.rand(int(seqlens.sum()), 12, device=device, dtype=dtype)
        padded, mask = packed_to_padded(tokens, seqlens, max_length=10)
        assert padded.shape == (3, 10, 12) and mask.sum().item() == tokens.shape[0]
        assert bool((padded[~mask] == 0).all())
        patches, grid_back = padded_to_packed(padded, mask.int(), grid_thw[:, 1:])
        assert torch.equal(patches, tokens) and torch.equal(grid_back, grid_thw)

    def test_exception(self):
        values = torch.rand(2, 6, 12)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
        with pytest.raises(ValueError, match="first h\\*w patches"):
            padded_to_packed(values, mask, torch.tensor([[2, 3], [1, 2]]))
        with pytest.raises(Exception, match="disagree"):
            padded_to_packed(values, mask[:, :5], torch.tensor([[2, 3], [1, 2]]))
        with pytest.raises(Exception, match="seqlens sum to 5"):
            packed_to_padded(torch.rand(4, 2), torch.tensor([3, 2]))

    def test_gradcheck(self):
        tokens = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: packed_to_padded(x, torch.tensor([3, 2]))[0], (tokens,))


class TestKeepMask:
    """Token dropping: ``keep_mask`` over the full grids, the kept patches packed."""

    def test_layout_counts_kept_tokens_per_frame(self):
        grid_thw = torch.tensor([[1, 2, 3], [2, 1, 4]])
        keep_mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0]).bool()  # frames of 6, 4, 4
        layout = ImageLayout.from_grid_thw(grid_thw, keep_mask=keep_mask)
        # by hand: frame 0 keeps places 0, 2, 3; frame 1 (t = 0 of the video) 7, 8, 9; frame 2 11
        assert layout.attention.seqlens_q == (3, 3, 1) and layout.pooling.seqlens_k == (3, 3, 1)
        assert layout.position_index.tolist() == [0, 2, 3, 7, 8, 9, 11]
        assert layout.grids == ((1, 2, 3), (2, 1, 4)) and layout.num_tokens == 7
        assert ImageLayout.from_grid_thw(grid_thw).position_index is None

    def test_packed_images_carries_mask(self):
        keep_mask = torch.tensor([True, False, True, True])
        packed = PackedImages(torch.rand(3, 12), torch.tensor([[1, 2, 2]]), keep_mask)
        moved = packed.to(torch.float64)
        assert moved.keep_mask is not None and torch.equal(moved.keep_mask, keep_mask)
        assert moved.layout.attention.seqlens_q == (3,)
        assert (
            pack_inputs(patches=packed.patches, grid_thw=packed.grid_thw, keep_mask=keep_mask, patch_size=2).keep_mask
            is not None
        )

    def test_exception(self):
        grid_thw = torch.tensor([[1, 2, 2]])
        with pytest.raises(TypeError, match="keep_mask must be a bool tensor"):
            PackedImages(torch.rand(3, 12), grid_thw, torch.tensor([1, 0, 1, 1]))
        with pytest.raises(ValueError, match=r"keep_mask must have shape \(4,\)"):
            PackedImages(torch.rand(3, 12), grid_thw, torch.ones(3, dtype=torch.bool))
        with pytest.raises(ValueError, match="keeps 4 patches but patches has 3 rows"):
            PackedImages(torch.rand(3, 12), grid_thw, torch.ones(4, dtype=torch.bool))
        with pytest.raises(ValueError, match="keeps no patch of frame"):
            _ = PackedImages(torch.rand(0, 12), grid_thw, torch.zeros(4, dtype=torch.bool)).layout
        with pytest.raises(ValueError, match=r"keep_mask .* packed patches"):
            pack_inputs(torch.rand(1, 3, 4, 4), keep_mask=torch.ones(4, dtype=torch.bool), patch_size=2)


class TestTracedLayouts:
    """Layouts a traced graph can hold: from sizes only, or as tensors computed from ``grid_thw`` in the graph."""

    def test_image_blocks_against_python(self):
        """Every patch's block, place and grid, against a loop over the grids in Python."""
        from kornia_siglip2.packing import image_blocks

        grids = [(1, 2, 3), (2, 1, 4), (1, 5, 5)]
        expected_index, expected_grid, block = [], [], 0
        for frames, height, width in grids:
            for _ in range(frames):
                for place in range(height * width):
                    expected_index.append(block * 25 + place)
                    expected_grid.append([height, width, place // width, place % width])
                block += 1
        index, mask, token_grid = image_blocks(torch.tensor(grids), 6 + 8 + 25, 4, 25)
        assert index.tolist() == expected_index and token_grid.tolist() == expected_grid
        assert mask.sum(-1).tolist() == [6, 4, 4, 25] and mask.shape == (4, 25)

    def test_from_tensors_matches_host_layout(self):
        grid_thw = torch.tensor([[1, 2, 3], [1, 4, 4], [1, 1, 1]])
        host = ImageLayout.from_grid_thw(grid_thw)
        traced = ImageLayout.from_tensors(grid_thw, 23, 3, 16)
        assert torch.equal(traced.attention.cu_seqlens_q, host.attention.cu_seqlens_q)
        assert torch.equal(traced.pooling.cu_seqlens_k, host.pooling.cu_seqlens_k)
        assert torch.equal(traced.token_grid, host.token_grid)
        assert traced.attention.num_sequences == host.attention.num_sequences == 3

    def test_uniform_equals_from_seqlens(self):
        uniform, reference = VarlenLayout.uniform(3, 4), VarlenLayout.from_seqlens([4, 4, 4])
        assert uniform.groups == reference.groups and uniform.seqlens_q == reference.seqlens_q
        assert torch.equal(uniform.cu_seqlens_q, reference.cu_seqlens_q)
        layout = ImageLayout.uniform(2, 2, 3)
        reference = ImageLayout.from_grid_thw(torch.tensor([[1, 2, 3], [1, 2, 3]]))
        assert layout.grids == reference.grids and layout.attention.groups == reference.attention.groups
        assert torch.equal(layout.pooling.cu_seqlens_k, reference.pooling.cu_seqlens_k)

    def test_layout_built_at_construction(self):
        """The host read happens when the batch is built: reading the layout later reads no tensor."""
        packed = PackedImages(torch.rand(6, 48), torch.tensor([[1, 2, 3]]))
        assert packed.prebuilt_layout is not None and packed.layout is packed.prebuilt_layout
        assert packed.to(torch.float64).layout is packed.layout  # same device: the same layout
        assert PackedImages.from_images(torch.rand(2, 3, 8, 8), 4).layout.token_grid is None
