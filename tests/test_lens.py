"""Logit lens: last layer == the model's logits, every layer == transformers' modules on its hidden states."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import naflex_tolerance, tolerance

from kornia_siglip2 import SigLip2, SigLip2Config, patchify
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.lens import layer_image_features, logit_lens
from kornia_siglip2.packing import ImageLayout, packed_to_padded

IMAGE_SIZES = [(20, 36), (52, 12), (16, 16)]  # different patch grids, packed together (patch 4)


def packed_images(sizes=IMAGE_SIZES, patch_size=4, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    pieces = [patchify(torch.randn(1, 3, h, w, generator=generator, dtype=dtype), patch_size) for h, w in sizes]
    patches = torch.cat([patches for patches, _ in pieces]).to(device)
    grid_thw = torch.cat([grid for _, grid in pieces]).to(device)
    return patches, grid_thw


def text_ids(batch=4, seed=1):
    return torch.randint(0, 99, (batch, 64), generator=torch.Generator().manual_seed(seed))


def tiny_model(dtype=torch.float64, layers=2):
    config = SigLip2Config.from_hf_dict(
        {
            "model_type": "siglip2",
            "vision_config": {
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "patch_size": 2,
                "num_patches": 4,
            },
            "text_config": {
                "vocab_size": 20,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 8,
            },
        }
    )
    torch.manual_seed(0)
    return SigLip2(config).to(dtype).eval()


@pytest.fixture(scope="module")
def siglip2_model(siglip2_checkpoint):
    return SigLip2.from_pretrained(siglip2_checkpoint)


class TestLogitLens:
    def test_smoke(self, siglip2_model):
        patches, grid_thw = packed_images()
        lens = logit_lens(siglip2_model, text_ids(), patches=patches, grid_thw=grid_thw)
        assert torch.isfinite(lens).all()

    def test_cardinality(self, siglip2_model):
        patches, grid_thw = packed_images()
        lens = logit_lens(siglip2_model, text_ids(5), patches=patches, grid_thw=grid_thw)
        num_layers = siglip2_model.config.vision_config.num_hidden_layers
        assert lens.shape == (num_layers + 1, len(IMAGE_SIZES), 5)

    def test_last_layer_is_logits_naflex(self, siglip2_checkpoint, device, dtype):
        """Packed NaFlex batch of three grids: the last layer is the model's logits_per_image, bit for bit."""
        model = SigLip2.from_pretrained(siglip2_checkpoint, device=device, dtype=dtype)
        patches, grid_thw = packed_images(dtype=dtype, device=device)
        input_ids = text_ids().to(device)
        with torch.no_grad():
            lens = logit_lens(model, input_ids, patches=patches, grid_thw=grid_thw)
            expected = model(input_ids, patches=patches, grid_thw=grid_thw).logits_per_image
        assert lens.dtype == dtype
        assert torch.equal(lens[-1], expected)

    def test_last_layer_is_logits_fixed(self, siglip_checkpoint):
        model = SigLip2.from_pretrained(siglip_checkpoint)
        pixel_values = torch.randn(3, 3, 16, 16)
        with torch.no_grad():
            lens = logit_lens(model, text_ids(), pixel_values)
            expected = model(text_ids(), pixel_values).logits_per_image
        assert lens.shape == (3, 3, 4)
        assert torch.equal(lens[-1], expected)

    def test_padded_input_equals_packed(self, siglip2_model):
        patches, grid_thw = packed_images()
        lengths = grid_thw[:, 1] * grid_thw[:, 2]
        pixel_values, mask = packed_to_padded(patches, lengths, max_length=int(lengths.max()) + 3)
        with torch.no_grad():
            packed = logit_lens(siglip2_model, text_ids(), patches=patches, grid_thw=grid_thw)
            padded = logit_lens(siglip2_model, text_ids(), pixel_values, mask, grid_thw[:, 1:])
        torch.testing.assert_close(padded, packed)

    def test_text_embeds_equal_input_ids(self, siglip2_model):
        patches, grid_thw = packed_images()
        with torch.no_grad():
            text_embeds = siglip2_model.encode_text(text_ids())
            from_ids = logit_lens(siglip2_model, text_ids(), patches=patches, grid_thw=grid_thw)
            from_embeds = logit_lens(siglip2_model, text_embeds=text_embeds, patches=patches, grid_thw=grid_thw)
        assert torch.equal(from_ids, from_embeds)

    @pytest.mark.parametrize("positions", ["transformers", "float64"])
    def test_every_layer_matches_transformers(self, hf_siglip2, siglip2_checkpoint, positions, request):
        """Layer l through transformers' own post_layernorm + head on its padded hidden states, in float64.

        ``transformers``: agreement with its own float32 NaFlex positions, so float32 accuracy (conftest.py);
        ``float64``: its position resize swapped for the float64 reference, exact to 1e-10.
        """
        if positions == "float64":
            request.getfixturevalue("float64_naflex_positions")
        reference = copy.deepcopy(hf_siglip2).double()
        model = SigLip2.from_pretrained(siglip2_checkpoint, dtype=torch.float64)
        patches, grid_thw = packed_images(dtype=torch.float64)
        lengths = grid_thw[:, 1] * grid_thw[:, 2]
        pixel_values, mask = packed_to_padded(patches, lengths, max_length=int(lengths.max()))
        input_ids = text_ids()
        with torch.no_grad():
            ours = logit_lens(model, input_ids, patches=patches, grid_thw=grid_thw)
            vision = reference.vision_model
            states = vision(pixel_values, mask.int(), grid_thw[:, 1:], output_hidden_states=True).hidden_states
            text_embeds = F.normalize(reference.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
            expected = []
            for state in states:
                pooled = F.normalize(vision.head(vision.post_layernorm(state), mask.int()), dim=-1)
                logits = text_embeds @ pooled.t() * reference.logit_scale.exp() + reference.logit_bias
                expected.append(logits.t())
        assert len(states) == ours.shape[0]
        tol = tolerance(torch.float64) if positions == "float64" else naflex_tolerance(torch.float64)
        torch.testing.assert_close(ours, torch.stack(expected), **tol)

    def test_gradcheck(self):
        model = tiny_model(torch.float64)
        patches, grid_thw = packed_images([(4, 6), (2, 2)], patch_size=2, dtype=torch.float64)
        patches.requires_grad_(True)
        input_ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
        packed = ImageLayout.from_grid_thw(grid_thw, patches.device)
        assert torch.autograd.gradcheck(
            lambda pixels: logit_lens(model, input_ids, patches=pixels, grid_thw=packed), (patches,), fast_mode=True
        )

    def test_dynamo(self):
        model = tiny_model(torch.float32)
        patches, grid_thw = packed_images([(4, 6), (2, 2)], patch_size=2)
        text_embeds = torch.randn(3, 8)
        # a prebuilt ImageLayout keeps the host read of grid_thw out of the graph
        packed = ImageLayout.from_grid_thw(grid_thw, patches.device)

        def lens(pixels):
            return logit_lens(model, text_embeds=text_embeds, patches=pixels, grid_thw=packed)

        compiled = torch.compile(lens, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(patches), lens(patches), **tolerance(torch.float32))


class TestLayerImageFeatures:
    def test_last_is_pooler_output(self, siglip2_model):
        patches, grid_thw = packed_images()
        with torch.no_grad():
            output = siglip2_model.vision_model(patches, grid_thw, output_hidden_states=True)
            pooled = layer_image_features(siglip2_model.vision_model, output.hidden_states, grid_thw)
        assert pooled.shape == (len(output.hidden_states), len(IMAGE_SIZES), 32)
        assert torch.equal(pooled[-1], output.pooler_output)

    def test_exception(self, siglip2_model):
        patches, grid_thw = packed_images()
        with torch.no_grad():
            output = siglip2_model.vision_model(patches, grid_thw, output_hidden_states=True)
        with pytest.raises(ValueCheckError, match="output_hidden_states"):
            layer_image_features(siglip2_model.vision_model, (), grid_thw)
        with pytest.raises(ValueCheckError, match="tokens"):
            layer_image_features(siglip2_model.vision_model, [state[:-1] for state in output.hidden_states], grid_thw)
        headless = copy.deepcopy(siglip2_model.vision_model)
        headless.head = None
        with pytest.raises(ValueCheckError, match="MAP head"):
            layer_image_features(headless, output.hidden_states, grid_thw)


class TestException:
    def test_texts(self, siglip2_model):
        patches, grid_thw = packed_images()
        with pytest.raises(ValueError, match="exactly one"):
            logit_lens(siglip2_model, patches=patches, grid_thw=grid_thw)
        with pytest.raises(ValueError, match="exactly one"):
            logit_lens(siglip2_model, text_ids(), patches=patches, grid_thw=grid_thw, text_embeds=torch.randn(2, 32))
        with pytest.raises(ValueCheckError, match="text_embeds"):
            logit_lens(siglip2_model, patches=patches, grid_thw=grid_thw, text_embeds=torch.randn(32))

    def test_images(self, siglip2_model):
        patches, grid_thw = packed_images()
        with pytest.raises(ValueError, match="both patches"):
            logit_lens(siglip2_model, text_ids(), patches=patches)
        with pytest.raises(ValueError, match="not both"):
            logit_lens(siglip2_model, text_ids(), torch.randn(1, 3, 8, 8), patches=patches, grid_thw=grid_thw)
        with pytest.raises(ValueError, match="pixel_values is required"):
            logit_lens(siglip2_model, text_ids())
        with pytest.raises(ValueError, match="patches"):
            logit_lens(siglip2_model, text_ids(), patches=patches[:-1], grid_thw=grid_thw)
