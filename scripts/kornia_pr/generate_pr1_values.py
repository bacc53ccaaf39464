"""Generation snippet of the literals in PR 1's ``tests/models/test_siglip2_parity.py`` (kept for Kornia's reviewers).

The rendered test builds the same seeded transformers-layout weights (``hf_state_dict`` below, restated there) and
compares Kornia's ``SigLip2Model`` with the numbers this script prints, so the test needs neither transformers nor
PIL. Run it with transformers and Pillow installed (versions are printed with the values)::

    python scripts/kornia_pr/generate_pr1_values.py

It prints Python literals to paste into the test: transformers' ``SiglipModel`` (fixed resolution) and
``Siglip2Model`` (NaFlex) outputs in float64 on the seeded weights, and PIL's uint8 resizes of a fixed image.
"""

from __future__ import annotations

import math

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

__all__ = ["TINY", "hf_state_dict", "main"]

#: The tiny architecture of the test (both towers): width 16, 2 heads, MLP 32, 2 layers, patch 4.
TINY = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "patch_size": 4,
    "vocab_size": 50,
    "max_position_embeddings": 6,
    "image_size": 8,  # fixed resolution: a 2 x 2 patch grid
    "num_patches": 16,  # NaFlex: a 4 x 4 position table
}
LOGIT_SCALE = math.log(150.0)  # above the 100 that Kornia 0.9.0 clamps to
LOGIT_BIAS = -12.5


def hf_state_dict(naflex: bool) -> dict[str, torch.Tensor]:
    """Seeded float64 weights under transformers' key names (``SiglipModel`` or ``Siglip2Model``)."""
    d, m, p, c = TINY["hidden_size"], TINY["intermediate_size"], TINY["patch_size"], 3
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("text_model.embeddings.token_embedding.weight", (TINY["vocab_size"], d)),
        ("text_model.embeddings.position_embedding.weight", (TINY["max_position_embeddings"], d)),
    ]
    if naflex:
        shapes += [
            ("vision_model.embeddings.patch_embedding.weight", (d, p * p * c)),
            ("vision_model.embeddings.patch_embedding.bias", (d,)),
            ("vision_model.embeddings.position_embedding.weight", (TINY["num_patches"], d)),
        ]
    else:
        grid = TINY["image_size"] // p
        shapes += [
            ("vision_model.embeddings.patch_embedding.weight", (d, c, p, p)),
            ("vision_model.embeddings.patch_embedding.bias", (d,)),
            ("vision_model.embeddings.position_embedding.weight", (grid * grid, d)),
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


def _inputs(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    input_ids = torch.randint(
        0, TINY["vocab_size"], (2, TINY["max_position_embeddings"]), generator=torch.Generator().manual_seed(2)
    )
    return images, input_ids


def _tower_kwargs(naflex: bool) -> tuple[dict, dict]:
    common = {k: TINY[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")}
    text = dict(common, vocab_size=TINY["vocab_size"], max_position_embeddings=TINY["max_position_embeddings"])
    vision = dict(common, patch_size=TINY["patch_size"])
    vision.update({"num_patches": TINY["num_patches"]} if naflex else {"image_size": TINY["image_size"]})
    return text, vision


def _print(name: str, tensor: torch.Tensor) -> None:
    print(f"{name} = {np.array2string(tensor.detach().numpy(), precision=12, separator=', ', max_line_width=110)}")


def main() -> None:
    """Print the literals of the test, with the versions that produced them."""
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, Pillow {PIL.__version__}")

    # fixed resolution: transformers' SiglipModel
    text, vision = _tower_kwargs(naflex=False)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).double().eval()
    state = hf_state_dict(naflex=False)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    assert set(state) == expected, set(state) ^ expected
    model.load_state_dict(state, strict=False)
    images, input_ids = _inputs(TINY["image_size"], TINY["image_size"])
    with torch.no_grad():
        out = model(pixel_values=images, input_ids=input_ids)
    _print("FIXED_LOGITS_PER_IMAGE", out.logits_per_image)
    _print("FIXED_IMAGE_EMBEDS", out.image_embeds[:, :4])
    _print("FIXED_TEXT_EMBEDS", out.text_embeds[:, :4])

    # NaFlex: transformers' Siglip2Model on 8 x 20 images (a 2 x 5 patch grid from a 4 x 4 table), patchified as
    # Siglip2ImageProcessor does: patches in row-major order, each flattened in (row, column, channel) order
    text, vision = _tower_kwargs(naflex=True)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).double().eval()
    state = hf_state_dict(naflex=True)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    assert set(state) == expected, set(state) ^ expected
    model.load_state_dict(state, strict=False)
    height, width, p = 8, 20, TINY["patch_size"]
    images, input_ids = _inputs(height, width)
    h, w = height // p, width // p
    patches = images.reshape(2, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * w, p * p * 3)
    with torch.no_grad():
        out = model(
            pixel_values=patches,
            input_ids=input_ids,
            pixel_attention_mask=torch.ones(2, h * w, dtype=torch.long),
            spatial_shapes=torch.tensor([[h, w], [h, w]]),
        )
    _print("NAFLEX_LOGITS_PER_IMAGE", out.logits_per_image)
    _print("NAFLEX_IMAGE_EMBEDS", out.image_embeds[:, :4])
    _print("NAFLEX_TEXT_EMBEDS", out.text_embeds[:, :4])

    # PIL: the uint8 resize of transformers' SiglipImageProcessor, 6 x 8 -> 3 x 4, on a high-frequency pattern
    pattern = (np.arange(3 * 6 * 8) * 37 % 256).astype(np.uint8).reshape(3, 6, 8)
    for name, resample in (("PIL_BILINEAR", Image.Resampling.BILINEAR), ("PIL_BICUBIC", Image.Resampling.BICUBIC)):
        resized = np.stack([np.asarray(Image.fromarray(ch).resize((4, 3), resample=resample)) for ch in pattern])
        print(f"{name} = {resized.tolist()}")


if __name__ == "__main__":
    main()
