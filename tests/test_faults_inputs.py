"""Bad inputs under faults: attention boundaries, grids, pixel ranges and dtypes, loss numerics (issue 14).

Each test names what main did before issue 14.
"""

import pytest
import torch

from kornia_siglip2.attention import varlen_attention
from kornia_siglip2.packing import ImageLayout, grid_thw_to_cu_seqlens, grid_thw_to_seqlens

CPU_BACKENDS = ("dense", "grouped", "loop", "eager")
EVERY_BACKEND = (*CPU_BACKENDS, "flash", "auto")


def _qkv(n: int = 10, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, n, 2, 8, generator=generator, dtype=dtype).unbind(0)


BAD_BOUNDARIES = {
    "list": ([0, 4, 10], None, TypeError, "wrap it with torch.tensor"),
    "float": (torch.tensor([0.0, 4.0, 10.0]), None, TypeError, "must hold integers"),
    "bool": (torch.tensor([False, True]), None, TypeError, "must hold integers"),
    "one boundary": (torch.tensor([0]), None, ValueError, "n >= 1"),
    "not from 0": (torch.tensor([1, 4, 10]), None, ValueError, "start at 0"),
    "decreasing": (torch.tensor([0, 6, 4, 10]), None, ValueError, "increase strictly"),
    "short total": (torch.tensor([0, 4, 9]), None, ValueError, "ends at 9 but there are 10 tokens"),
    "k count": (torch.tensor([0, 4, 10]), torch.tensor([0, 10]), ValueError, "cu_seqlens_k has 1 sequences"),
    "k total": (torch.tensor([0, 4, 10]), torch.tensor([0, 4, 11]), ValueError, "cu_seqlens_k ends at 11"),
    "k list": (torch.tensor([0, 4, 10]), [0, 4, 10], TypeError, "cu_seqlens_k must be a 1-D integer tensor"),
}


class TestBoundaries:
    @pytest.mark.parametrize("backend", EVERY_BACKEND)
    @pytest.mark.parametrize("case", list(BAD_BOUNDARIES))
    def test_every_backend_rejects(self, backend, case):
        """Main: dense accepted a cu_seqlens_k with another number of sequences (wrong results)."""
        cu_seqlens, cu_seqlens_k, error, message = BAD_BOUNDARIES[case]
        q, k, v = _qkv()
        with pytest.raises(error, match=message):
            varlen_attention(q, k, v, cu_seqlens, cu_seqlens_k=cu_seqlens_k, backend=backend)

    def test_flash_on_cpu_is_a_clear_error(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="flash attention backend needs float16 / bfloat16 CUDA tensors"):
            varlen_attention(q, k, v, torch.tensor([0, 4, 10]), backend="flash")


def test_dense_backend_too_large_for_memory_fails_fast():
    """Main: the dense backend tried to allocate the 2 x 200000 x 200000 scores (then an out-of-memory error)."""
    query = torch.zeros(200_000, 2, 8)
    with pytest.raises(ValueError, match=r"backend='dense' needs about .* GiB .*use backend='grouped'"):
        varlen_attention(query, query, query, torch.tensor([0, 100_000, 200_000]), backend="dense")


class TestNonFiniteIsolation:
    """Main: with backend='dense' one NaN image made every other image of the batch NaN."""

    @pytest.mark.parametrize("backend", CPU_BACKENDS)
    @pytest.mark.parametrize("where", ["key", "value", "query"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_other_sequences_unchanged(self, backend, where, bad):
        q, k, v = _qkv()
        cu_seqlens = torch.tensor([0, 4, 7, 10])
        clean = [
            varlen_attention(q[a:b], k[a:b], v[a:b], torch.tensor([0, b - a]), backend="loop")
            for a, b in ((4, 7), (7, 10))
        ]
        poisoned = {"query": q, "key": k, "value": v}[where].clone()
        poisoned[1, 0, 0] = bad
        inputs = {"query": q, "key": k, "value": v, where: poisoned}
        out = varlen_attention(inputs["query"], inputs["key"], inputs["value"], cu_seqlens, backend=backend)
        torch.testing.assert_close(out[4:], torch.cat(clean), atol=1e-12, rtol=1e-12)
        if where == "query" and backend in ("grouped", "loop"):
            # torch 2.13's CPU flash SDPA kernel (the fast path of grouped, and of loop since issue 29) returns zeros
            # for a NaN query row instead of NaN (the math kernel gives NaN): a torch quirk, recorded here, not an
            # isolation failure.
            return
        assert not torch.isfinite(out[:4]).all()  # the poisoned sequence does not come out clean

    def test_nan_stays_in_its_head_and_channel(self):
        q, k, v = _qkv()
        v = v.clone()
        v[1, 0, 3] = float("nan")
        out = varlen_attention(q, k, v, torch.tensor([0, 4, 10]), backend="dense")
        expected = varlen_attention(q, k, v, torch.tensor([0, 4, 10]), backend="loop")
        assert torch.equal(out.isnan(), expected.isnan())

    def test_cross_attention_with_key_padding(self):
        from kornia_siglip2.packing import VarlenLayout

        q, k, v = _qkv(6)
        k = k.clone()
        k[4, 1, 0] = float("nan")  # sequence 1's key, head 1
        layout = VarlenLayout.from_seqlens([3, 3], [3, 3])
        out = varlen_attention(q, k, v, layout=layout, backend="dense")
        torch.testing.assert_close(out[:3], varlen_attention(q[:3], k[:3], v[:3], torch.tensor([0, 3])))
        assert out[3:, 1].isnan().all() and torch.isfinite(out[3:, 0]).all()


class TestGrids:
    def test_int32_overflow(self):
        """Main: a RuntimeError from torch ('cannot be converted to type int32 without overflow')."""
        for grid in ([[1, 50000, 50000]], torch.tensor([[1, 50000, 50000]])):
            with pytest.raises(ValueError, match=r"more than int32 cu_seqlens can index.*split"):
                ImageLayout.from_grid_thw(grid)
        with pytest.raises(ValueError, match=r"2500000000 patches, more than int32 cu_seqlens"):
            grid_thw_to_cu_seqlens(torch.tensor([[1, 50000, 50000]]))

    def test_empty_grid(self):
        """Main: an empty layout, later 'torch.cat(): expected a non-empty list'."""
        with pytest.raises(ValueError, match=r"describes no image \(shape \(0, 3\)\)"):
            ImageLayout.from_grid_thw(torch.zeros(0, 3, dtype=torch.long))

    @pytest.mark.parametrize("grid", [[[1, 2.7, 3]], [[1, 2.0, 3]]])
    def test_float_list_grid(self, grid):
        """Main: [[1, 2.7, 3]] was truncated to (1, 2, 3)."""
        with pytest.raises(ValueError, match="grid_thw must hold integers"):
            ImageLayout.from_grid_thw(grid)

    @pytest.mark.parametrize("grid", [[[1, 2, 3], [1, 2]], [["a", "b", "c"]], [[1, -2, 3]]])
    def test_other_bad_list_grids(self, grid):
        with pytest.raises(ValueError, match="grid_thw"):
            ImageLayout.from_grid_thw(grid)

    def test_list_grid_still_works(self):
        assert ImageLayout.from_grid_thw([[1, 2, 3], [2, 1, 4]]).attention.seqlens_q == (6, 4, 4)

    @pytest.mark.parametrize("grid_dtype", [torch.int8, torch.uint8, torch.int16])
    def test_small_integer_grids(self, grid_dtype):
        """Main: int8 raised NotImplementedError ('repeat_interleave_cpu' not implemented for 'Char')."""
        grid = torch.tensor([[1, 16, 16], [2, 3, 5]], dtype=grid_dtype)
        assert grid_thw_to_seqlens(grid).tolist() == [256, 15, 15]
        assert grid_thw_to_cu_seqlens(grid).tolist() == [0, 256, 271, 286]


class TestPixelRange:
    """Main took float images in [0, 255] or [-1, 1] silently (NaFlex values up to ~470; fixed path clamped)."""

    @pytest.fixture(params=["fixed", "naflex"])
    def preprocessor(self, request):
        from kornia_siglip2.preprocess import NaFlexImagePreprocessor, SigLipImagePreprocessor

        if request.param == "fixed":
            return SigLipImagePreprocessor(image_size=16)
        return NaFlexImagePreprocessor(patch_size=4, max_num_patches=16)

    @pytest.mark.parametrize("scale", ["0-255", "minus-one-one"])
    def test_out_of_range_is_an_error(self, preprocessor, scale):
        images = torch.rand(2, 3, 12, 20)
        images = images * 255 if scale == "0-255" else images * 2 - 1
        with pytest.raises(ValueError, match=r"Float images must be in \[0, 1\].*For 0-255 data pass a uint8"):
            preprocessor(images)
        with pytest.raises(ValueError, match=r"Float images must be in \[0, 1\]"):
            preprocessor([images[0], images[1, :, :8]])

    def test_rounding_is_accepted(self, preprocessor):
        images = torch.rand(2, 3, 12, 20)
        images[0, 0, 0, 0], images[1, 0, 0, 0] = 1 + 1e-4, -1e-4
        preprocessor(images)  # no error
        preprocessor(images.to(torch.uint8))

    def test_non_finite_is_an_error(self, preprocessor):
        images = torch.rand(1, 3, 12, 20)
        images[0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            preprocessor(images)

    def test_gradients_still_flow(self, preprocessor):
        images = torch.rand(1, 3, 12, 20, requires_grad=True)
        out = preprocessor(images)
        (out.patches if hasattr(out, "patches") else out).sum().backward()
        assert images.grad is not None


class TestModelInputDtypes:
    @pytest.fixture(scope="class")
    def model(self, siglip2_checkpoint):
        from kornia_siglip2 import SigLip2

        return SigLip2.from_pretrained(siglip2_checkpoint)

    def test_uint8_pixel_values(self, model):
        with pytest.raises(TypeError, match=r"pixel_values must be a floating tensor.*run the image processor"):
            model.get_image_features(pixel_values=torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8))

    @pytest.mark.parametrize("patch_dtype", [torch.bool, torch.int8, torch.uint8, torch.int64])
    def test_non_float_patches(self, model, patch_dtype):
        """Already an error on main since the boundary redesign (vision.py); kept as a regression test."""
        patches = torch.randint(0, 2, (16, 48)).to(patch_dtype)
        with pytest.raises(TypeError, match=rf"patches must be a floating tensor.*got {patch_dtype}"):
            model.get_image_features(patches=patches, grid_thw=torch.tensor([[1, 4, 4]]))


def _transformers_rgb(image):
    """transformers' ``convert_to_rgb`` of ``image``; skips where that release drops alpha instead of compositing.

    transformers 5.24 composites transparent pixels on white (what ``load_image`` does); older releases (5.6)
    called ``image.convert("RGB")``, which keeps the colour under a transparent pixel.
    """
    import transformers
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    probe = convert_to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0)))
    if probe.getpixel((0, 0)) != (255, 255, 255):
        pytest.skip(
            f"transformers {transformers.__version__}'s convert_to_rgb drops alpha; ours composites on white as 5.24"
        )
    return convert_to_rgb(image)


class TestPilParity:
    """EXIF and transparency of PIL inputs, against transformers' own functions (issue 14's parity gaps)."""

    @pytest.fixture
    def rotated_jpeg(self, tmp_path):
        import numpy as np
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
        return tmp_path / "rotated.jpg"

    @pytest.fixture
    def transparent_png(self, tmp_path):
        import numpy as np
        from PIL import Image

        rgba = np.random.default_rng(1).integers(0, 256, (20, 24, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
        return tmp_path / "transparent.png"

    def test_exif_pil_equals_path_and_transformers_load_image(self, rotated_jpeg):
        """Main: load_image(PIL image) ignored the EXIF orientation (paths applied it)."""
        import numpy as np
        from PIL import Image
        from transformers.image_utils import load_image as hf_load_image

        from kornia_siglip2.images import image_tensor, load_image

        expected = torch.from_numpy(np.array(hf_load_image(str(rotated_jpeg)))).permute(2, 0, 1)
        assert expected.shape == (3, 24, 20)
        with Image.open(rotated_jpeg) as opened:
            assert torch.equal(load_image(opened), expected)
        with Image.open(rotated_jpeg) as opened:
            assert torch.equal(image_tensor(opened), expected)
        assert torch.equal(load_image(rotated_jpeg), expected)

    def test_rgba_is_composited_on_white_as_convert_to_rgb(self, transparent_png):
        """Paths and PIL images give the same pixels: transformers' convert_to_rgb (white background)."""
        import numpy as np
        from PIL import Image

        from kornia_siglip2.images import load_image

        with Image.open(transparent_png) as opened:
            expected = torch.from_numpy(np.array(_transformers_rgb(opened))).permute(2, 0, 1)
            from_pil = load_image(opened)
        assert torch.equal(load_image(transparent_png), expected) and torch.equal(from_pil, expected)

    def test_documented_difference_with_transformers_path_loader(self, transparent_png):
        """transformers' load_image(path) drops alpha instead (documented in load_image); this test keeps it true."""
        import numpy as np
        from PIL import Image
        from transformers.image_utils import load_image as hf_load_image

        from kornia_siglip2.images import load_image

        dropped = torch.from_numpy(np.array(hf_load_image(str(transparent_png)))).permute(2, 0, 1)
        assert not torch.equal(load_image(transparent_png), dropped)
        with Image.open(transparent_png) as opened:  # the documented way to get transformers' path behaviour
            assert torch.equal(load_image(opened.convert("RGB")), dropped)

    def test_rgb_with_transparency_key_is_composited(self, tmp_path):
        import numpy as np
        from PIL import Image

        from kornia_siglip2.images import load_image

        pixels = np.zeros((4, 5, 3), dtype=np.uint8)
        pixels[0, 0] = (10, 20, 30)
        Image.fromarray(pixels).save(tmp_path / "keyed.png", transparency=(0, 0, 0))
        with Image.open(tmp_path / "keyed.png") as opened:
            expected = torch.from_numpy(np.array(_transformers_rgb(opened))).permute(2, 0, 1)
        assert int(expected[:, 1, 1].min()) == 255  # the keyed colour became white
        assert torch.equal(load_image(tmp_path / "keyed.png"), expected)


def test_eager_backend_too_large_for_memory_fails_fast():
    """Issue 29, main: backend='eager' tried to allocate the explicit 2 x 100000 x 100000 scores and died."""
    query = torch.zeros(200_000, 2, 8)
    with pytest.raises(ValueError, match=r"backend='eager' needs about .* GiB .*use backend='grouped' or 'loop'"):
        varlen_attention(query, query, query, torch.tensor([0, 100_000, 200_000]), backend="eager")


def test_loop_backend_memory_is_linear_in_the_tokens():
    """Issue 29, main: backend='loop' on one long sequence took SDPA's math path (H x L x L scores: 2 GiB here).

    Run in a process of its own: its peak resident memory must stay far below the scores' size, and the output
    equal the grouped backend's.
    """
    import subprocess
    import sys

    script = """
import resource, torch
from kornia_siglip2.attention import varlen_attention
torch.set_num_threads(1)
tokens = 16_384
query, key, value = torch.randn(3, tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
cu_seqlens = torch.tensor([0, tokens])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loop = varlen_attention(query, key, value, cu_seqlens, backend="loop")
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
grouped = varlen_attention(query, key, value, cu_seqlens, backend="grouped")
torch.testing.assert_close(loop, grouped, rtol=1e-5, atol=1e-6)
print(grew)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    scores_mib = 2 * 16_384**2 * 4 / 2**20  # 2048 MiB
    assert float(result.stdout) < scores_mib / 8


@pytest.mark.parametrize(
    "seqlens",
    [torch.tensor([2.5, 2.5]), torch.tensor([True, False]), torch.tensor([[3, 2]]), torch.tensor([6, -1])],
    ids=["float", "bool", "2-D", "negative"],
)
def test_packed_to_padded_refuses_non_integer_lengths(seqlens):
    """Issue 29, main: float lengths were accepted (and truncated by the comparison)."""
    from kornia_siglip2.packing import packed_to_padded

    with pytest.raises(ValueError, match="seqlens must"):
        packed_to_padded(torch.zeros(5, 3), seqlens)
