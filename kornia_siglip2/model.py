"""The dual-tower SigLIP / SigLIP 2 model: vision + text towers and the learned ``logit_scale``/``logit_bias``.

Two surfaces over one packed core:

- transformers 5's: ``forward`` / ``get_image_features`` / ``get_text_features`` with transformers' argument
  names and ``ModelOutput`` results (key, index and attribute access, ``return_dict=False``), outputs in the
  layout of the inputs (padded in, padded out; packed in, packed out);
- tensor-out methods for Kornia / open_clip users: :meth:`SigLip2.encode_image` and
  :meth:`SigLip2.encode_text`, with a ``normalize`` flag.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.attention import set_attention_backend
from kornia_siglip2.config import SigLip2Config
from kornia_siglip2.errors import check
from kornia_siglip2.hub import from_hf_state_dict, load_pretrained, load_vision_pretrained
from kornia_siglip2.outputs import SigLip2Output, TextOutput, VisionOutput
from kornia_siglip2.packing import ImageLayout, PackedImages
from kornia_siglip2.pretrained import PreTrainedMixin
from kornia_siglip2.text import TextTransformer
from kornia_siglip2.vision import VisionTransformer

__all__ = ["SigLip2", "SigLip2Output", "load_vision_tower"]

ImageInput = torch.Tensor | PackedImages | None


class SigLip2(PreTrainedMixin, nn.Module):
    """SigLIP v1, SigLIP 2 fixed-resolution and SigLIP 2 NaFlex in one packed-first module.

    Images always travel as a packed sequence (``patches [N, p*p*C]`` + ``grid_thw [n, 3]``); the
    transformers input conventions (``pixel_values [B, C, H, W]`` for fixed resolution, padded
    ``pixel_values [B, L, p*p*C]`` + ``pixel_attention_mask`` + ``spatial_shapes`` for NaFlex) are
    converted to that at the boundary, and the outputs converted back to the caller's layout.

    Args:
        config: model configuration. Weights are initialised as big_vision does (:meth:`init_weights`);
            use :meth:`from_pretrained` to load a checkpoint.

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
        >>> out.logits_per_image.shape, out["logits_per_image"] is out[0]
        (torch.Size([2, 3]), True)
        >>> model.encode_image(torch.rand(2, 3, 16, 24), normalize=True).shape
        torch.Size([2, 32])
    """

    def __init__(self, config: SigLip2Config) -> None:
        super().__init__()
        self.config = config
        self.name_or_path = ""
        self.vision_model = VisionTransformer(config.vision_config)
        self.text_model = TextTransformer(config.text_config)
        # SigLIP paper section 3.2 (the towers initialise themselves, see init_weights)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    # ------------------------------------------------------------------ setup
    def init_weights(self) -> None:
        """Initialise both towers as big_vision does, and the logit scale / bias as the SigLIP paper.

        See :meth:`VisionTransformer.init_weights` and :meth:`TextTransformer.init_weights`;
        ``logit_scale = log 10`` and ``logit_bias = -10`` (SigLIP paper, section 3.2).
        """
        self.vision_model.init_weights()
        self.text_model.init_weights()
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
            self.logit_bias.fill_(-10.0)

    def set_attention_backend(self, backend: str) -> None:
        """Use ``backend`` (one of :data:`~kornia_siglip2.attention.ATTENTION_BACKENDS`) in every attention.

        Raises:
            ValueCheckError: unknown backend.
        """
        set_attention_backend(self, backend)

    # ------------------------------------------------------- transformers-style attributes
    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return self.config.vision_config.patch_size

    def get_input_embeddings(self) -> nn.Embedding:
        """The text token embedding (transformers' ``get_input_embeddings``)."""
        return self.text_model.embeddings.token_embedding

    # ------------------------------------------------------------------ images
    def get_image_features(
        self,
        pixel_values: ImageInput = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | ImageLayout | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> VisionOutput | tuple:
        """The vision tower's output, as transformers 5 (``.pooler_output`` is the pooled feature).

        Args:
            pixel_values: :math:`(B, C, H, W)` images, padded NaFlex patches :math:`(B, L, p^2 C)`, or a
                :class:`~kornia_siglip2.packing.PackedImages`.
            pixel_attention_mask: :math:`(B, L)` valid-patch mask for padded NaFlex input.
            spatial_shapes: :math:`(B, 2)` patch grids for padded NaFlex input.
            patches: packed patches :math:`(N, p^2 C)` (instead of ``pixel_values``).
            grid_thw: :math:`(n, 3)` grid of each packed image.
            output_hidden_states: also return every layer's tokens.
            output_attentions: also return every layer's attention weights.
            interpolate_pos_encoding: accepted for transformers' code (tables are always resized).
            return_dict: ``False`` returns a tuple, as transformers.

        Returns:
            :class:`~kornia_siglip2.outputs.VisionOutput`: ``pooler_output`` :math:`(\\sum t, D)` (not normalized)
            and ``last_hidden_state`` in the layout of the input (packed input: packed tokens :math:`(N, D)` with
            ``cu_seqlens``, for losses and decoders). For a tensor, use :meth:`encode_image`.
        """
        return self.vision_model(
            pixel_values,
            grid_thw,
            patches=patches,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=return_dict,
        )

    def encode_image(
        self,
        pixel_values: ImageInput = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | ImageLayout | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Pooled image features as a tensor (open_clip's ``encode_image``), one row per frame.

        Args:
            pixel_values: as :meth:`get_image_features`.
            pixel_attention_mask: as :meth:`get_image_features`.
            spatial_shapes: as :meth:`get_image_features`.
            patches: as :meth:`get_image_features`.
            grid_thw: as :meth:`get_image_features`.
            normalize: L2-normalize the rows (the embeddings the logits are computed from).

        Returns:
            :math:`(\\sum t, D)` features.

        Raises:
            ValueCheckError: the vision tower has no MAP head.
        """
        pooled = self.vision_model(
            pixel_values,
            grid_thw,
            patches=patches,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
        ).pooler_output
        check(pooled is not None, "This vision tower has no MAP head (vision_use_head=False): use last_hidden_state.")
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ------------------------------------------------------------------ texts
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool | None = None,
    ) -> TextOutput | tuple:
        """The text tower's output, as transformers 5 (``.pooler_output`` :math:`(B, P)` is the pooled feature).

        For a tensor, use :meth:`encode_text`.
        """
        return self.text_model(
            input_ids, attention_mask, output_hidden_states, position_ids, output_attentions, return_dict
        )

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, normalize: bool = False
    ) -> torch.Tensor:
        """Pooled text features :math:`(B, P)` as a tensor (open_clip's ``encode_text``); ``normalize`` as images."""
        pooled = self.text_model(input_ids, attention_mask).pooler_output
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ------------------------------------------------------------------ scores
    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """``logits_per_text`` :math:`(n_{txt}, n_{img})` from normalized embeddings (no clamp on the scale)."""
        return text_embeds @ image_embeds.t() * self.logit_scale.exp() + self.logit_bias

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: ImageInput = None,
        attention_mask: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        return_loss: bool = False,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | ImageLayout | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> SigLip2Output | tuple:
        """Score every image against every text (transformers' ``SiglipModel`` / ``Siglip2Model`` forward).

        Args:
            input_ids: :math:`(n_{txt}, L)` token ids.
            pixel_values: see :meth:`get_image_features`.
            attention_mask: optional :math:`(n_{txt}, L)` text mask (SigLIP is used without one).
            pixel_attention_mask: see :meth:`get_image_features`.
            spatial_shapes: see :meth:`get_image_features`.
            return_loss: also compute the sigmoid loss; needs ``n_img == n_txt`` (pairs on the diagonal).
            patches: packed patches (instead of ``pixel_values``).
            grid_thw: grid of each packed image.
            position_ids: optional text positions.
            output_hidden_states: keep the hidden states of both towers in the sub-outputs.
            output_attentions: keep the attention weights of both towers in the sub-outputs.
            interpolate_pos_encoding: accepted for transformers' code (tables are always resized).
            return_dict: ``False`` returns a tuple, as transformers.

        Returns:
            :class:`~kornia_siglip2.outputs.SigLip2Output`.

        Raises:
            ValueCheckError: no ``input_ids``, no MAP head, or (with ``return_loss``) unequal batch sizes.
        """
        check(input_ids is not None, "input_ids is required.")
        vision_output = self.vision_model(
            pixel_values,
            grid_thw,
            patches=patches,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        text_output = self.text_model(input_ids, attention_mask, output_hidden_states, position_ids, output_attentions)
        check(vision_output.pooler_output is not None, "This vision tower has no MAP head (vision_use_head=False).")
        image_embeds = F.normalize(vision_output.pooler_output, dim=-1)
        text_embeds = F.normalize(text_output.pooler_output, dim=-1)
        logits_per_text = self.logits(image_embeds, text_embeds)
        output = SigLip2Output(
            loss=_pairwise_sigmoid_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_output,
            vision_model_output=vision_output,
        )
        return output.to_tuple() if return_dict is False else output

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> SigLip2:
        """Load any Hugging Face SigLIP / SigLIP 2 checkpoint (hub id or local folder, safetensors only).

        Args:
            name_or_path: hub id such as ``google/siglip2-base-patch16-naflex``, or a folder with
                ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``).
            kwargs: transformers 5's keywords (:func:`kornia_siglip2.loading.load_options`): ``dtype`` /
                ``torch_dtype`` (``"auto"`` by default, as transformers 5: the checkpoint's stored dtype, so a
                bfloat16 checkpoint loads in bfloat16), ``device_map`` (one device: ``"cpu"``, ``"cuda"``,
                ``"auto"``, an int, a ``torch.device``) or our ``device``, ``attn_implementation`` (``"sdpa"``,
                ``"eager"``, ``"flash_attention_2"``, mapped by :data:`kornia_siglip2.loading.ATTN_IMPLEMENTATIONS`),
                the hub's ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``,
                ``subfolder``; ``config``, the configuration to use instead of the folder's ``config.json`` (a
                checkpoint folder or hub id, a :class:`SigLip2Config`, a transformers config or a dict): a
                ``transformers.Trainer.save_model`` folder holds weights only and reloads with
                ``SigLip2.from_pretrained(folder, config=BASE)``, ``BASE`` the checkpoint training started from;
                ``low_cpu_mem_usage`` and ``trust_remote_code`` are accepted and change nothing (the
                weights always load straight into the parameters; no remote code is ever run);
                ``use_safetensors=False`` is refused.

        Returns:
            the model in eval mode.

        Raises:
            FileNotFoundError: no checkpoint at ``name_or_path`` (or no ``config.json`` and no ``config=``).
            ValueCheckError: a vision-only checkpoint (the message names :class:`SigLip2VisionModel`), unknown
                ``model_type``, missing / unexpected / mis-shaped weights (named), a bad
                ``dtype`` / ``device_map`` / ``attn_implementation``, or a ``device_map`` over several devices.
            ValueError: a corrupt safetensors file or ``config.json`` (the message names the file).
            TypeError: a keyword transformers' ``from_pretrained`` has but this loader does not (named).
        """
        model = load_pretrained(cls, name_or_path, **kwargs)
        model.name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_transformers(cls, hf_model: nn.Module) -> SigLip2:
        """Build from an in-memory transformers ``SiglipModel`` / ``Siglip2Model`` (no save / load round trip).

        Every weight is shared (the state dicts have the same keys and shapes), in the model's dtype and on its
        device.

        Args:
            hf_model: a transformers dual-tower SigLIP / SigLIP 2 model.

        Returns:
            the model, in the training mode of ``hf_model``.
        """
        config = SigLip2Config.from_hf_dict(hf_model.config.to_dict())
        reference = next(hf_model.parameters())
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(from_hf_state_dict(hf_model.state_dict()), strict=True, assign=True)
        model.name_or_path = getattr(hf_model, "name_or_path", "") or ""
        return model.to(device=reference.device).train(hf_model.training)


def load_vision_tower(name_or_path: str | Path, **kwargs: Any) -> VisionTransformer:
    """The vision tower of a SigLIP / SigLIP 2 checkpoint (as transformers' ``SiglipVisionModel.from_pretrained``).

    Vision-only checkpoints (``model_type`` ``siglip_vision_model`` / ``siglip2_vision_model``, saved by
    transformers' ``SiglipVisionModel``, with or without the ``vision_model.`` key prefix) and dual-tower ones
    (text weights skipped). Keyword arguments (``dtype``, ``device_map``, ``attn_implementation``, ...) as
    :meth:`SigLip2.from_pretrained`; the reading is :func:`kornia_siglip2.hub.load_vision_pretrained`'s.

    Raises:
        ValueCheckError: unknown ``model_type``, or missing / unexpected / mis-shaped vision weights.
        FileNotFoundError: no checkpoint folder or hub id, or no ``config.json`` in it.
        TypeError: an unknown keyword argument.
    """
    return load_vision_pretrained(VisionTransformer, name_or_path, **kwargs)


def _pairwise_sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """The SigLIP loss of a square logit matrix whose diagonal holds the pairs (SigLIP paper, Algorithm 1).

    ``-sum(log_sigmoid(labels * logits)) / n`` with ``labels = 2 I - 1``, accumulated in float32 or wider;
    :class:`kornia_siglip2.losses.SigmoidLoss` is the training loss (chunked and distributed variants).
    """
    num_pairs = logits_per_text.shape[0]
    check(
        logits_per_text.shape == (num_pairs, num_pairs),
        lambda: (
            f"return_loss needs as many images as texts (pairs on the diagonal), got logits of shape "
            f"{tuple(logits_per_text.shape)}."
        ),
    )
    logits = logits_per_text.float() if logits_per_text.dtype in (torch.float16, torch.bfloat16) else logits_per_text
    labels = 2 * torch.eye(num_pairs, device=logits.device, dtype=logits.dtype) - 1
    return (-F.logsigmoid(labels * logits).sum() / num_pairs).to(logits_per_text.dtype)
