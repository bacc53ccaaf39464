# LICENSE HEADER MANAGED BY add-license-header
#
# Copyright 2018 Kornia Team
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#

"""Parity of SigLip2 with transformers: logit scale, initialisation, preprocessing and NaFlex checkpoints.

The expected values are transformers 5.24.0 (``SiglipModel``, ``Siglip2Model``) and Pillow 13.0.0 outputs in float64
on the seeded weights of ``_hf_state_dict``, printed by this generation snippet (kept in kornia_siglip2's repository as
``scripts/kornia_pr/generate_pr1_values.py``; it defines the same weights)::

    model = SiglipModel(SiglipConfig(text_config=..., vision_config=...)).double().eval()  # TINY sizes below
    model.load_state_dict(_hf_state_dict(naflex=False), strict=False)  # position_ids buffers stay
    out = model(pixel_values=images, input_ids=input_ids)  # _inputs(8, 8)
    print(out.logits_per_image, out.image_embeds[:, :4], out.text_embeds[:, :4])
    # NaFlex: Siglip2Model on 8 x 20 images patchified as Siglip2ImageProcessor does
    patches = images.reshape(2, 3, 2, 4, 5, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 10, 48)
    out = model(pixel_values=patches, input_ids=input_ids, pixel_attention_mask=torch.ones(2, 10),
                spatial_shapes=torch.tensor([[2, 5], [2, 5]]))
    # PIL: Image.fromarray(channel).resize((4, 3), resample) for each channel of _pattern()

transformers is not needed to run these tests.
"""

import math

import pytest
import torch

from kornia.models.siglip2 import SigLip2Config, SigLip2ImagePreprocessor, SigLip2Model
from kornia.models.siglip2.builder import _convert_hf_state_dict
from kornia.models.siglip2.config import SigLip2TextConfig, SigLip2VisionConfig

from testing.base import BaseTester

TINY = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 2}
PATCH, VOCAB, TEXT_LEN, IMAGE_SIZE, NUM_PATCHES = 4, 50, 6, 8, 16
LOGIT_SCALE, LOGIT_BIAS = math.log(150.0), -12.5

# transformers 5.24.0, torch 2.13.0, float64
FIXED_LOGITS_PER_IMAGE = [[36.612421905149, 48.539115282566], [27.260767379994, 54.372218346178]]
FIXED_IMAGE_EMBEDS = [
    [-0.185341589966, 0.150287286358, 0.006610537094, -0.282115317028],
    [-0.323540820037, 0.446608766991, 0.08333494699, -0.212634853234],
]
FIXED_TEXT_EMBEDS = [
    [0.04352686569, -0.216447546487, 0.527921490293, 0.036612016106],
    [-0.100729114895, 0.039470682068, 0.293322806822, 0.153726252041],
]
NAFLEX_LOGITS_PER_IMAGE = [[7.077466738536, 2.869505062488], [2.828740500003, 11.706167160418]]
NAFLEX_IMAGE_EMBEDS = [
    [0.454265584315, -0.009292704141, -0.254312209442, -0.169962920875],
    [0.316617771917, 0.047304729876, -0.14781684645, -0.319953372932],
]
NAFLEX_TEXT_EMBEDS = [
    [-0.17300411121, 0.0329730884, -0.060428150708, 0.202157483949],
    [-0.176411014664, 0.082201608684, -0.086483349337, 0.143036305322],
]
# Pillow 13.0.0, uint8 levels: _pattern() resized 6 x 8 -> 3 x 4 per channel
PIL_BILINEAR = [
    [[55, 122, 164, 84], [126, 165, 99, 82], [182, 109, 87, 148]],
    [[86, 106, 175, 167], [110, 173, 163, 93], [166, 139, 98, 132]],
    [[70, 90, 159, 151], [94, 157, 147, 77], [165, 164, 82, 116]],
]
PIL_BICUBIC = [
    [[41, 118, 181, 75], [123, 183, 89, 74], [196, 98, 78, 161]],
    [[81, 93, 183, 174], [101, 188, 172, 75], [175, 137, 84, 140]],
    [[65, 77, 167, 158], [84, 168, 157, 59], [174, 172, 64, 124]],
]


def _hf_state_dict(naflex: bool) -> dict[str, torch.Tensor]:
    """Seeded float64 weights under transformers' key names, as the generation snippet makes them."""
    d, m = TINY["hidden_size"], TINY["intermediate_size"]
    shapes = [
        ("text_model.embeddings.token_embedding.weight", (VOCAB, d)),
        ("text_model.embeddings.position_embedding.weight", (TEXT_LEN, d)),
        ("vision_model.embeddings.patch_embedding.weight", (d, PATCH * PATCH * 3) if naflex else (d, 3, PATCH, PATCH)),
        ("vision_model.embeddings.patch_embedding.bias", (d,)),
        ("vision_model.embeddings.position_embedding.weight", (NUM_PATCHES if naflex else 4, d)),
    ]
    for tower in ("text_model", "vision_model"):
        for i in range(TINY["num_hidden_layers"]):
            layer = f"{tower}.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes += [(f"{layer}.self_attn.{proj}.weight", (d, d)), (f"{layer}.self_attn.{proj}.bias", (d,))]
            shapes += [
                (f"{layer}.layer_norm1.weight", (d,)),
                (f"{layer}.layer_norm1.bias", (d,)),
                (f"{layer}.mlp.fc1.weight", (m, d)),
                (f"{layer}.mlp.fc1.bias", (m,)),
                (f"{layer}.mlp.fc2.weight", (d, m)),
                (f"{layer}.mlp.fc2.bias", (d,)),
                (f"{layer}.layer_norm2.weight", (d,)),
                (f"{layer}.layer_norm2.bias", (d,)),
            ]
    shapes += [
        ("text_model.final_layer_norm.weight", (d,)),
        ("text_model.final_layer_norm.bias", (d,)),
        ("text_model.head.weight", (d, d)),
        ("text_model.head.bias", (d,)),
        ("vision_model.post_layernorm.weight", (d,)),
        ("vision_model.post_layernorm.bias", (d,)),
        ("vision_model.head.probe", (1, 1, d)),
        ("vision_model.head.attention.in_proj_weight", (3 * d, d)),
        ("vision_model.head.attention.in_proj_bias", (3 * d,)),
        ("vision_model.head.attention.out_proj.weight", (d, d)),
        ("vision_model.head.attention.out_proj.bias", (d,)),
        ("vision_model.head.layernorm.weight", (d,)),
        ("vision_model.head.layernorm.bias", (d,)),
        ("vision_model.head.mlp.fc1.weight", (m, d)),
        ("vision_model.head.mlp.fc1.bias", (m,)),
        ("vision_model.head.mlp.fc2.weight", (d, m)),
        ("vision_model.head.mlp.fc2.bias", (d,)),
    ]
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes:
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        is_norm_weight = ("norm" in name) and name.endswith(".weight")
        state[name] = 1.0 + 0.1 * noise if is_norm_weight else 0.3 * noise
    state["logit_scale"] = torch.tensor([LOGIT_SCALE], dtype=torch.float64)
    state["logit_bias"] = torch.tensor([LOGIT_BIAS], dtype=torch.float64)
    return state


def _config(naflex: bool) -> SigLip2Config:
    vision = SigLip2VisionConfig(
        patch_size=PATCH, image_size=IMAGE_SIZE, num_patches=NUM_PATCHES if naflex else None, **TINY
    )
    text = SigLip2TextConfig(vocab_size=VOCAB, max_position_embeddings=TEXT_LEN, **TINY)
    return SigLip2Config(vision_config=vision, text_config=text, projection_dim=TINY["hidden_size"])


def _loaded_model(naflex: bool, device: torch.device, dtype: torch.dtype) -> SigLip2Model:
    config = _config(naflex)
    model = SigLip2Model(config).to(torch.float64)
    model.load_state_dict(_convert_hf_state_dict(_hf_state_dict(naflex), config), strict=True)
    return model.to(device, dtype).eval()


def _inputs(height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    input_ids = torch.randint(0, VOCAB, (2, TEXT_LEN), generator=torch.Generator().manual_seed(2))
    return images.to(device, dtype), input_ids.to(device)


def _pattern() -> torch.Tensor:
    """A high-frequency uint8 pattern of shape (3, 6, 8), where a Gaussian pre-blur and PIL's filter differ."""
    return (torch.arange(3 * 6 * 8) * 37 % 256).reshape(3, 6, 8).float()


class TestSigLip2Parity(BaseTester):
    @pytest.mark.parametrize("naflex", [False, True])
    def test_smoke(self, device, dtype, naflex):
        model = SigLip2Model(_config(naflex)).to(device, dtype)
        assert isinstance(model, SigLip2Model)

    def test_exception(self, device, dtype):
        model = SigLip2Model(_config(naflex=True)).to(device, dtype)
        with pytest.raises(ValueError, match="multiples of patch_size=4"):
            model.get_image_features(torch.rand(1, 3, 8, 10, device=device, dtype=dtype))
        with pytest.raises(Exception, match="square number"):
            SigLip2Model(SigLip2Config(vision_config=SigLip2VisionConfig(patch_size=PATCH, num_patches=12, **TINY)))
        with pytest.warns(DeprecationWarning, match="logit_scale_max"):
            SigLip2Config(logit_scale_max=50.0)

    @pytest.mark.parametrize("size", [(4, 4), (8, 20), (24, 12)])
    def test_cardinality(self, device, dtype, size):
        model = SigLip2Model(_config(naflex=True)).to(device, dtype).eval()
        with torch.no_grad():
            pooled, hidden = model.vision_model(torch.rand(2, 3, *size, device=device, dtype=dtype))
        assert pooled.shape == (2, TINY["hidden_size"])
        assert hidden.shape == (2, (size[0] // PATCH) * (size[1] // PATCH), TINY["hidden_size"])

    @pytest.mark.parametrize("naflex", [False, True])
    def test_matches_transformers(self, device, dtype, naflex):
        model = _loaded_model(naflex, device, dtype)
        images, input_ids = _inputs(8, 20 if naflex else 8, device, dtype)
        with torch.no_grad():
            out = model(pixel_values=images, input_ids=input_ids)
        logits, image, text = (
            (NAFLEX_LOGITS_PER_IMAGE, NAFLEX_IMAGE_EMBEDS, NAFLEX_TEXT_EMBEDS)
            if naflex
            else (FIXED_LOGITS_PER_IMAGE, FIXED_IMAGE_EMBEDS, FIXED_TEXT_EMBEDS)
        )
        self.assert_close(out.logits_per_image, torch.tensor(logits, device=device, dtype=dtype))
        self.assert_close(out.image_embeds[:, :4], torch.tensor(image, device=device, dtype=dtype))
        self.assert_close(out.text_embeds[:, :4], torch.tensor(text, device=device, dtype=dtype))

    def test_logit_scale_is_not_clamped(self, device, dtype):
        model = _loaded_model(False, device, dtype)
        images, input_ids = _inputs(8, 8, device, dtype)
        with torch.no_grad():
            out = model(pixel_values=images, input_ids=input_ids)
            expected = out.text_embeds @ out.image_embeds.T * 150.0 + LOGIT_BIAS
        self.assert_close(out.logit_scale, torch.tensor(150.0, device=device, dtype=dtype))
        self.assert_close(out.logits_per_text, expected)

    def test_initial_values(self, device, dtype):
        model = SigLip2Model(_config(naflex=False)).to(device, dtype)
        # SigLIP paper, section 3.2: t' = log 10 and b = -10
        self.assert_close(model.logit_scale.exp(), torch.tensor(10.0, device=device, dtype=dtype))
        self.assert_close(model.logit_bias, torch.tensor(-10.0, device=device, dtype=dtype))

    def test_naflex_name(self):
        config = SigLip2Config.from_name("google/siglip2-base-patch16-naflex")
        assert config.vision_config.num_patches == 256
        assert config.vision_config.patch_size == 16
        assert config.text_config.vocab_size == 256000

    def test_gradcheck(self, device):
        model = _loaded_model(True, device, torch.float64)
        images, _ = _inputs(8, 12, device, torch.float64)
        self.gradcheck(model.get_image_features, (images,))

    def test_dynamo(self, device, dtype, torch_optimizer):
        # the NaFlex vision tower, the code this change adds (the text tower is unchanged)
        vision = _loaded_model(True, device, dtype).vision_model
        images, _ = _inputs(8, 20, device, dtype)
        compiled = torch_optimizer(vision)
        with torch.no_grad():
            self.assert_close(compiled(images)[0], vision(images)[0])


class TestSigLip2ImagePreprocessorPil(BaseTester):
    def test_smoke(self, device, dtype):
        preprocessor = SigLip2ImagePreprocessor(image_size=(3, 4))
        assert isinstance(preprocessor(_pattern().to(device, dtype)), torch.Tensor)

    def test_exception(self, device, dtype):
        with pytest.raises(Exception, match=r"\(C, H, W\) or \(B, C, H, W\)"):
            SigLip2ImagePreprocessor(image_size=(3, 4))(torch.rand(6, 8, device=device, dtype=dtype))

    @pytest.mark.parametrize("batch_size", [1, 3])
    def test_cardinality(self, device, dtype, batch_size):
        images = torch.rand(batch_size, 3, 20, 30, device=device, dtype=dtype) * 255
        assert SigLip2ImagePreprocessor(image_size=(7, 9))(images).shape == (batch_size, 3, 7, 9)

    @pytest.mark.parametrize(("interpolation", "expected"), [("bilinear", PIL_BILINEAR), ("bicubic", PIL_BICUBIC)])
    def test_matches_pil(self, device, dtype, interpolation, expected):
        preprocessor = SigLip2ImagePreprocessor(image_size=(3, 4), interpolation=interpolation)
        levels = (preprocessor(_pattern().to(device, dtype))[0] * 0.5 + 0.5) * 255
        # PIL rounds to uint8 between its horizontal and vertical passes, so a float resize differs by up to about
        # one level; a Gaussian pre-blur (Kornia 0.9.0) differs by tens of levels on this pattern
        self.assert_close(levels, torch.tensor(expected, device=device, dtype=dtype), rtol=0.0, atol=1.5)

    def test_gradcheck(self, device):
        preprocessor = SigLip2ImagePreprocessor(image_size=(3, 4), interpolation="bicubic")
        self.gradcheck(preprocessor, (_pattern().to(device, torch.float64)[None],))

    def test_dynamo(self, device, dtype, torch_optimizer):
        preprocessor = SigLip2ImagePreprocessor(image_size=(3, 4))
        images = _pattern().to(device, dtype)[None]
        self.assert_close(torch_optimizer(preprocessor)(images), preprocessor(images))
