"""The dual-tower SigLIP / SigLIP 2 model: vision + text towers and the learned ``logit_scale``/``logit_bias``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.config import SigLip2Config
from kornia_siglip2.losses.sigmoid import sigmoid_loss
from kornia_siglip2.packing import padded_to_packed, patchify
from kornia_siglip2.text import TextOutput, TextTransformer
from kornia_siglip2.vision import PackedGrid, VisionOutput, VisionTransformer

__all__ = ["SigLip2", "SigLip2Output"]


@dataclass
class SigLip2Output:
    """Output of :meth:`SigLip2.forward` (the names of transformers' ``SiglipOutput``).

    Attributes:
        loss: sigmoid loss (REFERENCE 5) when ``return_loss=True``, else ``None``.
        logits_per_image: :math:`(n_{img}, n_{txt})` scaled cosine similarities plus bias.
        logits_per_text: :math:`(n_{txt}, n_{img})`, the transpose.
        text_embeds: L2-normalized pooled text features :math:`(n_{txt}, D)`.
        image_embeds: L2-normalized pooled image features :math:`(n_{img}, D)`.
        text_model_output: the text tower's :class:`~kornia_siglip2.text.TextOutput`.
        vision_model_output: the vision tower's :class:`~kornia_siglip2.vision.VisionOutput`.
    """

    loss: torch.Tensor | None
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    text_model_output: TextOutput
    vision_model_output: VisionOutput


class SigLip2(nn.Module):
    """SigLIP v1, SigLIP 2 fixed-resolution and SigLIP 2 NaFlex in one packed-first module.

    Images always travel as a packed sequence (``patches [N, p*p*C]`` + ``grid_thw [n, 3]``); the
    transformers input conventions (``pixel_values [B, C, H, W]`` for fixed resolution, padded
    ``pixel_values [B, L, p*p*C]`` + ``pixel_attention_mask`` + ``spatial_shapes`` for NaFlex) are
    converted to that at the boundary.

    Args:
        config: model configuration. Weights are randomly initialised; use :meth:`from_pretrained` to
            load a checkpoint.

    Example:
        >>> from kornia_siglip2 import SigLip2Config
        >>> config = SigLip2Config.from_hf_dict({
        ...     "model_type": "siglip2",
        ...     "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        ...                       "num_attention_heads": 2, "patch_size": 4, "num_patches": 16},
        ...     "text_config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        ...                     "num_hidden_layers": 1, "num_attention_heads": 2}})
        >>> model = SigLip2(config).eval()
        >>> out = model(input_ids=torch.randint(0, 100, (3, 64)), pixel_values=torch.rand(2, 3, 16, 24))
        >>> out.logits_per_image.shape
        torch.Size([2, 3])
    """

    def __init__(self, config: SigLip2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision_config, naflex=config.is_naflex)
        self.text_model = TextTransformer(config.text_config)
        # SigLIP paper section 3.2: t' = log 10, b = -10 at initialisation
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return self.config.vision_config.patch_size

    def pack_images(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert transformers-style image inputs into a packed ``(patches, grid_thw)`` batch.

        Args:
            pixel_values: :math:`(B, C, H, W)` normalized images, or NaFlex padded patches
                :math:`(B, L_{max}, p \\cdot p \\cdot C)` together with the next two arguments.
            pixel_attention_mask: :math:`(B, L_{max})`, 1 for valid patches (NaFlex padded input).
            spatial_shapes: :math:`(B, 2)` patch grid of each image (NaFlex padded input).

        Returns:
            ``patches`` :math:`(N, p \\cdot p \\cdot C)` and ``grid_thw`` :math:`(B, 3)`.

        Raises:
            ValueError: an input has the wrong rank or the NaFlex description is incomplete.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required (or pass patches and grid_thw).")
        if pixel_values.ndim == 4:
            return patchify(pixel_values, self.patch_size)
        if pixel_values.ndim == 3:
            if spatial_shapes is None:
                raise ValueError("Padded NaFlex pixel_values (B, L, p*p*C) need spatial_shapes (B, 2).")
            if pixel_attention_mask is None:
                lengths = spatial_shapes.long().prod(-1)
                positions = torch.arange(pixel_values.shape[1], device=pixel_values.device)
                pixel_attention_mask = positions[None] < lengths[:, None]
            return padded_to_packed(pixel_values, pixel_attention_mask, spatial_shapes)
        raise ValueError(
            "pixel_values must be images (B, C, H, W) or padded NaFlex patches (B, L, p*p*C), "
            f"got shape {tuple(pixel_values.shape)}."
        )

    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | PackedGrid | None = None,
        output_hidden_states: bool = False,
    ) -> VisionOutput:
        """Run the vision tower on either input convention; see :meth:`get_image_features`."""
        if patches is not None or grid_thw is not None:
            if patches is None or grid_thw is None:
                raise ValueError("The packed path needs both patches (N, p*p*C) and grid_thw (n, 3).")
            if pixel_values is not None:
                raise ValueError("Pass either pixel_values or patches + grid_thw, not both.")
        else:
            patches, grid_thw = self.pack_images(pixel_values, pixel_attention_mask, spatial_shapes)
        return self.vision_model(patches, grid_thw, output_hidden_states=output_hidden_states)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | PackedGrid | None = None,
    ) -> torch.Tensor:
        """Pooled (not normalized) image features, one row per image frame.

        Args:
            pixel_values: :math:`(B, C, H, W)` images, or padded NaFlex patches :math:`(B, L, p^2 C)`.
            pixel_attention_mask: :math:`(B, L)` valid-patch mask for padded NaFlex input.
            spatial_shapes: :math:`(B, 2)` patch grids for padded NaFlex input.
            patches: packed patches :math:`(N, p^2 C)` (instead of ``pixel_values``).
            grid_thw: :math:`(n, 3)` grid of each packed image.

        Returns:
            :math:`(\\sum t, D)` pooled features.
        """
        output = self.encode_images(
            pixel_values, pixel_attention_mask, spatial_shapes, patches=patches, grid_thw=grid_thw
        )
        if output.pooler_output is None:
            raise ValueError("This vision tower has no MAP head (vision_use_head=False): use last_hidden_state.")
        return output.pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled (not normalized) text features :math:`(B, P)` from ids :math:`(B, L)`."""
        return self.text_model(input_ids, attention_mask).pooler_output

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """``logits_per_text`` :math:`(n_{txt}, n_{img})` from normalized embeddings (no clamp on the scale)."""
        return text_embeds @ image_embeds.t() * self.logit_scale.exp() + self.logit_bias

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        return_loss: bool = False,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | PackedGrid | None = None,
        output_hidden_states: bool = False,
    ) -> SigLip2Output:
        """Score every image against every text.

        Args:
            input_ids: :math:`(n_{txt}, L)` token ids.
            pixel_values: see :meth:`get_image_features`.
            attention_mask: optional :math:`(n_{txt}, L)` text mask (SigLIP is used without one).
            pixel_attention_mask: see :meth:`get_image_features`.
            spatial_shapes: see :meth:`get_image_features`.
            return_loss: also compute the sigmoid loss; needs ``n_img == n_txt`` (pairs on the diagonal).
            patches: packed patches (instead of ``pixel_values``).
            grid_thw: grid of each packed image.
            output_hidden_states: keep the hidden states of both towers in the sub-outputs.

        Returns:
            :class:`SigLip2Output`.
        """
        if input_ids is None:
            raise ValueError("input_ids is required.")
        vision_output = self.encode_images(
            pixel_values,
            pixel_attention_mask,
            spatial_shapes,
            patches=patches,
            grid_thw=grid_thw,
            output_hidden_states=output_hidden_states,
        )
        text_output = self.text_model(input_ids, attention_mask, output_hidden_states)
        if vision_output.pooler_output is None:
            raise ValueError("This vision tower has no MAP head (vision_use_head=False).")
        image_embeds = F.normalize(vision_output.pooler_output, dim=-1)
        text_embeds = F.normalize(text_output.pooler_output, dim=-1)
        logits_per_text = self.logits(image_embeds, text_embeds)
        loss = None
        if return_loss:
            loss = sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        return SigLip2Output(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_output,
            vision_model_output=vision_output,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> SigLip2:
        """Load any Hugging Face SigLIP / SigLIP 2 checkpoint (hub id or local folder, safetensors only).

        Args:
            name_or_path: hub id such as ``google/siglip2-base-patch16-naflex``, or a folder with
                ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``).
            device: device of the returned model.
            dtype: floating dtype of the returned model; float32 by default, as transformers.
            revision: hub revision (branch, tag or commit).
            cache_dir: Hugging Face cache folder (defaults to huggingface_hub's).
            local_files_only: never reach the network (``HF_HUB_OFFLINE=1`` does the same).

        Returns:
            the model in eval mode.

        Raises:
            FileNotFoundError: no checkpoint at ``name_or_path``.
            ValueError: unknown ``model_type``, or missing / unexpected / mis-shaped weights (named).
        """
        from kornia_siglip2.hub import load_pretrained

        return load_pretrained(
            name_or_path,
            device=device,
            dtype=dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the Hugging Face layout (transformers loads it)."""
        from kornia_siglip2.hub import save_pretrained

        save_pretrained(self, folder)
