"""Logit lens for the vision tower: how well each layer's image representation already matches the texts.

Every hidden state (the embeddings and each block's output) goes through the tower's own final
``post_layernorm`` and MAP head, is L2-normalized and scored against the text embeddings with the model's
``logit_scale`` and ``logit_bias``. The last layer is then exactly the model's ``logits_per_image``; earlier
layers show where in depth image-text alignment appears. Works on packed batches of any image sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kornia_siglip2.errors import check, check_shape
from kornia_siglip2.model import SigLip2
from kornia_siglip2.packing import ImageLayout, PackedImages, packed_layout
from kornia_siglip2.vision import VisionTransformer

__all__ = ["layer_image_features", "logit_lens"]


def layer_image_features(
    vision_model: VisionTransformer,
    hidden_states: Sequence[torch.Tensor],
    grid_thw: torch.Tensor | ImageLayout | PackedImages,
) -> torch.Tensor:
    """Pool every hidden state with the tower's final LayerNorm and MAP head.

    Args:
        vision_model: the vision tower that produced ``hidden_states`` (it must have its MAP head).
        hidden_states: :math:`L + 1` packed states, each :math:`(N, D)` (``VisionOutput.hidden_states``).
        grid_thw: :math:`(n, 3)` grid of the packed images, or its :class:`~kornia_siglip2.packing.ImageLayout`
            or :class:`~kornia_siglip2.packing.PackedImages`.

    Returns:
        :math:`(L + 1, \\sum t, D)` pooled (not normalized) features; the last row is ``pooler_output``.

    Raises:
        ValueCheckError: no hidden states, no MAP head, or states that do not match ``grid_thw``.

    Example:
        >>> from kornia_siglip2 import VisionConfig, patchify
        >>> config = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                       patch_size=4, num_patches=16)
        >>> tower = VisionTransformer(config).eval()
        >>> patches, grid_thw = patchify(torch.rand(3, 3, 8, 12), patch_size=4)
        >>> output = tower(patches, grid_thw, output_hidden_states=True)
        >>> pooled = layer_image_features(tower, output.hidden_states, grid_thw)
        >>> pooled.shape, torch.equal(pooled[-1], output.pooler_output)
        (torch.Size([3, 3, 16]), True)
    """
    check(len(hidden_states) > 0, "hidden_states is empty: run the tower with output_hidden_states=True.")
    check(vision_model.head is not None, "The vision tower has no MAP head (vision_use_head=False).")
    first = hidden_states[0]
    if isinstance(grid_thw, PackedImages):
        packed = grid_thw.layout
    else:
        packed = grid_thw if isinstance(grid_thw, ImageLayout) else ImageLayout.from_grid_thw(grid_thw, first.device)
    pooled = []
    for index, state in enumerate(hidden_states):
        check_shape(state, ["N", "D"], f"hidden_states[{index}] must be packed tokens (N, D).")
        check(
            state.shape[0] == packed.num_tokens,
            f"hidden_states[{index}] has {state.shape[0]} tokens but grid_thw describes {packed.num_tokens}.",
        )
        pooled.append(vision_model.head(vision_model.post_layernorm(state), packed.pooling))
    return torch.stack(pooled)


def logit_lens(
    model: SigLip2,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | PackedImages | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    *,
    patches: torch.Tensor | None = None,
    grid_thw: torch.Tensor | ImageLayout | None = None,
    text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every layer's pooled image representation against the texts, as the model scores its output.

    Images come in any of the model's conventions (see :meth:`~kornia_siglip2.SigLip2.encode_image`);
    texts as token ids or as pooled text features.

    Args:
        model: the dual-tower model.
        input_ids: :math:`(T, L)` token ids (or pass ``text_embeds``).
        pixel_values: :math:`(B, C, H, W)` images, or padded NaFlex patches :math:`(B, L_{max}, p^2 C)`.
        pixel_attention_mask: :math:`(B, L_{max})` valid-patch mask of padded NaFlex input.
        spatial_shapes: :math:`(B, 2)` patch grids of padded NaFlex input.
        patches: packed patches :math:`(N, p^2 C)` (instead of ``pixel_values``).
        grid_thw: :math:`(n, 3)` grid of the packed images, or a prebuilt
            :class:`~kornia_siglip2.packing.ImageLayout` (no host read: ``torch.compile`` traces the call).
        text_embeds: :math:`(T, D)` text features (normalized here), instead of ``input_ids``.

    Returns:
        :math:`(L_{vision} + 1, \\sum t, T)` logits; index 0 is the patch + position embeddings, index -1
        equals ``model(...).logits_per_image``.

    Raises:
        ValueCheckError: not exactly one of ``input_ids`` / ``text_embeds``, an incomplete image description,
            or ``text_embeds`` that is not :math:`(T, D)` (a ``ValueError``).

    Example:
        >>> from kornia_siglip2 import SigLip2Config, patchify
        >>> config = SigLip2Config.from_hf_dict({
        ...     "model_type": "siglip2",
        ...     "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        ...                       "num_attention_heads": 2, "patch_size": 4, "num_patches": 16},
        ...     "text_config": {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
        ...                     "num_hidden_layers": 1, "num_attention_heads": 2}})
        >>> model = SigLip2(config).eval()
        >>> patches_a, grid_a = patchify(torch.rand(1, 3, 8, 12), 4)
        >>> patches_b, grid_b = patchify(torch.rand(1, 3, 16, 4), 4)
        >>> patches, grid_thw = torch.cat([patches_a, patches_b]), torch.cat([grid_a, grid_b])
        >>> input_ids = torch.randint(0, 50, (5, 64))
        >>> lens = logit_lens(model, input_ids, patches=patches, grid_thw=grid_thw)
        >>> lens.shape
        torch.Size([4, 2, 5])
        >>> torch.equal(lens[-1], model(input_ids, patches=patches, grid_thw=grid_thw).logits_per_image)
        True
    """
    check((input_ids is None) != (text_embeds is None), "Pass exactly one of input_ids (T, L) or text_embeds (T, D).")
    # one layout for the tower and the per-layer pooling: grid_thw is read from the device once
    patches, layout, _ = packed_layout(
        pixel_values,
        grid_thw,
        patches=patches,
        pixel_attention_mask=pixel_attention_mask,
        spatial_shapes=spatial_shapes,
        patch_size=model.patch_size,
        drop_remainder=not model.config.is_naflex,
    )
    output = model.vision_model(patches, layout, output_hidden_states=True)
    image_embeds = F.normalize(layer_image_features(model.vision_model, output.hidden_states, layout), dim=-1)
    if text_embeds is None:
        text_embeds = model.encode_text(input_ids)
    check_shape(text_embeds, ["T", "D"], "text_embeds must be (num_texts, D).")
    text_embeds = F.normalize(text_embeds, dim=-1)
    # the model's own logits() per layer, so the last layer is bit-identical to logits_per_image
    return torch.stack([model.logits(layer, text_embeds).t() for layer in image_embeds])
