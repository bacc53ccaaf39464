"""SigLip2 against transformers on the same tiny checkpoints, and packed == one by one == padded."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import SIGLIP_IMAGE_SIZE, TEXT, VISION, naflex_tolerance, tolerance

from kornia_siglip2 import SigLip2, SigLip2Config, patchify
from kornia_siglip2.packing import grid_thw_to_seqlens, pack_inputs, packed_to_padded

IMAGE_SIZES = [(20, 36), (52, 12), (16, 16), (33, 47)]  # different sizes and aspect ratios


@pytest.fixture(scope="module")
def naflex_inputs():
    """The exact tensors transformers' own Siglip2ImageProcessor produces for images of several sizes."""
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=24)
    return dict(processor(images=images, return_tensors="pt"))


def _text_inputs(batch=3, length=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (batch, length), generator=generator)


def _packed(model, inputs):
    """The padded NaFlex ``inputs`` as one packed batch (packed in: the tower returns packed tokens)."""
    return pack_inputs(**inputs, patch_size=model.patch_size, drop_remainder=not model.config.is_naflex)


def _pair(hf_model, checkpoint, dtype, device):
    reference = copy.deepcopy(hf_model).to(device=device, dtype=dtype)
    ours = SigLip2.from_pretrained(checkpoint, dtype=dtype, device=device)
    return reference, ours


def _assert_outputs_close(reference, ours, dtype, tol=None):
    tol = tol or tolerance(dtype)
    for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        expected = getattr(reference, name)
        scale = 10.0 if name.startswith("logits") and dtype == torch.bfloat16 else 1.0  # logits are ~exp(2.3)x
        torch.testing.assert_close(getattr(ours, name), expected, atol=tol["atol"] * scale, rtol=tol["rtol"])


class TestParitySiglip:
    """SigLIP v1 / SigLIP 2 fixed resolution (`model_type: siglip`)."""

    def test_forward(self, hf_siglip, siglip_checkpoint, device, dtype):
        reference, ours = _pair(hf_siglip, siglip_checkpoint, dtype, device)
        pixel_values = torch.randn(3, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE, device=device, dtype=dtype)
        input_ids = _text_inputs().to(device)
        with torch.no_grad():
            expected = reference(input_ids=input_ids, pixel_values=pixel_values)
            out = ours(input_ids=input_ids, pixel_values=pixel_values)
        _assert_outputs_close(expected, out, dtype)

    def test_features(self, hf_siglip, siglip_checkpoint, device, dtype):
        reference, ours = _pair(hf_siglip, siglip_checkpoint, dtype, device)
        pixel_values = torch.randn(2, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE, device=device, dtype=dtype)
        input_ids = _text_inputs(2).to(device)
        with torch.no_grad():
            expected_image = reference.get_image_features(pixel_values=pixel_values).pooler_output
            expected_text = reference.get_text_features(input_ids=input_ids).pooler_output
            torch.testing.assert_close(
                ours.get_image_features(pixel_values).pooler_output, expected_image, **tolerance(dtype)
            )
            torch.testing.assert_close(
                ours.get_text_features(input_ids).pooler_output, expected_text, **tolerance(dtype)
            )

    def test_other_resolution(self, hf_siglip, siglip_checkpoint):
        """At a grid other than the training one the table is resized like `interpolate_pos_encoding=True`."""
        reference, ours = _pair(hf_siglip, siglip_checkpoint, torch.float64, "cpu")
        pixel_values = torch.randn(2, 3, 24, 32, dtype=torch.float64)
        with torch.no_grad():
            expected = reference.vision_model(pixel_values, interpolate_pos_encoding=True)
            out = ours.vision_model(*patchify(pixel_values, 4))
        torch.testing.assert_close(
            out.last_hidden_state, expected.last_hidden_state.flatten(0, 1), **tolerance(torch.float64)
        )
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, **tolerance(torch.float64))

    def test_loss(self, hf_siglip, siglip_checkpoint):
        reference, ours = _pair(hf_siglip, siglip_checkpoint, torch.float64, "cpu")
        pixel_values = torch.randn(3, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE, dtype=torch.float64)
        input_ids = _text_inputs()
        with torch.no_grad():
            expected = reference(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
            loss = ours(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
        torch.testing.assert_close(loss, expected, **tolerance(torch.float64))

    def test_text_attention_mask(self, hf_siglip, siglip_checkpoint):
        reference, ours = _pair(hf_siglip, siglip_checkpoint, torch.float64, "cpu")
        input_ids = _text_inputs(2)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 40:] = 0
        attention_mask[1, 10:] = 0
        with torch.no_grad():
            expected = reference.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            unmasked = ours.encode_text(input_ids)
            out = ours.encode_text(input_ids, attention_mask)
        torch.testing.assert_close(out, expected, **tolerance(torch.float64))
        assert not torch.allclose(out, unmasked)  # the mask does change the pooled vector


class TestParitySiglip2NaFlex:
    """SigLIP 2 NaFlex (`model_type: siglip2`) on the exact tensors of transformers' processor."""

    def test_forward(self, hf_siglip2, siglip2_checkpoint, naflex_inputs, device, dtype):
        reference, ours = _pair(hf_siglip2, siglip2_checkpoint, dtype, device)
        inputs = {key: value.to(device) for key, value in naflex_inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        input_ids = _text_inputs(4).to(device)
        with torch.no_grad():
            expected = reference(input_ids=input_ids, **inputs)
            out = ours(input_ids=input_ids, **inputs)
        # transformers' NaFlex positions are float32 for every dtype: float64 agrees to float32 (conftest.py)
        _assert_outputs_close(expected, out, dtype, naflex_tolerance(dtype))

    def test_features_and_tokens(self, hf_siglip2, siglip2_checkpoint, naflex_inputs, device, dtype):
        reference, ours = _pair(hf_siglip2, siglip2_checkpoint, dtype, device)
        inputs = {key: value.to(device) for key, value in naflex_inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            expected = reference.vision_model(**inputs)
            out = ours.get_image_features(_packed(ours, inputs))
            features = ours.encode_image(**inputs)
        valid = inputs["pixel_attention_mask"].bool()
        tol = naflex_tolerance(dtype)  # float32 positions in transformers (conftest.py)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state[valid], **tol)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, **tol)
        torch.testing.assert_close(features, expected.pooler_output, **tol)

    def test_hidden_states(self, hf_siglip2, siglip2_checkpoint, naflex_inputs):
        """Every layer's tokens equal transformers' ``hidden_states``, packed and padded."""
        reference, ours = _pair(hf_siglip2, siglip2_checkpoint, torch.float32, "cpu")
        inputs = dict(naflex_inputs)
        with torch.no_grad():
            expected = reference.vision_model(**inputs, output_hidden_states=True).hidden_states
            out = ours.get_image_features(_packed(ours, inputs), output_hidden_states=True)
            expected_text = reference.text_model(input_ids=_text_inputs(), output_hidden_states=True).hidden_states
            text_states = ours.text_model(_text_inputs(), output_hidden_states=True).hidden_states
        valid = inputs["pixel_attention_mask"].bool()
        assert len(out.hidden_states) == len(expected) == 3 and len(text_states) == len(expected_text)
        for state, reference_state in zip(out.hidden_states, expected, strict=True):
            torch.testing.assert_close(state, reference_state[valid], atol=1e-5, rtol=1e-4)
            padded, mask = out.to_padded(state, max_length=valid.shape[1])
            assert torch.equal(mask, valid)
            torch.testing.assert_close(padded[mask], reference_state[valid], atol=1e-5, rtol=1e-4)
        for state, reference_state in zip(text_states, expected_text, strict=True):
            torch.testing.assert_close(state, reference_state, atol=1e-5, rtol=1e-4)

    def test_packed_equals_one_by_one_equals_padded(self, siglip2_checkpoint, naflex_inputs):
        ours = SigLip2.from_pretrained(siglip2_checkpoint, dtype=torch.float64)
        inputs = dict(naflex_inputs, pixel_values=naflex_inputs["pixel_values"].double())
        patches, grid_thw = _packed(ours, inputs)
        with torch.no_grad():
            packed = ours.vision_model(patches, grid_thw)
            singles = [
                ours.vision_model(chunk, grid[None])
                for chunk, grid in zip(patches.split(grid_thw_to_seqlens(grid_thw).tolist()), grid_thw, strict=True)
            ]
            padded = ours.get_image_features(**inputs)
        torch.testing.assert_close(
            packed.last_hidden_state, torch.cat([s.last_hidden_state for s in singles]), atol=1e-12, rtol=1e-12
        )
        torch.testing.assert_close(
            packed.pooler_output, torch.cat([s.pooler_output for s in singles]), atol=1e-12, rtol=1e-12
        )
        torch.testing.assert_close(padded.pooler_output, packed.pooler_output, atol=0, rtol=0)
        # tokens can be returned padded for drop-in callers
        tokens, mask = packed_to_padded(packed.last_hidden_state, grid_thw_to_seqlens(grid_thw), 24)
        assert torch.equal(mask.int(), inputs["pixel_attention_mask"].int())
        assert tokens.shape == (len(IMAGE_SIZES), 24, 32)

    def test_frames_are_separate_blocks(self, siglip2_checkpoint):
        """A grid row (t, h, w) is t frames, each its own attention block and pooled vector."""
        ours = SigLip2.from_pretrained(siglip2_checkpoint, dtype=torch.float64)
        frames = torch.randn(3, 3, 8, 12, dtype=torch.float64)
        patches, _ = patchify(frames, 4)
        with torch.no_grad():
            video = ours.vision_model(patches, torch.tensor([[3, 2, 3]]))
            stills = ours.vision_model(patches, torch.tensor([[1, 2, 3]] * 3))
        assert video.pooler_output.shape == (3, 32)
        torch.testing.assert_close(video.pooler_output, stills.pooler_output, atol=0, rtol=0)

    def test_float64_exact_with_float64_positions(
        self, hf_siglip2, siglip2_checkpoint, naflex_inputs, float64_naflex_positions
    ):
        """Exactness: with its position resize in float64, transformers' float64 tower equals ours to 1e-10."""
        reference, ours = _pair(hf_siglip2, siglip2_checkpoint, torch.float64, "cpu")
        inputs = dict(naflex_inputs, pixel_values=naflex_inputs["pixel_values"].double())
        input_ids = _text_inputs(4)
        with torch.no_grad():
            expected = reference(input_ids=input_ids, **inputs)
            out = ours(input_ids=input_ids, **inputs)
            tokens = ours.get_image_features(_packed(ours, inputs)).last_hidden_state
            expected_tokens = reference.vision_model(**inputs).last_hidden_state
        _assert_outputs_close(expected, out, torch.float64)
        valid = inputs["pixel_attention_mask"].bool()
        torch.testing.assert_close(tokens, expected_tokens[valid], **tolerance(torch.float64))

    @staticmethod
    def _loss_and_gradients(hf_siglip2, siglip2_checkpoint, naflex_inputs, tol):
        reference, ours = _pair(hf_siglip2, siglip2_checkpoint, torch.float64, "cpu")
        inputs = dict(naflex_inputs, pixel_values=naflex_inputs["pixel_values"].double())
        input_ids = _text_inputs(4)
        expected = reference(input_ids=input_ids, return_loss=True, **inputs).loss
        loss = ours(input_ids=input_ids, return_loss=True, **inputs).loss
        torch.testing.assert_close(loss, expected, **tol)
        expected.backward()
        loss.backward()
        hf_grads = dict(reference.named_parameters())
        for name in ("logit_scale", "logit_bias", "vision_model.head.probe", "text_model.head.weight"):
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, hf_grads[name].grad, **tol)
        for name in ("q_proj", "k_proj", "v_proj"):
            ours_grad = ours.vision_model.encoder.layers[0].self_attn.get_submodule(name).weight.grad
            hf_grad = hf_grads[f"vision_model.encoder.layers.0.self_attn.{name}.weight"].grad
            torch.testing.assert_close(ours_grad, hf_grad, **tol)
        ours_in_proj = ours.vision_model.head.attention.in_proj_weight.grad
        torch.testing.assert_close(ours_in_proj, hf_grads["vision_model.head.attention.in_proj_weight"].grad, **tol)

    def test_loss_and_gradients(self, hf_siglip2, siglip2_checkpoint, naflex_inputs):
        """Agreement with transformers as it is: its float32 NaFlex positions bound float64 to float32 accuracy."""
        self._loss_and_gradients(hf_siglip2, siglip2_checkpoint, naflex_inputs, naflex_tolerance(torch.float64))

    def test_loss_and_gradients_float64_exact(
        self, hf_siglip2, siglip2_checkpoint, naflex_inputs, float64_naflex_positions
    ):
        """Exactness: with float64 positions in transformers, loss and gradients agree to 1e-10."""
        self._loss_and_gradients(hf_siglip2, siglip2_checkpoint, naflex_inputs, tolerance(torch.float64))


class TestSigLip2Module:
    def test_smoke_packed_api(self, siglip2_checkpoint, device, dtype):
        model = SigLip2.from_pretrained(siglip2_checkpoint, device=device, dtype=dtype)
        patches, grid_thw = patchify(torch.rand(2, 3, 8, 12, device=device, dtype=dtype), 4)
        features = model.encode_image(patches=patches, grid_thw=grid_thw)
        assert features.shape == (2, 32) and features.dtype == dtype

    def test_cardinality(self, siglip2_checkpoint):
        model = SigLip2.from_pretrained(siglip2_checkpoint)
        out = model(input_ids=_text_inputs(5, 16), pixel_values=torch.rand(2, 3, 8, 8))
        assert out.logits_per_image.shape == (2, 5) and out.logits_per_text.shape == (5, 2)
        assert out.image_embeds.shape == (2, 32) and out.text_embeds.shape == (5, 32)
        assert out.loss is None
        torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))

    def test_logit_scale_is_not_clamped(self, siglip2_checkpoint):
        model = SigLip2.from_pretrained(siglip2_checkpoint)
        with torch.no_grad():
            model.logit_scale.fill_(torch.log(torch.tensor(109.9)).item())  # a released So400m's learned scale
        image, text = torch.eye(2, 32), torch.eye(2, 32)
        assert model.logits(image, text)[0, 0].item() == pytest.approx(109.9 + model.logit_bias.item(), rel=1e-5)

    def test_exception(self, siglip2_checkpoint):
        model = SigLip2.from_pretrained(siglip2_checkpoint)
        with pytest.raises(ValueError, match="not divisible by patch_size 4"):
            model.get_image_features(torch.rand(1, 3, 10, 8))
        with pytest.raises(ValueError, match=r"describes 6 patches .* but patches has 7 rows"):
            model.get_image_features(patches=torch.rand(7, 48), grid_thw=torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueError, match=r"patches must have shape \(num_patches, 48\)"):
            model.get_image_features(patches=torch.rand(6, 40), grid_thw=torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueError, match="need spatial_shapes"):
            model.get_image_features(torch.rand(1, 16, 48))
        with pytest.raises(ValueError, match="needs both patches"):
            model.get_image_features(patches=torch.rand(6, 48))
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model.get_text_features(torch.zeros(1, 65, dtype=torch.long))
        with pytest.raises(ValueError, match=r"must lie in \[0, 99\)"):
            model.get_text_features(torch.full((1, 8), 99))

    def test_gradcheck(self, siglip2_checkpoint):
        model = SigLip2.from_pretrained(siglip2_checkpoint, dtype=torch.float64)
        patches = torch.rand(6, 48, dtype=torch.float64, requires_grad=True)
        grid_thw = torch.tensor([[1, 1, 2], [1, 2, 2]])
        assert torch.autograd.gradcheck(lambda x: model.encode_image(patches=x, grid_thw=grid_thw), (patches,))

    def test_dynamo(self, siglip2_checkpoint, device, dtype):
        model = SigLip2.from_pretrained(siglip2_checkpoint, device=device, dtype=dtype)
        pixel_values = torch.rand(2, 3, 8, 12, device=device, dtype=dtype)
        input_ids = _text_inputs(2, 16).to(device)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        expected = model(input_ids=input_ids, pixel_values=pixel_values)
        out = compiled(input_ids=input_ids, pixel_values=pixel_values)
        torch.testing.assert_close(out.logits_per_image, expected.logits_per_image, **tolerance(dtype))

    def test_dynamo_fullgraph_vision_with_prebuilt_grid(self, siglip2_checkpoint, device, dtype):
        from kornia_siglip2 import ImageLayout

        model = SigLip2.from_pretrained(siglip2_checkpoint, device=device, dtype=dtype)
        patches = torch.rand(6 + 16, 48, device=device, dtype=dtype)
        grid = ImageLayout.from_grid_thw(torch.tensor([[1, 2, 3], [1, 4, 4]]), device)
        compiled = torch.compile(
            lambda x: model.vision_model(x, grid).pooler_output, fullgraph=True, backend="aot_eager"
        )
        torch.testing.assert_close(
            compiled(patches), model.vision_model(patches, grid).pooler_output, **tolerance(dtype)
        )


def _graph_count_and_breaks(function, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(*args)
    return explanation.graph_count, explanation.graph_break_count


class TestCompile:
    """``torch.compile(fullgraph=True)`` of every entry point: one graph, zero breaks, eager's values and gradients.

    aot_eager (the forward and backward graphs autograd traces, run without code generation) here; the towers'
    inductor tests are ``test_dynamo`` in tests/test_vision.py and tests/test_text.py.
    """

    @pytest.fixture(autouse=True)
    def _fresh_dynamo(self):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()

    def test_no_graph_break(self, siglip_checkpoint, siglip2_checkpoint):
        from kornia_siglip2 import PackedImages

        model = SigLip2.from_pretrained(siglip_checkpoint)
        naflex = SigLip2.from_pretrained(siglip2_checkpoint)
        images = torch.rand(2, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)
        input_ids = _text_inputs(2)
        packed = PackedImages(torch.rand(6 + 16, 48), torch.tensor([[1, 2, 3], [1, 4, 4]]))
        paths = {
            "forward": (lambda x, i: model(input_ids=i, pixel_values=x).logits_per_image, images, input_ids),
            "get_image_features": (lambda x: model.get_image_features(x).pooler_output, images),
            "get_text_features": (lambda i: model.get_text_features(i).pooler_output, input_ids),
            "encode_image": (lambda x: model.encode_image(x, normalize=True), images),
            "naflex packed": (lambda p: naflex.vision_model(p).pooler_output, packed),
            "naflex encode_image": (lambda p: naflex.encode_image(p), packed),
        }
        for name, (function, *args) in paths.items():
            assert _graph_count_and_breaks(function, *args) == (1, 0), name

    @pytest.mark.parametrize("naflex", [False, True], ids=["fixed", "naflex"])
    def test_training_matches_eager(self, siglip_checkpoint, siglip2_checkpoint, naflex):
        """Forward + backward of the loss under fullgraph compile: the loss and every gradient equal eager's."""
        from kornia_siglip2 import PackedImages

        model = SigLip2.from_pretrained(siglip2_checkpoint if naflex else siglip_checkpoint).train()
        input_ids = _text_inputs(2)
        if naflex:
            images = PackedImages(torch.rand(6 + 16, 48), torch.tensor([[1, 2, 3], [1, 4, 4]]))
        else:
            images = torch.rand(2, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)

        def loss(pixel_values, ids):
            return model(input_ids=ids, pixel_values=pixel_values, return_loss=True).loss

        def gradients(value):
            model.zero_grad()
            value.backward()
            return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

        compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")(images, input_ids)
        compiled_grads = gradients(compiled_loss)
        eager_loss = loss(images, input_ids)
        eager_grads = gradients(eager_loss)
        torch.testing.assert_close(compiled_loss, eager_loss, **tolerance(torch.float32))
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, **tolerance(torch.float32), msg=name)

    def test_packed_batches_compile_a_bounded_number_of_times(self, siglip2_checkpoint):
        """Six packed batches of other image counts, grids and token counts (as the token-budget sampler makes
        them) through ``torch.compile(dynamic=True)``: at most 3 graphs (one here; a single-image batch adds one,
        as torch specialises sizes 0 and 1), every output equal to eager."""
        from kornia_siglip2 import PackedImages

        model = SigLip2.from_pretrained(siglip2_checkpoint)
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        compiled = torch.compile(
            lambda packed: model.vision_model(packed).pooler_output,
            fullgraph=True,
            dynamic=True,
            backend=counting_backend,
        )
        compositions = [
            [(2, 3), (4, 4)],
            [(1, 2), (3, 3), (2, 5)],
            [(4, 4)] * 3,
            [(5, 3), (2, 2), (1, 1), (3, 4)],
            [(6, 2), (7, 9)],
            [(2, 2), (3, 3), (4, 4), (5, 5), (2, 6), (8, 1)],
        ]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for grids in compositions:
                grid_thw = torch.tensor([[1, h, w] for h, w in grids])
                packed = PackedImages(torch.rand(int(grid_thw.prod(-1).sum()), 48, generator=generator), grid_thw)
                expected = model.vision_model(packed).pooler_output
                torch.testing.assert_close(compiled(packed), expected, **tolerance(torch.float32))
        assert 1 <= len(graphs) <= 3


class TestInitWeights:
    """big_vision's initialisers, checked by their statistics on a model wide enough to measure them."""

    def test_initial_statistics(self):
        torch.manual_seed(0)
        config = SigLip2Config(
            model_type="siglip2",
            vision_config=dict(
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=1,
                num_attention_heads=4,
                patch_size=8,
                num_patches=256,
            ),
            text_config=dict(
                vocab_size=1000,
                hidden_size=192,
                intermediate_size=384,
                num_hidden_layers=1,
                num_attention_heads=4,
                projection_size=256,
            ),
        )
        model = SigLip2(config)
        vision, text = model.vision_model, model.text_model
        width = 256

        def close(value, expected, tolerance=0.05):
            assert abs(value - expected) <= tolerance * abs(expected), (value, expected)

        # xavier-uniform kernels: std sqrt(2 / (fan_in + fan_out)); zero biases; LayerNorm (1, 0)
        fc1 = vision.encoder.layers[0].mlp.fc1
        close(fc1.weight.std().item(), (2 / (256 + 512)) ** 0.5)
        q_proj = vision.encoder.layers[0].self_attn.q_proj
        close(q_proj.weight.std().item(), (2 / (256 + 256)) ** 0.5)
        assert all(bool((m.bias == 0).all()) for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert bool((vision.post_layernorm.weight == 1).all()) and bool((vision.post_layernorm.bias == 0).all())
        # lecun-normal patch embedding: std 1 / sqrt(fan_in), truncated at 2 std
        patch = vision.embeddings.patch_embedding.weight
        close(patch.std().item(), (1 / (8 * 8 * 3)) ** 0.5)
        assert patch.abs().max().item() <= 2 * (1 / 192) ** 0.5 / 0.87962566103423978 + 1e-6
        # position tables and token embeddings N(0, 1/sqrt(D))
        close(vision.embeddings.position_embedding.weight.std().item(), width**-0.5)
        close(text.embeddings.token_embedding.weight.std().item(), 192**-0.5)
        close(text.embeddings.position_embedding.weight.std().item(), 192**-0.5, 0.1)
        # xavier-uniform probe over (1, 1, D): U(-a, a), a = sqrt(6 / (1 + D)), std a / sqrt(3)
        bound = (6 / (1 + width)) ** 0.5
        assert vision.head.probe.abs().max().item() <= bound
        close(vision.head.probe.std().item(), bound / 3**0.5, 0.15)
        # SigLIP paper section 3.2
        assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10

    def test_init_weights_resets(self):
        torch.manual_seed(0)
        model = SigLip2(
            SigLip2Config(model_type="siglip2", vision_config=dict(VISION, num_patches=16), text_config=dict(TEXT))
        )
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(7.0)
        model.init_weights()
        assert not any(bool((parameter == 7.0).all()) for parameter in model.parameters())
