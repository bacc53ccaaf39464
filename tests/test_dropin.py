"""Drop-in: ordinary transformers 5 user code, run once on transformers' model and once on ours.

Each snippet below is a function of ``model`` (and inputs) written exactly as a transformers user writes
it; the test runs it on ``transformers.AutoModel.from_pretrained(folder)`` and on
``kornia_siglip2.SigLip2.from_pretrained(folder)`` and asserts the same structure and values (fp32 agreement:
atol 1e-5 / rtol 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kornia_siglip2 import SigLip2
from kornia_siglip2.packing import pack_inputs

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-5, 1e-4


def _close(actual, expected):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, (type(actual), expected.shape)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (len(actual), len(expected))
        for a, e in zip(actual, expected, strict=True):
            _close(a, e)
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            _close(actual[key], expected[key])
    else:
        assert actual == expected


@pytest.fixture(scope="module")
def naflex_batch():
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 36), (52, 12), (16, 16))
    ]
    processor = transformers.Siglip2ImageProcessor(patch_size=4, max_num_patches=24)
    return dict(processor(images=images, return_tensors="pt"))


@pytest.fixture(scope="module")
def fixed_batch():
    torch.manual_seed(0)
    return {"pixel_values": torch.rand(3, 3, 16, 16) * 2 - 1}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 99, (3, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def models(request, siglip_checkpoint, siglip2_checkpoint):
    folder = siglip_checkpoint if request.param == "siglip" else siglip2_checkpoint
    # eager: transformers returns attention weights only from its eager attention
    reference = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = SigLip2.from_pretrained(folder)
    return request.param, reference, ours


@pytest.fixture
def image_inputs(models, naflex_batch, fixed_batch):
    return fixed_batch if models[0] == "siglip" else naflex_batch


# ----------------------------------------------------------------------------- user code, verbatim style
def model_card_snippet(model, inputs, input_ids):
    with torch.no_grad():
        outputs = model(input_ids=input_ids, **inputs)
    logits_per_image = outputs.logits_per_image
    probs = torch.sigmoid(logits_per_image)
    return probs


def pooled_features(model, inputs, input_ids):
    with torch.no_grad():
        image_features = model.get_image_features(**inputs).pooler_output
        text_features = model.get_text_features(input_ids=input_ids).pooler_output
    return image_features, text_features


def first_token_and_masked_mean(model, inputs, input_ids):
    with torch.no_grad():
        hidden = model.vision_model(**inputs).last_hidden_state
    first = hidden[:, 0]
    if "pixel_attention_mask" in inputs:
        mask = inputs["pixel_attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1)
    else:
        mean = hidden.mean(1)
    return first, mean


def dict_index_and_tuple_access(model, inputs, input_ids):
    with torch.no_grad():
        outputs = model(input_ids=input_ids, **inputs)
        as_tuple = model(input_ids=input_ids, **inputs, return_dict=False)
    return (
        outputs["logits_per_image"],
        outputs[0],
        outputs.to_tuple()[1],
        list(outputs.keys()),
        as_tuple[0],
        len(as_tuple),
    )


def hidden_states_and_attentions(model, inputs, input_ids):
    with torch.no_grad():
        outputs = model(input_ids=input_ids, **inputs, output_hidden_states=True, output_attentions=True)
    text = outputs.text_model_output
    vision = outputs.vision_model_output
    return text.hidden_states, text.attentions, len(vision.hidden_states), len(vision.attentions)


def text_features_with_hidden_states(model, inputs, input_ids):
    with torch.no_grad():
        out = model.get_text_features(input_ids=input_ids, output_hidden_states=True)
    return out.pooler_output, out.hidden_states[-1], out.last_hidden_state[:, -1]


def loss_and_backward(model, inputs, input_ids):
    outputs = model(input_ids=input_ids, **inputs, return_loss=True)
    outputs.loss.backward()
    grad = model.logit_bias.grad.clone()
    model.zero_grad()
    return outputs.loss.detach(), grad


def attributes(model, inputs, input_ids):
    return (
        model.device,
        model.dtype,
        model.num_parameters(),
        model.get_input_embeddings().weight.shape,
        model.config.to_dict()["model_type"],
    )


SNIPPETS = [
    model_card_snippet,
    pooled_features,
    first_token_and_masked_mean,
    dict_index_and_tuple_access,
    hidden_states_and_attentions,
    text_features_with_hidden_states,
    loss_and_backward,
    attributes,
]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet.__name__ for snippet in SNIPPETS])
def test_same_results(snippet, models, image_inputs, input_ids):
    _, reference, ours = models
    _close(snippet(ours, image_inputs, input_ids), snippet(reference, image_inputs, input_ids))


def test_vision_attentions_equal_eager_weights(models, image_inputs):
    """output_attentions equals transformers' eager attention weights on every valid query row."""
    family, _, ours = models
    folder_model = transformers.AutoModel.from_pretrained(ours.name_or_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = folder_model.vision_model(**image_inputs, output_attentions=True).attentions
        actual = ours.vision_model(**image_inputs, output_attentions=True).attentions
    assert len(actual) == len(expected)
    for ours_layer, reference_layer in zip(actual, expected, strict=True):
        assert ours_layer.shape == reference_layer.shape
        if family == "siglip":
            torch.testing.assert_close(ours_layer, reference_layer, atol=ATOL, rtol=RTOL)
        else:  # padded rows: transformers computes the padding tokens too; we never compute padding
            for row, length in enumerate(image_inputs["pixel_attention_mask"].sum(-1).tolist()):
                torch.testing.assert_close(
                    ours_layer[row, :, :length], reference_layer[row, :, :length], atol=ATOL, rtol=RTOL
                )


def test_from_transformers_without_round_trip(models, image_inputs, input_ids):
    _, reference, _ = models
    ours = SigLip2.from_transformers(reference).eval()
    _close(model_card_snippet(ours, image_inputs, input_ids), model_card_snippet(reference, image_inputs, input_ids))


def test_load_state_dict_of_transformers(models, image_inputs, input_ids):
    _, reference, ours = models
    fresh = SigLip2(ours.config).eval()
    fresh.load_state_dict(reference.state_dict(), strict=False)  # transformers 4 saved position_ids buffers
    _close(pooled_features(fresh, image_inputs, input_ids), pooled_features(reference, image_inputs, input_ids))


def test_padded_output_layout_and_packed_output_layout(models, image_inputs):
    family, _, ours = models
    with torch.no_grad():
        padded = ours.vision_model(**image_inputs).last_hidden_state
        packed = pack_inputs(**image_inputs, patch_size=ours.patch_size, drop_remainder=not ours.config.is_naflex)
        packed_out = ours.vision_model(packed).last_hidden_state
    assert padded.ndim == 3 and packed_out.ndim == 2 and packed_out.shape[0] == packed.patches.shape[0]
    if family == "siglip2":
        mask = image_inputs["pixel_attention_mask"].bool()
        torch.testing.assert_close(padded[mask], packed_out, atol=0, rtol=0)
        assert bool((padded[~mask] == 0).all())


def test_peft_lora_matches_peft_on_transformers(models, image_inputs, input_ids):
    """The usual SigLIP LoRA (q_proj, v_proj) on both models: same forward, same step."""
    peft = pytest.importorskip("peft")
    ours = models[2]
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    reference_lora = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(ours.name_or_path), peft.LoraConfig(**config)
    )
    ours_lora = peft.get_peft_model(SigLip2.from_pretrained(ours.name_or_path), peft.LoraConfig(**config))
    reference_adapters = {k: v for k, v in reference_lora.state_dict().items() if "lora_" in k}
    ours_adapters = {k: v for k, v in ours_lora.state_dict().items() if "lora_" in k}
    assert sorted(reference_adapters) == sorted(ours_adapters)  # the same adapted modules, same names
    ours_lora.load_state_dict(reference_adapters, strict=False)
    results = []
    for model in (reference_lora, ours_lora):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = model(input_ids=input_ids, **image_inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            after = model(input_ids=input_ids, **image_inputs).logits_per_image
        adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        results.append((loss.detach(), after, adapters))
    _close(results[1], results[0])


def test_errors_name_the_real_problem(siglip_checkpoint, siglip2_checkpoint, input_ids):
    """A missing batch dimension, channels-last images, NaFlex inputs given to a fixed-resolution checkpoint."""
    fixed, naflex = SigLip2.from_pretrained(siglip_checkpoint), SigLip2.from_pretrained(siglip2_checkpoint)
    for model in (fixed, naflex):
        with pytest.raises(ValueError, match="without its batch dimension"):
            model(input_ids=input_ids, pixel_values=torch.rand(3, 16, 16))
        with pytest.raises(ValueError, match="channels-last"):
            model.get_image_features(pixel_values=torch.rand(2, 16, 16, 3))
    padded = {
        "pixel_values": torch.rand(2, 16, 48),
        "pixel_attention_mask": torch.ones(2, 16, dtype=torch.int32),
        "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
    }
    with pytest.raises(ValueError, match=r"fixed-resolution checkpoint.*pixel_attention_mask, spatial_shapes"):
        fixed(input_ids=input_ids, **padded)
    with pytest.raises(ValueError, match="Siglip2ImageProcessor"):
        fixed.vision_model(torch.rand(2, 16, 48), spatial_shapes=padded["spatial_shapes"])


def test_peft_all_linear_wraps_the_modules_of_transformers(models, image_inputs, input_ids):
    """target_modules="all-linear": same adapted modules and trainable count.

    The MAP head's out_proj differs on purpose (README): transformers' nn.MultiheadAttention reads
    out_proj.weight directly, so its adapter there never gets a gradient; ours is applied and trained."""
    peft = pytest.importorskip("peft")
    family, _, ours = models
    config = dict(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    results = []
    for model_class in (transformers.AutoModel, SigLip2):
        torch.manual_seed(0)
        model = peft.get_peft_model(model_class.from_pretrained(ours.name_or_path), peft.LoraConfig(**config))
        adapted = sorted(
            name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)
        )
        model.train()
        model(input_ids=input_ids, **image_inputs, return_loss=True).loss.backward()
        head_grad = model.base_model.model.vision_model.head.attention.out_proj.lora_B["default"].weight.grad
        results.append((model.get_nb_trainable_parameters(), adapted, head_grad))
    (theirs_count, theirs_adapted, theirs_head), (ours_count, ours_adapted, ours_head) = results
    assert ours_count == theirs_count and ours_adapted == theirs_adapted
    # a Conv2d in siglip checkpoints (not adapted), a Linear in siglip2 ones (adapted), in both implementations
    assert any("patch_embedding" in name for name in ours_adapted) == (family == "siglip2")
    assert theirs_head is None and ours_head is not None and ours_head.abs().sum() > 0
