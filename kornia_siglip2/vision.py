"""Vision tower: patch + position embeddings, encoder over packed tokens, MAP-head pooling per frame."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.attention import Attention, fused_linear, set_attention_backend
from kornia_siglip2.config import VisionConfig
from kornia_siglip2.errors import check, check_type
from kornia_siglip2.layers import MLP, Encoder, init_transformer_weights, lecun_normal_
from kornia_siglip2.outputs import VisionOutput
from kornia_siglip2.packing import (
    ImageLayout,
    PackedImages,
    VarlenLayout,
    conv_to_linear_patch_weight,
    linear_to_conv_patch_weight,
    packed_layout,
    packed_to_padded,
)

__all__ = ["MAPHead", "VisionEmbeddings", "VisionOutput", "VisionTransformer", "check_image_inputs"]


class VisionEmbeddings(nn.Module):
    """Patch embedding plus a learned position table resized to every image's grid.

    The patch embedding holds transformers' weight, so ``state_dict()`` keys and shapes are transformers': a
    ``Conv2d`` :math:`(D, C, p, p)` for fixed-resolution towers (SigLIP v1, SigLIP 2 fixed resolution), a
    ``Linear`` :math:`(D, p^2 C)` over ``(py, px, c)`` patches for NaFlex. Both are applied as one matmul on the
    packed ``(py, px, c)`` patches; the conv kernel is reordered to that layout for it (a copy of the
    :math:`D \times p^2 C` kernel, not of the patches).

    Fixed-resolution towers (``position_embedding="fixed"``) keep their table as is at the training grid and
    resize it bicubically without antialias at other grids (transformers' ``interpolate_pos_encoding``).
    NaFlex towers resize the square table to each ``(h, w)`` with bilinear + antialias (transformers'
    ``Siglip2VisionEmbeddings.resize_positional_embeddings``), in float32 only for half precision on CPU,
    where antialias has no kernel. A resize is computed once per distinct grid in a batch.

    Args:
        config: vision hyper-parameters.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.naflex = config.is_naflex
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        #: width of one flattened patch, :math:`p^2 C`
        self.patch_dim = config.num_channels * config.patch_size**2
        if self.naflex:
            self.patch_embedding: nn.Linear | nn.Conv2d = nn.Linear(self.patch_dim, config.hidden_size)
        else:
            # never called as a conv (see forward); a Conv2d so that peft and state dicts see transformers' module
            self.patch_embedding = nn.Conv2d(
                config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
            )
        num_positions = config.num_positions
        self.position_side = round(num_positions**0.5)
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)
        # state dicts of releases <= 0.1 hold a siglip patch embedding as the Linear (D, p*p*C): load them too
        self._register_load_state_dict_pre_hook(_patch_weight_layout_hook, with_module=True)

    def patch_kernel(self) -> torch.Tensor:
        """The patch embedding as a Linear kernel over ``(py, px, c)`` patches, :math:`(D, p^2 C)`."""
        weight = self.patch_embedding.weight
        if weight.ndim == 4:  # [D, C, py, px] -> [D, py, px, C] -> [D, p*p*C]
            return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        return weight

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

    def grid_positions(self, token_grid: torch.Tensor) -> torch.Tensor:
        """NaFlex position embeddings of packed patches from their grids, :math:`(N, D)`, with tensor ops only.

        The bilinear + antialias resize written as weights (PIL's triangle filter: along an axis of ``n``
        outputs from the table's ``m`` rows, output ``o`` weighs row ``i`` by ``max(0, 1 - |i - c| / s)``,
        ``c = (o + 0.5) m / n - 0.5``, ``s = max(m / n, 1)``, normalised), one :math:`m^2`-wide weight row per
        patch times the table: the same values as :meth:`resized_positions` to float rounding, with no
        ``interpolate`` (whose antialiased form does not export to ONNX faithfully) and no Python number of the
        batch, so one traced graph serves every grid.

        Args:
            token_grid: int :math:`(N, 4)` rows ``(h, w, row, column)``
                (:attr:`~kornia_siglip2.packing.ImageLayout.token_grid`).
        """
        table = self.position_embedding.weight
        dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        side = self.position_side
        source = torch.arange(side, device=table.device, dtype=dtype)

        def axis_weights(size: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [N] -> [N, side]
            scale = side / size.to(dtype)
            center = (index.to(dtype) + 0.5) * scale - 0.5
            support = scale.clamp(min=1.0)
            weights = (1 - (source[None, :] - center[:, None]).abs() / support[:, None]).clamp(min=0)
            return weights / weights.sum(-1, keepdim=True)

        row = token_grid[:, 2]
        if table.device.type == "cpu":
            # torch's CPU antialiased bilinear kernel (2.13) gives every row of a one-column output the weights of
            # row 0 when it resizes the rows too (an h x 1 grid, h != side, gets h copies of one position); eager
            # and transformers run that kernel, so the traced path follows it
            one_column = (token_grid[:, 1] == 1) & (token_grid[:, 0] != side)
            row = torch.where(one_column, torch.zeros_like(row), row)
        rows = axis_weights(token_grid[:, 0], row)
        columns = axis_weights(token_grid[:, 1], token_grid[:, 3])
        weights = (rows[:, :, None] * columns[:, None, :]).flatten(1)  # [N, side * side], row-major table
        # weights @ table as a linear layer: oneDNN's kernel on the CPU inference path, which ran float32 at twice
        # the rate of aten's matmul (MKL) on the AMD EPYC of docs/benchmarks.md (the transposed copy: 256 x D)
        return fused_linear(weights, table.to(dtype).t().contiguous(), None).to(table.dtype)

    def forward(
        self,
        patches: torch.Tensor,
        grids: Sequence[tuple[int, int, int]],
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        position_index: torch.Tensor | None = None,
        token_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed packed patches.

        Args:
            patches: :math:`(N, p \\cdot p \\cdot C)` flattened patches.
            grids: ``(t, h, w)`` per image, Python ints.
            mask: optional bool :math:`(N,)`; True positions get ``mask_token`` instead of their patch
                embedding (masked prediction, before the position embedding is added).
            mask_token: :math:`(D,)` learned token used where ``mask`` is True.
            position_index: with dropped tokens, int64 :math:`(N,)` place of each patch in the frames' full
                ``h * w`` grids laid end to end (:attr:`~kornia_siglip2.packing.ImageLayout.position_index`);
                ``None``: all patches of every grid, in order.
            token_grid: NaFlex only: int :math:`(N, 4)` grid and place of every patch; when given, the positions
                come from :meth:`grid_positions` (the traced path) and ``grids`` is not read.

        Returns:
            :math:`(N, D)` token embeddings.
        """
        weight = self.patch_kernel()
        tokens = F.linear(patches.to(weight.dtype), weight, self.patch_embedding.bias)
        if mask is not None:
            check(mask_token is not None, "mask_token is required when mask is given.")
            tokens = torch.where(mask[:, None], mask_token.to(tokens.dtype), tokens)
        if token_grid is not None and self.naflex:
            return tokens + self.grid_positions(token_grid)
        resized = {size: self.resized_positions(*size) for size in dict.fromkeys((h, w) for _, h, w in grids)}
        if position_index is not None:
            if len(resized) == 1:  # one grid: the place within its frame indexes the one resized table
                (positions,) = resized.values()
                return tokens + positions[position_index.remainder(positions.shape[0])]
            positions = torch.cat([resized[(h, w)] for t, h, w in grids for _ in range(t)])
            return tokens + positions[position_index]
        if len(resized) == 1:
            # one grid for the whole batch: broadcast the table over frames instead of tiling it
            (positions,) = resized.values()
            return (tokens.view(-1, *positions.shape) + positions).view(tokens.shape)
        positions = torch.cat([resized[(h, w)] for t, h, w in grids for _ in range(t)])
        return tokens + positions


def _patch_weight_layout_hook(module: VisionEmbeddings, state_dict: dict, prefix: str, *args) -> None:
    key = f"{prefix}patch_embedding.weight"
    if key not in state_dict:
        return
    weight = state_dict[key]
    if module.naflex and weight.ndim == 4:
        state_dict[key] = conv_to_linear_patch_weight(weight)
    elif not module.naflex and weight.ndim == 2 and weight.shape[1] == module.patch_dim:
        state_dict[key] = linear_to_conv_patch_weight(weight, module.num_channels)


def check_image_inputs(
    config: VisionConfig,
    pixel_values: torch.Tensor | None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
) -> None:
    """Name the real problem of an image input that would otherwise fail later with a misleading message.

    - a single image :math:`(C, H, W)` without its batch dimension;
    - channels-last images :math:`(B, H, W, C)`;
    - NaFlex padded inputs (``pixel_attention_mask``, ``spatial_shapes``, :math:`(B, L, p^2 C)` patches) given to a
      fixed-resolution tower, whose processor gives :math:`(B, C, H, W)` images.

    Raises:
        ValueCheckError: one of the above, with what to pass instead.
    """
    if not isinstance(pixel_values, torch.Tensor):
        return
    channels, patch_dim = config.num_channels, config.num_channels * config.patch_size**2
    shape = tuple(pixel_values.shape)
    naflex_inputs = pixel_attention_mask is not None or spatial_shapes is not None
    check(
        not (pixel_values.ndim == 3 and shape[0] == channels and shape[-1] != patch_dim and not naflex_inputs),
        lambda: (
            f"pixel_values of shape {shape} is one image without its batch dimension: pass pixel_values[None] "
            f"(1, {channels}, H, W), or a (B, {channels}, H, W) batch."
        ),
    )
    check(
        not (pixel_values.ndim == 4 and shape[1] != channels and shape[-1] == channels),
        lambda: (
            f"pixel_values of shape {shape} is channels-last (B, H, W, C): the model takes channels-first images, "
            f"pass pixel_values.permute(0, 3, 1, 2).contiguous() (B, {channels}, H, W)."
        ),
    )
    if not config.is_naflex:
        given = [
            name
            for name, value in (("pixel_attention_mask", pixel_attention_mask), ("spatial_shapes", spatial_shapes))
            if value is not None
        ]
        if pixel_values.ndim == 3:
            given.insert(0, f"padded patches pixel_values {shape}")
        check(
            not given,
            lambda: (
                "This is a fixed-resolution checkpoint (model_type 'siglip'): it takes pixel_values "
                f"(B, {channels}, H, W) from SiglipImageProcessor, but got {', '.join(given)}, the inputs of "
                "SigLIP 2 NaFlex checkpoints (model_type 'siglip2', Siglip2ImageProcessor). Use the processor of this "
                "checkpoint, or pass packed patches + grid_thw."
            ),
        )


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends within each frame, then a residual MLP.

    Args:
        config: vision hyper-parameters.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        # torch.nn.MultiheadAttention's fused in_proj: the names of the Hugging Face weights
        self.attention = Attention(config.hidden_size, config.num_attention_heads, fused_in_proj=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, tokens: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        """Pool packed tokens :math:`(N, D)` into one vector per sequence of ``layout``, :math:`(F, D)`."""
        num_frames = layout.num_sequences
        probes = self.probe.reshape(1, -1).expand(num_frames, -1)
        pooled, _ = self.attention(probes, layout, tokens)
        return pooled + self.mlp(self.layernorm(pooled))


class VisionTransformer(nn.Module):
    """SigLIP / SigLIP 2 vision tower over packed patches.

    Args:
        config: vision hyper-parameters; ``config.position_embedding`` says fixed or NaFlex.

    Example:
        >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                       num_attention_heads=4, patch_size=4, num_patches=16, position_embedding="naflex")
        >>> tower = VisionTransformer(config)
        >>> packed = PackedImages.from_images(torch.rand(2, 3, 8, 12), patch_size=4)
        >>> out = tower(packed)
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([12, 32]), torch.Size([2, 32]))
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
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
        self.init_weights()

    def set_attention_backend(self, backend: str) -> None:
        """Use ``backend`` (one of :data:`~kornia_siglip2.attention.ATTENTION_BACKENDS`) in every attention.

        Raises:
            ValueCheckError: unknown backend.
        """
        set_attention_backend(self, backend)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (as transformers' towers)."""
        return self.post_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters (as transformers' towers)."""
        return self.post_layernorm.weight.device

    @property
    def naflex(self) -> bool:
        """Whether the position table is resized per image (SigLIP 2 NaFlex)."""
        return self.config.is_naflex

    def init_weights(self) -> None:
        """Initialise as big_vision's ``models/vit.py``.

        Linear kernels xavier-uniform with zero biases and LayerNorms (1, 0) (see
        :func:`~kornia_siglip2.layers.init_transformer_weights`); the patch embedding lecun-normal (flax's
        ``nn.Conv`` default); the position table N(0, 1/sqrt(D)) (``get_posemb(..., "learn")``); the MAP probe
        xavier-uniform over its ``(1, 1, D)`` shape, i.e. U(-a, a) with a = sqrt(6 / (1 + D)).
        """
        init_transformer_weights(self)
        width = self.config.hidden_size
        lecun_normal_(self.embeddings.patch_embedding.weight)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=width**-0.5)
        if self.head is not None:
            bound = (6.0 / (1 + width)) ** 0.5
            nn.init.uniform_(self.head.probe, -bound, bound)

    def forward(
        self,
        pixel_values: torch.Tensor | PackedImages | None = None,
        grid_thw: torch.Tensor | ImageLayout | None = None,
        *,
        patches: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        keep_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> VisionOutput | tuple:
        """Encode images given in any convention; the output's layout follows the input's.

        - packed: a :class:`~kornia_siglip2.packing.PackedImages`, or patches :math:`(N, p \\cdot p \\cdot C)`
          (first argument or ``patches=``) with ``grid_thw`` :math:`(n, 3)`: tokens :math:`(N, D)`. With
          ``keep_mask`` (NaViT token dropping) the :math:`N` patches are the kept ones of the full grids:
          each gets the position embedding of its place, attention and pooling see the kept patches only.
        - transformers' padded NaFlex input: ``pixel_values`` :math:`(B, L, p \\cdot p \\cdot C)` with
          ``spatial_shapes`` :math:`(B, 2)` (and ``pixel_attention_mask``): tokens :math:`(B, L, D)`, zeros at
          padding.
        - images :math:`(B, C, H, W)`: tokens :math:`(B, h w, D)`. A fixed-resolution tower drops the last
          ``H % p`` rows and ``W % p`` columns as transformers' Conv2d patch embedding (patch 14 at 384: a
          27 x 27 grid); a NaFlex tower requires sizes ``p`` divides.

        Inside, every convention is the same packed batch (:func:`~kornia_siglip2.packing.packed_layout`, the
        one place the conventions are told apart): no padding is computed. Only ``pixel_values`` and
        ``grid_thw`` are positional; the other arguments are keywords, in this order: the other inputs
        (``patches``, ``pixel_attention_mask``, ``spatial_shapes``, ``keep_mask``), masked prediction (``mask``,
        ``mask_token``), then what to return.

        Args:
            pixel_values: images, padded patches, packed patches or a packed batch (see above).
            grid_thw: grid of packed patches, or a prebuilt :class:`~kornia_siglip2.packing.ImageLayout`
                (saves the host read of ``grid_thw``; lets ``torch.compile`` trace the whole forward).
            patches: packed patches, as the first argument.
            pixel_attention_mask: :math:`(B, L)` valid-patch mask of padded input.
            spatial_shapes: :math:`(B, 2)` patch grids of padded input.
            keep_mask: bool :math:`(\\sum t h w,)` over the full grids of ``grid_thw``, True at the :math:`N`
                patches present in ``patches`` (packed patches only; a ``PackedImages`` carries its own).
                Every frame keeps at least one. ``None``: every patch is present.
            mask: optional bool :math:`(N,)` packed positions whose patch embedding is replaced by
                ``mask_token`` (packed input only).
            mask_token: :math:`(D,)` learned mask embedding.
            output_hidden_states: also return the embeddings and each block's output.
            output_attentions: also return every block's attention weights.
            interpolate_pos_encoding: accepted for transformers' code; position tables are always resized
                to each image's grid.
            return_dict: ``False`` returns ``to_tuple()``, as transformers.

        Returns:
            :class:`~kornia_siglip2.outputs.VisionOutput` with ``last_hidden_state`` and ``pooler_output``
            :math:`(\\sum t, D)`.

        Raises:
            ValueCheckError: patches of the wrong width, a ``grid_thw`` that does not describe them, an input
                of the wrong rank, or two inputs at once; a ``keep_mask`` of the wrong length, keeping another
                number of patches than ``patches`` has, keeping none of a frame, or given with unpacked input.
            TypeCheckError: the pixels are not a floating tensor, or ``keep_mask`` is not bool.

        Example:
            >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            ...                       num_attention_heads=4, patch_size=4, num_patches=16)
            >>> tower = VisionTransformer(config)
            >>> patches, grid_thw = PackedImages.from_images(torch.rand(2, 3, 8, 12), patch_size=4)  # 2 x 3 grids
            >>> keep_mask = torch.tensor([1, 0, 1, 1, 0, 1] + [0, 0, 1, 0, 0, 0]).bool()  # 4 + 1 kept
            >>> out = tower(patches[keep_mask], grid_thw, keep_mask=keep_mask)
            >>> out.last_hidden_state.shape, out.pooler_output.shape, out.cu_seqlens.tolist()
            (torch.Size([5, 32]), torch.Size([2, 32]), [0, 4, 5])
        """
        del interpolate_pos_encoding  # the position table is resized to every grid anyway
        check_image_inputs(self.config, pixel_values, pixel_attention_mask, spatial_shapes)
        packed_patches, layout, convention = packed_layout(
            pixel_values,
            grid_thw,
            patches=patches,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            keep_mask=keep_mask,
            patch_size=self.config.patch_size,
            drop_remainder=not self.config.is_naflex,
        )
        check(
            mask is None or convention == "packed",
            "mask (masked prediction) takes packed input: pass patches and grid_thw.",
        )
        output = self._forward_packed(packed_patches, layout, output_hidden_states, output_attentions, mask, mask_token)
        if convention != "packed":
            output = _to_input_layout(output, layout, pixel_values.shape[0], pixel_values.shape[1], convention)
        return output.to_tuple() if return_dict is False else output

    def _forward_packed(
        self,
        patches: torch.Tensor,
        layout: ImageLayout,
        output_hidden_states: bool,
        output_attentions: bool,
        mask: torch.Tensor | None,
        mask_token: torch.Tensor | None,
    ) -> VisionOutput:
        patch_dim = self.embeddings.patch_dim
        tracing = torch.compiler.is_compiling()
        check(
            patches.ndim == 2 and patches.shape[-1] == patch_dim,
            lambda: (
                f"patches must have shape (num_patches, {patch_dim}) = (N, patch_size*patch_size*channels), "
                f"got {tuple(patches.shape)}."
            ),
        )
        check_type(
            patches.dtype.is_floating_point,
            lambda: (
                f"patches must be a floating tensor of normalized pixels, got {patches.dtype}: preprocess "
                "images first (NaFlexImagePreprocessor / SigLipImagePreprocessor)."
            ),
        )
        check(
            tracing or layout.num_tokens == patches.shape[0],
            lambda: (
                f"grid_thw describes {layout.num_tokens} patches "
                f"({'kept by keep_mask' if layout.position_index is not None else 'sum of t*h*w'}) but patches "
                f"has {patches.shape[0]} rows."
            ),
        )
        check(
            mask is None or tuple(mask.shape) == (patches.shape[0],),
            lambda: f"mask must have shape ({patches.shape[0]},), got {tuple(mask.shape)}.",
        )
        # traced (compile / export): NaFlex positions from the layout's tensors, no per-grid Python number
        token_grid = layout.token_grid if tracing else None
        tokens = self.embeddings(patches, layout.grids, mask, mask_token, layout.position_index, token_grid)
        tokens, hidden_states, attentions = self.encoder(
            tokens, layout.attention, output_hidden_states, output_attentions
        )
        tokens = self.post_layernorm(tokens)
        pooled = self.head(tokens, layout.pooling) if self.head is not None else None
        return VisionOutput(
            last_hidden_state=tokens,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
            cu_seqlens=layout.attention.cu_seqlens_q,
        )


def _to_input_layout(
    output: VisionOutput, layout: ImageLayout, batch: int, length: int, input_layout: str
) -> VisionOutput:
    """Packed tokens back to the caller's layout: ``(B, h w, D)`` for images, ``(B, L, D)`` for padded input."""
    if input_layout == "images":  # equal grids: the length is the shape's, no tensor is read
        seqlens, max_length = None, output.last_hidden_state.shape[0] // batch
    else:
        seqlens, max_length = torch.tensor(layout.attention.seqlens_q, device=output.last_hidden_state.device), length

    def tokens(packed: torch.Tensor) -> torch.Tensor:
        if input_layout == "images":  # equal grids: a view, no copy
            return packed.view(batch, -1, packed.shape[-1])
        return packed_to_padded(packed, seqlens, max_length)[0]

    def weights(per_frame: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if input_layout == "images":
            return torch.stack(per_frame)
        padded = per_frame[0].new_zeros(len(per_frame), per_frame[0].shape[0], max_length, max_length)
        for row, frame in enumerate(per_frame):
            padded[row, :, : frame.shape[-2], : frame.shape[-1]] = frame
        return padded

    return VisionOutput(
        last_hidden_state=tokens(output.last_hidden_state),
        pooler_output=output.pooler_output,
        hidden_states=None if output.hidden_states is None else tuple(map(tokens, output.hidden_states)),
        attentions=None if output.attentions is None else tuple(map(weights, output.attentions)),
        cu_seqlens=output.cu_seqlens,
    )
