"""Generation snippet of the literals in PR 2's ``tests/models/test_siglip2_varlen.py``.

transformers' ``Siglip2Model`` vision tower on the seeded NaFlex weights of ``generate_pr1_values.hf_state_dict``, a
batch of two 8 x 20 images (a 2 x 5 patch grid each) where the second image's last 4 patches are padding
(``pixel_attention_mask``), both with the full grid as ``spatial_shapes``: the position table is resized to 2 x 5 for
both, as Kornia's NaFlex embeddings do for a padded batch of equal-size images. Run with transformers installed::

    python scripts/kornia_pr/generate_pr2_values.py
"""

from __future__ import annotations

import torch
import transformers
from transformers import Siglip2Config, Siglip2Model

from generate_pr1_values import TINY, _inputs, _print, _tower_kwargs, hf_state_dict

__all__ = ["main"]


def main() -> None:
    """Print the pooled outputs and the valid hidden states of the padded batch."""
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}")
    text, vision = _tower_kwargs(naflex=True)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).double().eval()
    model.load_state_dict(hf_state_dict(naflex=True), strict=False)
    height, width, p = 8, 20, TINY["patch_size"]
    images, _ = _inputs(height, width)
    h, w = height // p, width // p
    patches = images.reshape(2, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * w, p * p * 3)
    mask = torch.ones(2, h * w, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model.vision_model(
            pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[h, w]] * 2)
        )
    _print("PADDED_POOLED", out.pooler_output[:, :4])
    _print("PADDED_HIDDEN_IMAGE1_CHANNEL0", out.last_hidden_state[1, :6, 0])


if __name__ == "__main__":
    main()
