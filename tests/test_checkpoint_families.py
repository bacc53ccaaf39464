"""Every checkpoint family a user expects to load (shared/REFERENCE.md section 1) against transformers.

Each family is a random transformers ``SiglipModel`` / ``Siglip2Model`` with the family's real patch size,
image size (hence position-table size), vocabulary size, head count and projection quirk (giant-opt: a 1152-wide
text tower projected to the 1536-wide vision width), written with ``save_pretrained`` and loaded through
:meth:`kornia_siglip2.SigLip2.from_pretrained`. Width and depth are reduced so the default run takes a few
seconds per family: head width 4 (vision) and the family's head count, the family's MLP ratio, two layers per
tower. ``KORNIA_SIGLIP2_FULL_WIDTH=1`` builds the real widths, heads and MLP sizes instead (one layer per tower;
several GB of memory for the 256000-token SigLIP 2 vocabularies; random full-width towers reach activations of
10-100, so there ``atol`` is scaled by the reference's largest magnitude).

Images go through the real sizes end to end: transformers' ``SiglipImageProcessor`` / ``Siglip2ImageProcessor``
(PIL backends) and ``SiglipProcessor`` on one side, our preprocessors on the other. Patch 14 at 224 and 384
(384 = 27 * 14 + 6: the Conv2d patch embedding drops 6 pixel rows and columns) and other sizes the patch does not
divide are included. fp32 agreement atol 1e-5 / rtol 1e-4; float64 1e-10 on the fixed-resolution families.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import naflex_tolerance, tolerance

from kornia_siglip2 import SigLip2
from kornia_siglip2.preprocess import NaFlexImagePreprocessor, SigLipImagePreprocessor

transformers = pytest.importorskip("transformers")

FULL_WIDTH = os.environ.get("KORNIA_SIGLIP2_FULL_WIDTH") == "1"


@dataclass(frozen=True)
class Family:
    """One checkpoint family: the facts of its config.json that shape the weights and the input."""

    name: str
    model_type: str  # "siglip" (v1 and SigLIP 2 fixed) or "siglip2" (NaFlex)
    patch_size: int
    image_size: int  # fixed resolution; 0 for NaFlex
    width: int  # real vision width
    heads: int
    mlp: int
    text_width: int
    vocab_size: int
    projection_size: int | None = None  # None: the text width

    @property
    def naflex(self) -> bool:
        return self.model_type == "siglip2"

    @property
    def positions(self) -> int:
        """Rows of the vision position table: (image_size // patch)^2, or 256 for NaFlex."""
        return 256 if self.naflex else (self.image_size // self.patch_size) ** 2


BASE = dict(width=768, heads=12, mlp=3072, text_width=768)
LARGE = dict(width=1024, heads=16, mlp=4096, text_width=1024)
SO400M = dict(width=1152, heads=16, mlp=4304, text_width=1152)
GIANT = dict(width=1536, heads=16, mlp=6144, text_width=1152, projection_size=1536)
V1, V2 = 32000, 256000

FAMILIES = [
    *(Family(f"siglip-base-patch16-{s}", "siglip", 16, s, vocab_size=V1, **BASE) for s in (224, 256, 384, 512)),
    *(Family(f"siglip-large-patch16-{s}", "siglip", 16, s, vocab_size=V1, **LARGE) for s in (256, 384)),
    Family("siglip-so400m-patch14-384", "siglip", 14, 384, vocab_size=V1, **SO400M),
    *(Family(f"siglip2-base-patch16-{s}", "siglip", 16, s, vocab_size=V2, **BASE) for s in (224, 256, 384, 512)),
    *(Family(f"siglip2-large-patch16-{s}", "siglip", 16, s, vocab_size=V2, **LARGE) for s in (256, 384, 512)),
    *(Family(f"siglip2-so400m-patch14-{s}", "siglip", 14, s, vocab_size=V2, **SO400M) for s in (224, 384)),
    *(Family(f"siglip2-so400m-patch16-{s}", "siglip", 16, s, vocab_size=V2, **SO400M) for s in (256, 384, 512)),
    *(Family(f"siglip2-giant-opt-patch16-{s}", "siglip", 16, s, vocab_size=V2, **GIANT) for s in (256, 384)),
    Family("siglip2-base-patch16-naflex", "siglip2", 16, 0, vocab_size=V2, **BASE),
    Family("siglip2-so400m-patch16-naflex", "siglip2", 16, 0, vocab_size=V2, **SO400M),
]
#: fixed sizes no released checkpoint has, that the patch does not divide either
ODD_SIZES = [
    Family("odd-patch14-100", "siglip", 14, 100, vocab_size=99, **BASE),  # 100 = 7 * 14 + 2
    Family("odd-patch16-200", "siglip", 16, 200, vocab_size=99, **BASE),  # 200 = 12 * 16 + 8
]
IDS = [family.name for family in FAMILIES]


def _reduced(real: int, family: Family) -> int:
    """A width scaled as the vision width goes from ``family.width`` to ``heads * 4``."""
    return max(family.heads, round(real * family.heads * 4 / family.width))


def hf_config(family: Family):
    """transformers' config of the family: real geometry, reduced width/depth unless ``FULL_WIDTH``."""
    if FULL_WIDTH:
        width, mlp, text_width, layers = family.width, family.mlp, family.text_width, 1
        projection = family.projection_size
    else:
        width, mlp, layers = family.heads * 4, _reduced(family.mlp, family), 2
        text_width = _reduced(family.text_width, family) // family.heads * family.heads
        projection = width if family.projection_size else None
    text = dict(
        vocab_size=family.vocab_size,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=family.heads,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=1,
    )
    if projection is not None:
        text["projection_size"] = projection
    vision = dict(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=family.heads,
        patch_size=family.patch_size,
    )
    if family.naflex:
        return transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=256))
    return transformers.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=family.image_size))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)


@pytest.fixture(scope="module")
def family(request) -> Family:
    """The family of the test; module-scoped so that pytest runs a family's tests together (one build each)."""
    return request.param


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(family)`` -> (transformers model, our model loaded from its save_pretrained folder, folder)."""
    cache: dict[str, tuple] = {}

    def build(family: Family):
        if family.name not in cache:
            cache.clear()  # one family in memory at a time
            torch.manual_seed(0)
            model_class = transformers.Siglip2Model if family.naflex else transformers.SiglipModel
            hf = model_class(hf_config(family)).eval()
            _perturb(hf, seed=len(family.name))
            folder = tmp_path_factory.mktemp(family.name)
            hf.save_pretrained(folder, safe_serialization=True)
            cache[family.name] = hf, SigLip2.from_pretrained(folder), folder
        return cache[family.name]

    return build


def _uint8_images(sizes, seed: int = 0) -> list[np.ndarray]:
    """Smooth + noisy RGB images (H, W, 3), so resizing matters."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) % 97 * 2.5], -1)
        images.append(np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8))
    return images


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, naflex: bool = False):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bounds = naflex_tolerance(dtype) if naflex else tolerance(dtype)
    if FULL_WIDTH:  # random full-width towers reach |x| ~ 10-100: atol relative to the reference's scale
        bounds = dict(bounds, atol=bounds["atol"] * max(1.0, expected.abs().max().item()))
    torch.testing.assert_close(actual, expected, **bounds)


def _input_ids(vocab_size: int, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS, indirect=True)
def test_family_loads_and_matches_transformers(family, built):
    """Weights load (position table (image_size // patch)^2 rows) and image, text and logits equal transformers'."""
    hf, ours, _ = built(family)
    table = ours.vision_model.embeddings.position_embedding.weight
    assert tuple(table.shape) == (family.positions, hf.config.vision_config.hidden_size)
    text_config = hf.config.text_config
    assert ours.text_model.head.out_features == (text_config.projection_size or text_config.hidden_size)
    input_ids = _input_ids(family.vocab_size)
    if family.naflex:
        processor = transformers.models.siglip2.image_processing_pil_siglip2.Siglip2ImageProcessorPil(
            patch_size=16, max_num_patches=256
        )
        inputs = dict(processor(images=_uint8_images([(480, 640), (100, 1000)]), return_tensors="pt"))
    else:
        pixels = torch.rand(2, 3, family.image_size, family.image_size, generator=torch.Generator().manual_seed(2))
        inputs = {"pixel_values": pixels * 2 - 1}
    with torch.no_grad():
        expected = hf(input_ids=input_ids, **inputs)
        actual = ours(input_ids=input_ids, **inputs)
        expected_image = hf.get_image_features(**inputs)
        actual_image = ours.get_image_features(**inputs)
    _close(actual.logits_per_image, expected.logits_per_image, naflex=family.naflex)
    _close(actual.text_embeds, expected.text_embeds)
    _close(actual_image.pooler_output, expected_image.pooler_output, naflex=family.naflex)
    actual_tokens, expected_tokens = actual_image.last_hidden_state, expected_image.last_hidden_state
    if family.naflex:  # transformers computes values at padded positions too; ours are zeros there
        valid = inputs["pixel_attention_mask"].bool()
        assert actual_tokens.shape == expected_tokens.shape and not actual_tokens[~valid].any()
        actual_tokens, expected_tokens = actual_tokens[valid], expected_tokens[valid]
    _close(actual_tokens, expected_tokens, naflex=family.naflex)


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if not f.naflex] + ODD_SIZES, ids=lambda f: f.name, indirect=True
)
def test_fixed_family_end_to_end_through_preprocessors(family, built):
    """uint8 images -> transformers' SiglipImageProcessor -> its model == our preprocessor -> our model."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hf, ours, _ = built(family)
    images = _uint8_images([(300, 417), (97, 150)])
    size = family.image_size
    theirs = SiglipImageProcessorPil(size={"height": size, "width": size})(images=images, return_tensors="pt")
    pixels = SigLipImagePreprocessor(image_size=size)([torch.from_numpy(image).permute(2, 0, 1) for image in images])
    assert tuple(pixels.shape) == (2, 3, size, size)  # e.g. 384 x 384 for patch 14: not a multiple of the patch
    torch.testing.assert_close(pixels, theirs["pixel_values"], atol=0, rtol=0)  # PIL-exact on uint8
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=theirs["pixel_values"]).pooler_output
        actual = ours.encode_image(pixels)
    _close(actual, expected)


@pytest.mark.parametrize(
    "family",
    [f for f in FAMILIES if not f.naflex and f.patch_size == 14] + ODD_SIZES + [FAMILIES[0]],
    ids=lambda f: f.name,
    indirect=True,
)
def test_fixed_family_float64(family, built):
    """float64 models on float64 images agree to 1e-10, at sizes the patch does not divide as well."""
    hf, ours, _ = built(family)
    hf, ours = hf.double(), ours.double()
    try:
        size = family.image_size
        pixels = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 - 1
        input_ids = _input_ids(family.vocab_size, batch=2)
        with torch.no_grad():
            expected = hf(input_ids=input_ids, pixel_values=pixels)
            actual = ours(input_ids=input_ids, pixel_values=pixels)
        _close(actual.logits_per_image, expected.logits_per_image, torch.float64)
        _close(
            actual.vision_model_output.last_hidden_state, expected.vision_model_output.last_hidden_state, torch.float64
        )
    finally:
        hf.float(), ours.float()


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.patch_size == 14] + ODD_SIZES[:1], ids=lambda f: f.name, indirect=True
)
def test_patch14_through_siglip_processor(family, built, tmp_path):
    """transformers' SiglipProcessor (tokenizer + image processor) output fed unchanged to both models."""
    from transformers import AutoTokenizer, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from kornia_siglip2._demo import build_siglip2_tokenizer, build_siglip_tokenizer

    hf, ours, _ = built(family)
    if family.vocab_size == V2:
        build_siglip2_tokenizer(tmp_path, tokenizer_class="GemmaTokenizer")
    else:
        build_siglip_tokenizer(tmp_path)
    size = family.image_size
    processor = SiglipProcessor(
        SiglipImageProcessorPil(size={"height": size, "width": size}), AutoTokenizer.from_pretrained(tmp_path)
    )
    inputs = processor(
        text=["a photo of a cat", "a dog"],
        images=_uint8_images([(333, 222), (64, 80), (400, 400)]),
        padding="max_length",
        max_length=64,
        truncation=True,
        return_tensors="pt",
    )
    inputs.pop("attention_mask", None)  # SigLIP is used without a text mask (model cards)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (size, size)
    with torch.no_grad():
        expected = hf(**inputs)
        actual = ours(**inputs)
    _close(actual.logits_per_image, expected.logits_per_image)
    _close(actual.vision_model_output.last_hidden_state, expected.vision_model_output.last_hidden_state)
    grid = size // family.patch_size
    assert actual.vision_model_output.last_hidden_state.shape[1] == grid * grid


@pytest.mark.parametrize("family", [FAMILIES[6], ODD_SIZES[0]], ids=lambda f: f.name, indirect=True)
def test_fixed_family_other_resolution_interpolates_as_transformers(family, built):
    """A fixed checkpoint at another (non-divisible) size: transformers' interpolate_pos_encoding=True."""
    hf, ours, _ = built(family)
    pixels = torch.rand(2, 3, 200, 297, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
        actual = ours.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
    _close(actual.pooler_output, expected.pooler_output)
    _close(actual.last_hidden_state, expected.last_hidden_state)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.naflex], ids=lambda f: f.name, indirect=True)
def test_naflex_family_end_to_end_through_preprocessors(family, built):
    """uint8 images -> Siglip2ImageProcessor -> transformers == our NaFlex preprocessor (packed) -> ours."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    hf, ours, _ = built(family)
    images = _uint8_images([(480, 640), (100, 1000), (37, 53)])
    theirs = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)(images=images, return_tensors="pt")
    packed = NaFlexImagePreprocessor(patch_size=16, max_num_patches=256)(
        [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    )
    assert packed.grid_thw[:, 1:].tolist() == theirs["spatial_shapes"].tolist()
    with torch.no_grad():
        expected = hf.get_image_features(**theirs).pooler_output
        actual = ours.encode_image(packed)
    _close(actual, expected, naflex=True)


def test_naflex_rejects_sizes_the_patch_does_not_divide(built):
    """NaFlex has no Conv2d to floor with: a 4-D image whose sides 16 does not divide is an error."""
    _, ours, _ = built(FAMILIES[-2])
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        ours.get_image_features(pixel_values=torch.rand(1, 3, 40, 48))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS, indirect=True)
def test_state_dict_interop_both_directions(family, built):
    """``state_dict()`` keys and shapes are transformers'; each model loads the other's state dict, same outputs."""
    hf, ours, _ = built(family)
    theirs_state = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs_state.items()
    }
    model_class = transformers.Siglip2Model if family.naflex else transformers.SiglipModel
    hf_copy = model_class(hf.config).eval()
    hf_copy.load_state_dict(ours.state_dict())  # strict: a torch.save(ours.state_dict()) fine-tune goes back
    ours_copy = SigLip2(ours.config).eval()
    ours_copy.load_state_dict(theirs_state)
    if family.naflex:
        processor = transformers.models.siglip2.image_processing_pil_siglip2.Siglip2ImageProcessorPil(
            patch_size=16, max_num_patches=64
        )
        inputs = dict(processor(images=_uint8_images([(90, 120)]), return_tensors="pt"))
    else:
        pixels = torch.rand(1, 3, family.image_size, family.image_size, generator=torch.Generator().manual_seed(4))
        inputs = {"pixel_values": pixels * 2 - 1}
    with torch.no_grad():
        expected = hf.get_image_features(**inputs).pooler_output
        _close(hf_copy.get_image_features(**inputs).pooler_output, expected, naflex=family.naflex)
        _close(ours_copy.get_image_features(**inputs).pooler_output, expected, naflex=family.naflex)
