import json

import numpy as np
import pytest
import torch

from kornia_siglip2.errors import TypeCheckError, ValueCheckError
from kornia_siglip2.packing import patchify
from kornia_siglip2.preprocess import (
    PREPROCESSOR_CONFIG_NAME,
    NaFlexImagePreprocessor,
    PackedImages,
    SigLip2ImagePreprocessor,
    SigLipImagePreprocessor,
    naflex_target_size,
    to_padded,
)
from kornia_siglip2.resample import pil_resize

# uint8 images take Pillow's integer arithmetic (kornia_siglip2.resample) and equal transformers' output exactly.
# The bounds below are for float images, resized in full precision by F.interpolate (differentiable).
# One uint8 step after rescale 1/255 and normalize with std 0.5.
ONE_LEVEL = 2 / 255
# transformers returns float32, so an exact one-level gap reads up to ~1e-8 larger.
FP32_SLACK = 1e-6
# PIL rounds to uint8 after each 1-D pass, 0.5 level each time. Bilinear weights are non-negative and sum to 1,
# so the exact (float64) result is within 1 level of PIL's.
BILINEAR_BOUND = ONE_LEVEL + FP32_SLACK
# Bicubic cannot stay within one level: the 0.5-level rounding after PIL's first pass goes through the second
# pass's cubic weights, whose absolute sum reaches 1.25 (a = -0.5 at phase 0.5), then 0.5 more at the end:
# 0.5 * 1.25 + 0.5 = 1.125 levels (0.0088). Measured: 1.114 levels (0.0087).
BICUBIC_BOUND = 1.125 * ONE_LEVEL + FP32_SLACK
# float32 adds torch's own rounding of the sampling coordinates (up to 0.053 level for a 4000-pixel side).
FLOAT32_VS_FLOAT64 = 0.1 * ONE_LEVEL


def assert_parity(preprocess, images, reference, bound, to_values=lambda output: output):
    """uint8 ``images`` equal transformers exactly; as float images, float64 output within ``bound`` of it and
    float32 within float32 rounding of float64."""
    from_uint8 = to_values(preprocess(images))
    assert from_uint8.dtype == torch.float32
    assert torch.equal(from_uint8, reference), f"{(from_uint8 - reference).abs().max() / ONE_LEVEL:.4f} levels"
    exact = to_values(preprocess.double()([image.double() / 255 for image in images]))
    assert exact.dtype == torch.float64
    difference = (exact.float() - reference).abs().max().item()
    assert difference <= bound, f"{difference / ONE_LEVEL:.4f} levels"
    single = to_values(preprocess.float()([image.float() / 255 for image in images]))
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, exact.float(), rtol=0, atol=FLOAT32_VS_FLOAT64)
    return exact


def make_images(sizes, seed=0):
    """uint8 (3, H, W) images alternating noise, smooth gradients and 0/255 edges (worst case for cubic)."""
    generator = np.random.default_rng(seed)
    images = []
    for index, (height, width) in enumerate(sizes):
        kind = index % 3
        if kind == 0:
            image = generator.integers(0, 256, (3, height, width))
        elif kind == 1:
            y, x = np.mgrid[0:height, 0:width]
            image = np.stack([127 + 120 * np.sin(x / 5 + y / 7), x * 255 / width, y * 255 / height])
        else:
            image = generator.integers(0, 2, (3, height, width)) * 255
        images.append(torch.from_numpy(image.astype(np.uint8)))
    return images


# tiny, extreme aspect ratios (both ways), up- and downscaling, one side unchanged, large
PARITY_SIZES = [(1, 1), (2, 3), (300, 1), (5, 400), (400, 5), (17, 31), (64, 64), (100, 1000), (333, 500), (480, 640)]


def hf_naflex(images, patch_size, max_num_patches):
    # without torchvision transformers' Siglip2ImageProcessor *is* this PIL backend
    module = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    processor = module.Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=max_num_patches)
    return processor(images, return_tensors="pt", input_data_format="channels_first")


def hf_fixed(images, image_size, resample):
    module = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    processor = module.SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=resample)
    return processor(images, return_tensors="pt", input_data_format="channels_first")["pixel_values"]


class TestNaFlexTargetSize:
    def test_reference_examples(self):
        # transformers' get_image_size_for_max_num_patches, p = 16
        assert naflex_target_size(480, 640, 16, 256) == (224, 288)
        assert naflex_target_size(224, 224, 16, 256) == (256, 256)
        assert naflex_target_size(1000, 100, 16, 256) == (800, 80)
        assert naflex_target_size(480, 640, 16, 1024) == (432, 576)

    def test_matches_transformers(self):
        module = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
        reference = module.get_image_size_for_max_num_patches
        sides = [1, 2, 3, 7, 15, 16, 17, 30, 31, 32, 33, 63, 100, 224, 255, 256, 257, 384, 480, 512]
        sides += [640, 720, 999, 1000, 1024, 1080, 1920, 2048, 3000, 4000]
        shapes = [(height, width) for height in sides for width in sides]
        # extreme aspect ratios: thin strips whose long side alone exceeds the budget
        shapes += [(1, 4000), (4000, 1), (2, 3999), (30, 4000), (4000, 30), (5, 10000), (10000, 7), (1, 257)]
        compared = 0
        for max_num_patches in (64, 256, 1024):
            for patch_size in (14, 16):
                for height, width in shapes:
                    expected = reference(height, width, patch_size, max_num_patches)
                    assert naflex_target_size(height, width, patch_size, max_num_patches) == expected
                    compared += 1
        assert compared == 6 * (len(sides) ** 2 + 8)  # 5448 size/budget/patch combinations

    def test_budget(self):
        for height, width in [(1, 1), (480, 640), (30, 4000), (4000, 30)]:
            target_h, target_w = naflex_target_size(height, width, 16, 256)
            assert target_h % 16 == 0 and target_w % 16 == 0
            assert (target_h // 16) * (target_w // 16) <= 256

    def test_exception(self):
        with pytest.raises(ValueError, match="must be positive"):
            naflex_target_size(0, 10)
        with pytest.raises(ValueError, match="must be positive"):
            naflex_target_size(10, 10, 16, 0)


class TestNaFlexImagePreprocessor:
    def test_smoke(self, device, dtype):
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=16).to(device)
        packed = preprocess(torch.rand(2, 3, 12, 20, device=device, dtype=dtype))
        assert isinstance(packed, PackedImages)
        assert packed.patches.device.type == device.type and packed.patches.dtype == dtype
        assert packed.grid_thw.tolist() == [[1, 3, 5], [1, 3, 5]]  # 12x20 -> 12x20 (15 patches)
        assert "max_num_patches=16" in repr(preprocess)

    def test_cardinality(self, device, dtype):
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=16)
        sizes = [(4, 4), (1, 50), (9, 7), (30, 2)]
        images = [torch.rand(3, h, w, device=device, dtype=dtype) for h, w in sizes]
        patches, grid_thw = preprocess(images)
        expected = [naflex_target_size(h, w, 4, 16) for h, w in sizes]
        assert grid_thw.tolist() == [[1, h // 4, w // 4] for h, w in expected]
        assert patches.shape == (int(grid_thw.prod(-1).sum()), 4 * 4 * 3)
        assert bool((grid_thw.prod(-1) <= 16).all())

    def test_batch_equals_list(self, device):
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=9)
        images = torch.rand(3, 3, 10, 14, device=device)
        batched, listed = preprocess(images), preprocess(list(images))
        assert torch.equal(batched.grid_thw, listed.grid_thw)
        torch.testing.assert_close(batched.patches, listed.patches)

    def test_uint8_paths(self, device):
        images = torch.randint(0, 256, (2, 3, 7, 13), dtype=torch.uint8, device=device)
        # pil_exact=False: uint8 is the float path on images / 255
        float_path = NaFlexImagePreprocessor(patch_size=4, max_num_patches=9, pil_exact=False)
        assert "pil_exact=False" in repr(float_path)
        from_float = float_path(images.float() / 255)
        torch.testing.assert_close(float_path(images).patches, from_float.patches)
        # default: Pillow's integer resize, then rescale and normalize
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=9)
        from_uint8 = preprocess(images)
        assert from_uint8.patches.dtype == torch.float32
        size = naflex_target_size(7, 13, patch_size=4, max_num_patches=9)
        resized = pil_resize(images, size, "bilinear").float() / 255 * 2 - 1
        torch.testing.assert_close(from_uint8.patches, patchify(resized, 4)[0], rtol=0, atol=1e-7)
        # the two paths differ by the intermediate rounding only: within one level for bilinear
        assert 0 < (from_uint8.patches - from_float.patches).abs().max() <= ONE_LEVEL + FP32_SLACK

    def test_exception(self):
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=9)
        with pytest.raises(ValueCheckError, match=r"\(B, 3, H, W\)"):
            preprocess(torch.rand(2, 4, 8, 8))  # 4 channels
        with pytest.raises(ValueCheckError, match=r"\(B, 3, H, W\)"):
            preprocess(torch.rand(3, 8, 8))  # a single image without its batch dimension
        with pytest.raises(ValueCheckError, match=r"images\[1\] must be a \(3, H, W\)"):
            preprocess([torch.rand(3, 8, 8), torch.rand(1, 8, 8)])
        with pytest.raises(ValueCheckError, match="non-empty list"):
            preprocess([])
        with pytest.raises(ValueCheckError, match="empty batch"):
            preprocess(torch.rand(0, 3, 8, 8))
        with pytest.raises(ValueCheckError, match="uint8 or float"):
            preprocess(torch.ones(1, 3, 8, 8, dtype=torch.int32))
        with pytest.raises(ValueCheckError, match="share dtype and device"):
            preprocess([torch.rand(3, 8, 8), torch.rand(3, 8, 8, dtype=torch.float64)])
        with pytest.raises(TypeCheckError, match=r"images\[0\] must be a tensor"):
            preprocess(["not an image"])
        with pytest.raises(ValueCheckError, match="positive height and width"):
            preprocess(torch.rand(1, 3, 0, 8))
        with pytest.raises(ValueError, match="must be positive"):
            NaFlexImagePreprocessor(max_num_patches=0)
        with pytest.raises(ValueError, match="LANCZOS"):
            NaFlexImagePreprocessor(resample=1)
        with pytest.raises(ValueError, match="one value per channel"):
            NaFlexImagePreprocessor(image_mean=(0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
    def test_matches_transformers(self, max_num_patches):
        images = make_images([*PARITY_SIZES, (30, 4000)], seed=max_num_patches)
        reference = hf_naflex(images, 16, max_num_patches)
        preprocess = NaFlexImagePreprocessor(16, max_num_patches)
        padded = to_padded(preprocess(images), max_num_patches)
        assert padded.pixel_values.shape == reference["pixel_values"].shape
        assert padded.pixel_attention_mask.dtype == reference["pixel_attention_mask"].dtype == torch.int32
        assert torch.equal(padded.pixel_attention_mask, reference["pixel_attention_mask"])
        assert torch.equal(padded.spatial_shapes, reference["spatial_shapes"])
        assert_parity(
            preprocess,
            images,
            reference["pixel_values"],
            BILINEAR_BOUND,
            lambda packed: to_padded(packed, max_num_patches)[0],
        )

    def test_gradcheck(self):
        preprocess = NaFlexImagePreprocessor(patch_size=2, max_num_patches=6).double()
        big = torch.rand(3, 5, 7, dtype=torch.float64, requires_grad=True)  # downscaled to 4x6
        small = torch.rand(3, 2, 3, dtype=torch.float64, requires_grad=True)  # upscaled to 4x6
        assert torch.autograd.gradcheck(lambda x, y: preprocess([x, y]).patches, (big, small))

    def test_dynamo(self, device, dtype):
        preprocess = NaFlexImagePreprocessor(patch_size=4, max_num_patches=12).to(device)
        images = torch.rand(2, 3, 10, 14, device=device, dtype=dtype)
        compiled = torch.compile(preprocess)
        expected, actual = preprocess(images), compiled(images)
        assert torch.equal(actual.grid_thw, expected.grid_thw)
        torch.testing.assert_close(actual.patches, expected.patches)


class TestToPadded:
    def test_smoke(self, device, dtype):
        patches = torch.rand(6 + 2, 12, device=device, dtype=dtype)
        grid_thw = torch.tensor([[1, 2, 3], [1, 1, 2]], device=device)
        pixel_values, mask, spatial_shapes = to_padded(PackedImages(patches, grid_thw), max_num_patches=7)
        assert pixel_values.shape == (2, 7, 12) and pixel_values.dtype == dtype
        assert mask.dtype == torch.int32 and mask.sum(-1).tolist() == [6, 2]
        assert spatial_shapes.dtype == torch.int64 and spatial_shapes.tolist() == [[2, 3], [1, 2]]
        assert torch.equal(pixel_values[0, :6], patches[:6]) and not pixel_values[1, 2:].any()

    def test_exception(self):
        packed = PackedImages(torch.rand(6, 12), torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueCheckError, match="shorter than a sequence"):
            to_padded(packed, max_num_patches=5)
        with pytest.raises(ValueCheckError, match=r"rows \(1, h, w\)"):
            to_padded(PackedImages(torch.rand(12, 12), torch.tensor([[2, 2, 3]])), max_num_patches=6)
        with pytest.raises(ValueError, match="sum of t"):
            to_padded(PackedImages(torch.rand(5, 12), torch.tensor([[1, 2, 3]])), max_num_patches=6)


class TestSigLipImagePreprocessor:
    def test_smoke(self, device, dtype):
        preprocess = SigLipImagePreprocessor(image_size=8).to(device)
        pixel_values = preprocess(torch.rand(2, 3, 13, 9, device=device, dtype=dtype))
        assert pixel_values.shape == (2, 3, 8, 8)
        assert pixel_values.device.type == device.type and pixel_values.dtype == dtype
        assert "image_size=(8, 8)" in repr(preprocess)

    def test_cardinality(self, device, dtype):
        preprocess = SigLipImagePreprocessor(image_size=(6, 10), resample="bilinear")
        images = [torch.rand(3, h, w, device=device, dtype=dtype) for h, w in [(1, 1), (6, 10), (40, 3)]]
        pixel_values = preprocess(images)
        assert pixel_values.shape == (3, 3, 6, 10)
        # an image already at the target size is only normalized, as PIL returns it unchanged
        torch.testing.assert_close(pixel_values[1], images[1] * 2 - 1)
        # float images in [0, 1] land in [-1, 1]; bicubic overshoot is clipped like PIL's
        bicubic = SigLipImagePreprocessor(image_size=32)((torch.rand(2, 3, 5, 70, device=device) > 0.5).float())
        assert bicubic.min() >= -1 and bicubic.max() <= 1

    def test_exception(self):
        preprocess = SigLipImagePreprocessor(image_size=8)
        with pytest.raises(ValueCheckError, match=r"\(B, 3, H, W\)"):
            preprocess(torch.rand(2, 1, 8, 8))
        with pytest.raises(ValueCheckError, match="non-empty list"):
            preprocess(())
        with pytest.raises(ValueError, match="image_size"):
            SigLipImagePreprocessor(image_size=(8, 8, 8))
        with pytest.raises(ValueError, match="'bilinear' \\(PIL 2\\) or 'bicubic'"):
            SigLipImagePreprocessor(resample="lanczos")

    @pytest.mark.parametrize(("resample", "bound"), [(3, BICUBIC_BOUND), (2, BILINEAR_BOUND)])
    def test_matches_transformers(self, resample, bound):
        images = make_images(PARITY_SIZES, seed=resample)
        for image_size in (32, 224):
            reference = hf_fixed(images, image_size, resample)
            preprocess = SigLipImagePreprocessor(image_size, resample=resample)
            pixel_values = assert_parity(preprocess, images, reference, bound)
            assert pixel_values.shape == reference.shape
            # the excess over one level is a rare pile-up of both roundings
            assert ((pixel_values - reference).abs() > ONE_LEVEL + FP32_SLACK).double().mean() < 1e-3

    @pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
    def test_gradcheck(self, resample):
        preprocess = SigLipImagePreprocessor(image_size=4, resample=resample).double()
        # 0.2-0.8 keeps the cubic's clip inactive, where it would be non-differentiable
        images = (0.2 + 0.6 * torch.rand(1, 3, 7, 3, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(preprocess, (images,))

    def test_dynamo(self, device, dtype):
        preprocess = SigLipImagePreprocessor(image_size=8).to(device)
        images = torch.rand(2, 3, 13, 5, device=device, dtype=dtype)
        torch.testing.assert_close(torch.compile(preprocess)(images), preprocess(images))

    def test_dynamo_uint8(self, device):
        """The Pillow-exact integer path compiles too, and stays bit-identical."""
        preprocess = SigLipImagePreprocessor(image_size=8).to(device)
        images = torch.randint(0, 256, (2, 3, 13, 9), dtype=torch.uint8, device=device)
        assert torch.equal(torch.compile(preprocess)(images), preprocess(images))


class TestFromPretrained:
    def test_naflex_from_transformers_config(self, tmp_path):
        module = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
        module.Siglip2ImageProcessorPil(patch_size=14, max_num_patches=64).save_pretrained(tmp_path)
        preprocess = SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        assert isinstance(preprocess, NaFlexImagePreprocessor)
        assert (preprocess.patch_size, preprocess.max_num_patches, preprocess.resample) == (14, 64, "bilinear")
        assert NaFlexImagePreprocessor.from_pretrained(tmp_path, max_num_patches=1024).max_num_patches == 1024
        # the JSON file itself works too
        assert isinstance(
            SigLip2ImagePreprocessor.from_pretrained(tmp_path / PREPROCESSOR_CONFIG_NAME), type(preprocess)
        )

    def test_fixed_from_transformers_config(self, tmp_path):
        module = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
        size = {"height": 384, "width": 384}
        module.SiglipImageProcessorPil(size=size, resample=2, image_mean=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
        preprocess = SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        assert isinstance(preprocess, SigLipImagePreprocessor)
        assert (preprocess.image_size, preprocess.resample) == ((384, 384), "bilinear")
        assert preprocess.image_mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
        with pytest.raises(ValueError, match="not a NaFlexImagePreprocessor"):
            NaFlexImagePreprocessor.from_pretrained(tmp_path)

    def test_from_config(self):
        config = {"image_processor_type": "SiglipImageProcessorFast", "do_normalize": False}
        preprocess = SigLip2ImagePreprocessor.from_config(config)
        assert preprocess.resample == "bicubic" and preprocess.image_size == (224, 224)
        assert torch.equal(preprocess(torch.ones(1, 3, 224, 224)), torch.ones(1, 3, 224, 224))

    def test_exception(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"has no preprocessor_config\.json"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        config_file = tmp_path / PREPROCESSOR_CONFIG_NAME
        config_file.write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        config_file.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
        with pytest.raises(ValueError, match="Unknown image_processor_type 'CLIPImageProcessor'"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        config_file.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor", "do_center_crop": True}))
        with pytest.raises(ValueError, match="Unsupported preprocessor settings do_center_crop"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path)
        config_file.write_text(json.dumps({"image_processor_type": "Siglip2ImageProcessor", "resample": 1}))
        with pytest.raises(ValueError, match="LANCZOS"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path)

    def test_hub_cache_miss(self, tmp_path):
        # local_files_only: answered from the (empty) cache, never the network
        with pytest.raises(FileNotFoundError, match="hub lookup failed"):
            SigLip2ImagePreprocessor.from_pretrained(
                "kornia-siglip2-tests/no-such-repo", cache_dir=tmp_path, local_files_only=True
            )
        with pytest.raises(FileNotFoundError, match="not a local folder"):
            SigLip2ImagePreprocessor.from_pretrained(tmp_path / "missing" / "folder", local_files_only=True)


# transformers 5.24's torchvision image processors (torchvision 0.29.1, torch 2.14.1, CPU with AVX-512) on
# scripts/torchvision_reference.py's images, from that script's output: SHA-256 of the float32 pixel_values, their
# sum, and the largest gap to transformers' PIL backend in uint8 levels (the difference the backend makes).
TORCHVISION_REFERENCE = {
    ("fixed", 0): ("3a65a83088c5b8d3f6b2eb795691f6c57b54c27ebc8c74117e1ca4414cab6cf7", -3493.7804168034345, 1),
    ("fixed", 1): ("2999d19ae36247392f450221bafb6c71dfd954ae0863fc4aadd18095c25ce2b0", -3929.176495403517, 1),
    ("fixed", 2): ("ff050691e2408194ce28b1e7baa5544a3193459171c2a5c92aaa4d9b2dc5e4c9", -3347.364699574653, 1),
    ("fixed", 3): ("645a7d87770bb01d68310cee94812b965ac4170a697181706de284c45bca2374", -3745.6627764627337, 1),
    ("naflex", 0): ("d12ee214d593e51758773e4b2f47bd50f8a6f73cac7dab0df09852c9f090d202", -4483.764736868441, 1),
    ("naflex", 1): ("61ed239765fbf8346ad108c461e169d714bf372f6fe75a1b55600138dbba58d8", -5017.215718735941, 2),
    ("naflex", 2): ("c9d390deee3882a7b1aa23c7e04db199553691f0fcc74db82ab62e471f878746", -4299.796078316402, 1),
    ("naflex", 3): ("1e2db421c6651d4a23c7aeb311de32e0f92030051de7eb2cf805cebb98b4ba8a", -4923.772586251609, 1),
}


def _reference_images():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from torchvision_reference import digest, reference_images
    finally:
        sys.path.pop(0)
    return reference_images(), digest


@pytest.mark.parametrize("kind", ["fixed", "naflex"])
def test_torchvision_backend_equals_transformers_torchvision_processor(kind):
    """backend="torchvision": bit-exact pixel_values of transformers' default (torchvision) image processors."""
    images, digest = _reference_images()
    if kind == "fixed":
        preprocess = SigLipImagePreprocessor(224, backend="torchvision")
        pil = SigLipImagePreprocessor(224)
    else:
        preprocess = NaFlexImagePreprocessor(16, 256, backend="torchvision")
        pil = NaFlexImagePreprocessor(16, 256)

    def pixel_values(preprocessor, image):
        out = preprocessor(image)
        return out[0] if kind == "fixed" else to_padded(out, 256).pixel_values[0]

    for index, image in enumerate(images):
        expected_digest, expected_sum, expected_levels = TORCHVISION_REFERENCE[(kind, index)]
        ours = pixel_values(preprocess, image)  # a numpy (H, W, 3) image, as transformers takes it
        assert digest(ours) == expected_digest, (kind, index)
        assert ours.double().sum().item() == pytest.approx(expected_sum, abs=1e-9)
        levels = ((ours - pixel_values(pil, image)) * 127.5).abs().round().max().item()
        assert levels == expected_levels, (kind, index)  # the PIL backend is the other transformers result
    assert "backend='torchvision'" in repr(preprocess) and not preprocess.pil_exact
    with pytest.raises(ValueError, match="backend must be one of"):
        SigLipImagePreprocessor(224, backend="opencv")


@pytest.mark.parametrize("kind", ["fixed", "naflex"])
def test_pil_numpy_and_tensor_images_alike(kind):
    """The same image as a PIL image, an (H, W, 3) / (3, H, W) array or a tensor gives the same output."""
    from PIL import Image

    array = make_images([(20, 36)], seed=3)[0].permute(1, 2, 0).numpy()
    preprocess = SigLipImagePreprocessor(16) if kind == "fixed" else NaFlexImagePreprocessor(4, 16)
    expected = preprocess([torch.from_numpy(array).permute(2, 0, 1)])
    for image in (Image.fromarray(array), array, np.ascontiguousarray(array.transpose(2, 0, 1))):
        for given in (image, [image]):
            actual = preprocess(given)
            if kind == "fixed":
                assert torch.equal(actual, expected)
            else:
                assert torch.equal(actual.patches, expected.patches) and torch.equal(actual.grid_thw, expected.grid_thw)
    grey = array[..., 0]  # a grey PIL image is converted to RGB, as transformers' convert_to_rgb does
    actual = preprocess(Image.fromarray(grey))
    expected = preprocess([torch.from_numpy(grey)[None].expand(3, -1, -1)])
    if kind == "naflex":
        actual, expected = actual.patches, expected.patches
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["fixed", "naflex"])
def test_reads_a_transformers_processor_save(kind, tmp_path):
    """transformers 5's processor.save_pretrained writes processor_config.json only: it is read."""
    transformers = pytest.importorskip("transformers")
    from kornia_siglip2.demo import build_siglip2_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_siglip2_tokenizer(tmp_path / "tokenizer"))
    if kind == "fixed":
        image_processor = transformers.models.siglip.image_processing_pil_siglip.SiglipImageProcessorPil(
            size={"height": 32, "width": 32}
        )
        processor = transformers.SiglipProcessor(image_processor, tokenizer)
    else:
        image_processor = transformers.models.siglip2.image_processing_pil_siglip2.Siglip2ImageProcessorPil(
            patch_size=8, max_num_patches=64
        )
        processor = transformers.Siglip2Processor(image_processor, tokenizer)
    processor.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "processor_config.json").is_file()
    assert not (tmp_path / "saved" / PREPROCESSOR_CONFIG_NAME).exists()
    preprocess = SigLip2ImagePreprocessor.from_pretrained(tmp_path / "saved")
    images = make_images([(40, 60)], seed=5)
    if kind == "fixed":
        assert preprocess.image_size == (32, 32)
        expected = image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
        assert torch.equal(preprocess(images), expected)
    else:
        assert (preprocess.patch_size, preprocess.max_num_patches) == (8, 64)
        expected = image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
        assert torch.equal(to_padded(preprocess(images), 64).pixel_values, expected)
