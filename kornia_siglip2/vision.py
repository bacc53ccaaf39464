"""Vision tower: patch + position embeddings, encoder over packed tokens, MAP-head pooling per frame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.core.check import KORNIA_CHECK
from torch import nn

from kornia_siglip2.attention import VarlenLayout, varlen_attention
from kornia_siglip2.config import VisionConfig
from kornia_siglip2.layers import MLP, Encoder
from kornia_siglip2.packing import check_grid_thw, packed_to_padded

__all__ = ["MAPHead", "PackedGrid", "VisionEmbeddings", "VisionOutput", "VisionTransformer"]


@dataclass(frozen=True)
class PackedGrid:
    """Host-side description of a packed image batch, computed once per forward.

    Attributes:
        grids: ``(t, h, w)`` per image as Python ints.
        attention: self-attention layout, one block of ``h * w`` tokens per frame.
        pooling: MAP-head layout, one probe query per frame attending to that frame's tokens.
    """

    grids: tuple[tuple[int, int, int], ...]
    attention: VarlenLayout
    pooling: VarlenLayout

    @classmethod
    def from_grid_thw(cls, grid_thw: torch.Tensor | Sequence[Sequence[int]], device: torch.device) -> PackedGrid:
        """Read ``grid_thw`` :math:`(n, 3)` once and derive both attention layouts."""
        if isinstance(grid_thw, torch.Tensor):
            check_grid_thw(grid_thw)
            grid_thw = grid_thw.tolist()
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw)
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        return cls(
            grids=grids,
            attention=VarlenLayout.from_seqlens(seqlens, device=device),
            pooling=VarlenLayout.from_seqlens([1] * len(seqlens), seqlens, device=device),
        )

    @property
    def num_tokens(self) -> int:
        """Total number of patches."""
        return self.attention.num_tokens_q


@dataclass
class VisionOutput:
    """Output of :class:`VisionTransformer`.

    Attributes:
        last_hidden_state: packed tokens after the final LayerNorm, :math:`(N, D)`.
        pooler_output: one MAP-pooled vector per frame, :math:`(\\sum t, D)` (``None`` without head).
        hidden_states: embeddings and every block's output, each :math:`(N, D)`, on request.
        cu_seqlens: int32 :math:`(\\sum t + 1,)` frame boundaries in ``last_hidden_state``.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    cu_seqlens: torch.Tensor

    def to_padded(
        self, tokens: torch.Tensor | None = None, max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad packed tokens into a transformers-style batch, one row per frame.

        Args:
            tokens: packed :math:`(N, D)` tokens of this output (``last_hidden_state`` by default, or one
                of ``hidden_states``).
            max_length: padded length (e.g. the processor's ``max_num_patches``); the longest frame by default.

        Returns:
            padded tokens :math:`(F, L, D)` (zeros at padding) and the bool mask :math:`(F, L)`.
        """
        tokens = self.last_hidden_state if tokens is None else tokens
        return packed_to_padded(tokens, torch.diff(self.cu_seqlens), max_length)


class VisionEmbeddings(nn.Module):
    """Linear patch embedding plus a learned position table resized to every image's grid.

    Fixed-resolution checkpoints (``naflex=False``) keep their table as is at the training grid and
    resize it bicubically without antialias at other grids (transformers' ``interpolate_pos_encoding``).
    NaFlex checkpoints resize the square table to each ``(h, w)`` with bilinear + antialias, in float32
    on CPU where antialias has no half-precision kernel (REFERENCE 2). A resize is computed once per
    distinct grid in a batch.

    Args:
        config: vision hyper-parameters.
        naflex: whether this is a SigLIP 2 NaFlex tower.
    """

    def __init__(self, config: VisionConfig, naflex: bool) -> None:
        super().__init__()
        self.naflex = naflex
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        num_positions = config.num_patches if naflex else (config.image_size // config.patch_size) ** 2
        self.position_side = round(num_positions**0.5)
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def resized_positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an ``height x width`` patch grid, :math:`(h \\cdot w, D)`."""
        table = self.position_embedding.weight
        side = self.position_side
        if not self.naflex and (height, width) == (side, side):
            return table
        # [side*side, D] -> [1, D, side, side], row-major (height, width)
        grid = table.reshape(side, side, -1).permute(2, 0, 1)[None]
        if self.naflex:
            source_dtype = grid.dtype
            if grid.device.type == "cpu" and grid.dtype in (torch.float16, torch.bfloat16):
                # antialiased bilinear has no half-precision CPU kernel: resize in float32, cast back;
                # float32 and float64 tables are resized in their own dtype
                grid = grid.float()
            resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            resized = resized.to(source_dtype)
        else:
            resized = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return resized[0].flatten(1).transpose(0, 1)

    def forward(
        self,
        patches: torch.Tensor,
        grids: Sequence[tuple[int, int, int]],
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed packed patches.

        Args:
            patches: :math:`(N, p \\cdot p \\cdot C)` flattened patches.
            grids: ``(t, h, w)`` per image, Python ints.
            mask: optional bool :math:`(N,)`; True positions get ``mask_token`` instead of their patch
                embedding (masked prediction, before the position embedding is added).
            mask_token: :math:`(D,)` learned token used where ``mask`` is True.

        Returns:
            :math:`(N, D)` token embeddings.
        """
        tokens = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        if mask is not None:
            KORNIA_CHECK(mask_token is not None, "mask_token is required when mask is given.")
            tokens = torch.where(mask[:, None], mask_token.to(tokens.dtype), tokens)
        resized = {size: self.resized_positions(*size) for size in dict.fromkeys((h, w) for _, h, w in grids)}
        if len(resized) == 1:
            # one grid for the whole batch: broadcast the table over frames instead of tiling it
            (positions,) = resized.values()
            return (tokens.view(-1, *positions.shape) + positions).view(tokens.shape)
        positions = torch.cat([resized[(h, w)] for t, h, w in grids for _ in range(t)])
        return tokens + positions


class PoolingAttention(nn.Module):
    """Cross-attention of one probe per frame to that frame's tokens (``nn.MultiheadAttention`` weights).

    Parameter names match ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) so HF checkpoints load without renaming.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        """Attend ``queries`` :math:`(F, D)` to packed ``tokens`` :math:`(N, D)`; returns :math:`(F, D)`."""
        width = tokens.shape[-1]
        head_dim = width // self.num_heads
        query = F.linear(queries, self.in_proj_weight[:width], self.in_proj_bias[:width])
        key, value = F.linear(tokens, self.in_proj_weight[width:], self.in_proj_bias[width:]).chunk(2, dim=-1)
        attended = varlen_attention(
            query.reshape(-1, self.num_heads, head_dim),
            key.reshape(-1, self.num_heads, head_dim),
            value.reshape(-1, self.num_heads, head_dim),
            layout=layout,
        )
        return self.out_proj(attended.reshape(-1, width))


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends within each frame, then a residual MLP.

    Args:
        config: vision hyper-parameters.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = PoolingAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, tokens: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        """Pool packed tokens :math:`(N, D)` into one vector per sequence of ``layout``, :math:`(F, D)`."""
        num_frames = len(layout.seqlens_q)
        probes = self.probe.reshape(1, -1).expand(num_frames, -1)
        pooled = self.attention(probes, tokens, layout)
        return pooled + self.mlp(self.layernorm(pooled))


class VisionTransformer(nn.Module):
    """SigLIP / SigLIP 2 vision tower over packed patches.

    Args:
        config: vision hyper-parameters.
        naflex: SigLIP 2 NaFlex position handling (``model_type: siglip2``) instead of a fixed table.

    Example:
        >>> from kornia_siglip2.packing import patchify
        >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                       num_attention_heads=4, patch_size=4, num_patches=16)
        >>> tower = VisionTransformer(config, naflex=True)
        >>> patches, grid_thw = patchify(torch.rand(2, 3, 8, 12), patch_size=4)
        >>> out = tower(patches, grid_thw)
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([12, 32]), torch.Size([2, 32]))
    """

    def __init__(self, config: VisionConfig, naflex: bool = True) -> None:
        super().__init__()
        self.config = config
        self.naflex = naflex
        self.embeddings = VisionEmbeddings(config, naflex)
        self.encoder = Encoder(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.layer_norm_eps,
            config.hidden_act,
        )
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = MAPHead(config) if config.vision_use_head else None

    def forward(
        self,
        patches: torch.Tensor,
        grid_thw: torch.Tensor | PackedGrid,
        output_hidden_states: bool = False,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> VisionOutput:
        """Encode a packed batch.

        Args:
            patches: :math:`(N, p \\cdot p \\cdot C)` flattened patches (see :func:`~kornia_siglip2.patchify`).
            grid_thw: :math:`(n, 3)` rows ``(t, h, w)`` with :math:`\\sum t h w = N`, or a prebuilt
                :class:`PackedGrid` (saves the host read of ``grid_thw``; lets ``torch.compile`` trace
                the whole forward).
            output_hidden_states: also return the embeddings and each block's output.
            mask: optional bool :math:`(N,)` positions whose patch embedding is replaced by ``mask_token``.
            mask_token: :math:`(D,)` learned mask embedding.

        Returns:
            :class:`VisionOutput` with ``last_hidden_state`` :math:`(N, D)` and ``pooler_output``
            :math:`(\\sum t, D)`.

        Raises:
            ValueError: ``patches`` is not 2-D with ``p * p * C`` columns, or ``grid_thw`` does not
                describe exactly ``N`` patches.
        """
        patch_dim = self.embeddings.patch_embedding.in_features
        if patches.ndim != 2 or patches.shape[-1] != patch_dim:
            raise ValueError(
                f"patches must have shape (num_patches, {patch_dim}) = (N, patch_size*patch_size*channels), "
                f"got {tuple(patches.shape)}."
            )
        # validated and read on the host once (PackedGrid.from_grid_thw), then shared by every layer
        packed = grid_thw if isinstance(grid_thw, PackedGrid) else PackedGrid.from_grid_thw(grid_thw, patches.device)
        if packed.num_tokens != patches.shape[0]:
            raise ValueError(
                f"grid_thw describes {packed.num_tokens} patches (sum of t*h*w) but patches has "
                f"{patches.shape[0]} rows."
            )
        if mask is not None and mask.shape != patches.shape[:1]:
            raise ValueError(f"mask must have shape ({patches.shape[0]},), got {tuple(mask.shape)}.")
        tokens = self.embeddings(patches, packed.grids, mask, mask_token)
        tokens, hidden_states = self.encoder(tokens, packed.attention, output_hidden_states)
        tokens = self.post_layernorm(tokens)
        pooled = self.head(tokens, packed.pooling) if self.head is not None else None
        return VisionOutput(tokens, pooled, hidden_states, packed.attention.cu_seqlens_q)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
    ) -> VisionTransformer:
        """Load the vision tower of a SigLIP / SigLIP 2 checkpoint, vision-only or dual-tower.

        See :func:`kornia_siglip2.hub.load_vision_pretrained`.
        """
        from kornia_siglip2.hub import load_vision_pretrained

        return load_vision_pretrained(
            name_or_path,
            device=device,
            dtype=dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
