"""The vision tower on its own, as transformers' ``SiglipVisionModel`` / ``Siglip2VisionModel`` (for VLMs).

VLM repositories ship the SigLIP / SigLIP 2 image encoder alone (``model_type`` ``siglip_vision_model`` /
``siglip2_vision_model``, state-dict keys without the ``vision_model.`` prefix in transformers 5); VLM code calls
it with transformers' arguments and reads ``last_hidden_state``, ``hidden_states[-2]`` or ``pooler_output``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kornia_siglip2.config import VisionConfig
from kornia_siglip2.hub import load_vision_pretrained
from kornia_siglip2.outputs import VisionOutput
from kornia_siglip2.packing import ImageLayout, PackedImages
from kornia_siglip2.pretrained import PreTrainedMixin
from kornia_siglip2.vision import VisionTransformer

__all__ = ["SigLip2VisionModel"]


class SigLip2VisionModel(PreTrainedMixin, VisionTransformer):
    """The vision tower with transformers' ``SiglipVisionModel`` / ``Siglip2VisionModel`` surface.

    ``state_dict()`` keys and shapes are transformers 5's (``embeddings.patch_embedding.weight``, ...; no
    ``vision_model.`` prefix). :meth:`from_pretrained` reads vision-only checkpoints and the vision tower of
    dual-tower ones; :meth:`save_pretrained` writes a vision-only checkpoint transformers' ``AutoModel`` loads.

    Args:
        config: vision hyper-parameters (``position_embedding`` ``"fixed"`` for SigLIP / SigLIP 2 fixed resolution,
            ``"naflex"`` for SigLIP 2 NaFlex).

    Example:
        >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                       patch_size=4, image_size=16, position_embedding="fixed")
        >>> model = SigLip2VisionModel(config).eval()
        >>> out = model(pixel_values=torch.rand(2, 3, 16, 16), output_hidden_states=True)
        >>> out.last_hidden_state.shape, out.hidden_states[-2].shape, out.pooler_output.shape
        (torch.Size([2, 16, 32]), torch.Size([2, 16, 32]), torch.Size([2, 32]))
        >>> model.dtype, model.device.type, sorted(model.state_dict())[0]
        (torch.float32, 'cpu', 'embeddings.patch_embedding.bias')
    """

    #: transformers' name of the first input
    main_input_name = "pixel_values"

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.name_or_path = ""

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (transformers' ``SiglipVisionModel.get_input_embeddings``)."""
        return self.embeddings.patch_embedding

    def forward(  # type: ignore[override]
        self,
        pixel_values: torch.Tensor | PackedImages | None = None,
        pixel_attention_mask: torch.Tensor | bool | None = None,
        spatial_shapes: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        *,
        patch_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool | None = None,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | ImageLayout | None = None,
    ) -> VisionOutput | tuple:
        """Encode images with transformers' arguments; the output's layout follows the input's.

        Args:
            pixel_values: :math:`(B, C, H, W)` images, padded NaFlex patches :math:`(B, L, p^2 C)` or a
                :class:`~kornia_siglip2.packing.PackedImages` (see
                :meth:`~kornia_siglip2.vision.VisionTransformer.forward`).
            pixel_attention_mask: :math:`(B, L)` valid-patch mask of padded NaFlex input (``Siglip2VisionModel``'s
                second argument). A bool here is ``SiglipVisionModel``'s second argument, ``interpolate_pos_encoding``.
            spatial_shapes: :math:`(B, 2)` patch grids of padded NaFlex input.
            interpolate_pos_encoding: accepted for transformers' code (tables are always resized to the grid).
            patch_attention_mask: accepted as transformers' ``SiglipVisionModel`` accepts it (Idefics-style callers)
                and, as there, not applied: every patch of a :math:`(B, C, H, W)` image is attended to. A mask that
                leaves patches out warns; for images of different sizes pass NaFlex or packed input instead.
            output_hidden_states: also return the embeddings and each block's output.
            output_attentions: also return every block's attention weights.
            return_dict: ``False`` returns a tuple, as transformers.
            patches: packed patches :math:`(N, p^2 C)` (instead of ``pixel_values``).
            grid_thw: :math:`(n, 3)` grid of packed patches.

        Returns:
            :class:`~kornia_siglip2.outputs.VisionOutput` (``last_hidden_state``, ``pooler_output``, ...).
        """
        if isinstance(pixel_attention_mask, bool):  # SiglipVisionModel(pixel_values, interpolate_pos_encoding)
            pixel_attention_mask, interpolate_pos_encoding = None, pixel_attention_mask
        if (
            patch_attention_mask is not None
            and not torch.compiler.is_compiling()
            and not bool(patch_attention_mask.all())
        ):
            warnings.warn(
                "patch_attention_mask is not applied (as in transformers' SiglipVisionModel): every patch is "
                "attended to. For images of different sizes pass NaFlex inputs (pixel_attention_mask + spatial_shapes) "
                "or packed patches + grid_thw.",
                UserWarning,
                stacklevel=2,
            )
        return super().forward(
            pixel_values,
            grid_thw,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            patches=patches,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=return_dict,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> SigLip2VisionModel:
        """Load a vision-only checkpoint, or the vision tower of a dual-tower one (its text weights are not read).

        Args:
            name_or_path: hub id or folder of a ``SiglipVisionModel`` / ``Siglip2VisionModel`` save (keys with or
                without the ``vision_model.`` prefix) or of a ``SiglipModel`` / ``Siglip2Model`` one.
            kwargs: as :meth:`kornia_siglip2.SigLip2.from_pretrained` (``dtype``, ``device_map``,
                ``attn_implementation``, ``config``, the hub's keywords).

        Returns:
            the model in eval mode.

        Raises:
            FileNotFoundError: no checkpoint at ``name_or_path``.
            ValueCheckError: unknown ``model_type``, or missing / unexpected / mis-shaped vision weights.
        """
        model = load_vision_pretrained(cls, name_or_path, **kwargs)
        model.name_or_path = str(name_or_path)
        return model
