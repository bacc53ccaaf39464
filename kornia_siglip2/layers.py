"""Transformer building blocks shared by the vision and text towers: MLP, pre-LN block, encoder.

Every block works on packed tokens :math:`(N, D)` and a :class:`~kornia_siglip2.packing.VarlenLayout` that
says which tokens attend to each other; a text batch is the special case of equal lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kornia_siglip2.attention import Attention, _plain_linear, fused_linear, fused_linear_available
from kornia_siglip2.config import ACTIVATIONS
from kornia_siglip2.errors import check
from kornia_siglip2.packing import VarlenLayout

__all__ = [
    "MLP",
    "Encoder",
    "EncoderBlock",
    "EncoderOutput",
    "activation",
    "compile_blocks",
    "init_transformer_weights",
    "lecun_normal_",
    "uncompile_blocks",
]

#: ``(last tokens, hidden states or None, attention weights per layer or None)``
EncoderOutput = tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[tuple[torch.Tensor, ...], ...] | None]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function called ``name`` in HF configs (``gelu_pytorch_tanh`` for SigLIP).

    Raises:
        ValueCheckError: ``name`` is not in :data:`~kornia_siglip2.config.ACTIVATIONS`.
    """
    check(name in ACTIVATIONS, lambda: f"Unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def init_transformer_weights(module: nn.Module) -> None:
    """big_vision's defaults for every Linear and LayerNorm below ``module``.

    Linear kernels xavier-uniform (``nn.Dense(kernel_init=xavier_uniform())`` in big_vision's ``MlpBlock``
    and attention), biases zero (big_vision draws the MLP biases from N(0, 1e-6): zero is that to within
    1e-6), LayerNorm scale 1 and offset 0.

    Example:
        >>> mlp = MLP(8, 16)
        >>> init_transformer_weights(mlp)
        >>> bool((mlp.fc1.bias == 0).all()), bool(mlp.fc1.weight.abs().max() <= (6 / 24) ** 0.5)
        (True, True)
    """
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
        elif isinstance(child, Attention) and child.fused_in_proj:
            # one xavier draw per projection, as three separate kernels would get
            with torch.no_grad():
                for part in child.in_proj_weight.chunk(3):
                    nn.init.xavier_uniform_(part)
            nn.init.zeros_(child.in_proj_bias)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's ``lecun_normal``: truncated normal (two standard deviations) with variance ``1 / fan_in``.

    ``fan_in`` is the product of all axes but the first (a Linear's input width, a conv's ``C * p * p``).
    The standard deviation is divided by 0.8796, the standard deviation of a unit normal truncated at two.
    """
    fan_in = weight[0].numel()
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class MLP(nn.Module):
    """Two-layer perceptron ``fc2(act(fc1(x)))``.

    On the CPU inference path (:func:`~kornia_siglip2.attention.fused_linear`) the GELU runs inside the
    ``fc1`` matmul and a residual inside the ``fc2`` one.

    Args:
        width: input and output width :math:`D`.
        hidden_width: inner width.
        hidden_act: activation name (see :func:`activation`).

    Example:
        >>> MLP(8, 16)(torch.rand(5, 8)).shape
        torch.Size([5, 8])
    """

    def __init__(self, width: int, hidden_width: int, hidden_act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)
        self.act = activation(hidden_act)
        self._act_name = hidden_act
        self._fused_act = _FUSED_ACTIVATIONS.get(hidden_act)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the MLP to :math:`(*, D)` tokens, plus ``residual`` (same shape) when given."""
        fc1, fc2 = self.fc1, self.fc2
        if (
            hidden_states.ndim == 2
            and _plain_linear(fc1)
            and _plain_linear(fc2)
            and fused_linear_available(hidden_states, fc1.weight, fc2.weight)
        ):
            fused_act = self._fused_act if self.act is ACTIVATIONS.get(self._act_name) else None
            if fused_act is not None:
                inner = fused_linear(hidden_states, fc1.weight, fc1.bias, fused_act)
            else:
                inner = self.act(fused_linear(hidden_states, fc1.weight, fc1.bias))
            return fused_linear(inner, fc2.weight, fc2.bias, residual=residual)
        output = fc2(self.act(fc1(hidden_states)))
        return output if residual is None else residual + output


#: activations that oneDNN fuses into a matmul, by their HF config name
_FUSED_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN1(x))`` then ``x + mlp(LN2(x))``.

    Args:
        width: token width :math:`D`.
        num_heads: attention heads.
        hidden_width: MLP inner width.
        layer_norm_eps: LayerNorm epsilon (1e-6 in SigLIP).
        hidden_act: MLP activation name.

    Example:
        >>> block = EncoderBlock(8, num_heads=2, hidden_width=16)
        >>> tokens, weights = block(torch.rand(7, 8), VarlenLayout.from_seqlens([4, 3]), output_attentions=True)
        >>> tokens.shape, [tuple(w.shape) for w in weights]
        (torch.Size([7, 8]), [(2, 4, 4), (2, 3, 3)])
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        hidden_width: int,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.self_attn = Attention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, hidden_width, hidden_act)

        #: ``torch.compile`` options of :func:`compile_blocks` (``None``: eager), a hashable tuple of items
        self.compile_options: tuple[tuple[str, Any], ...] | None = None

    def forward(
        self, hidden_states: torch.Tensor, layout: VarlenLayout, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Transform packed tokens :math:`(N, D)`; returns them and, on request, the attention weights."""
        if self.compile_options is None:
            query, key, value = self.attention_input(hidden_states)
            attended, weights = self.self_attn.attend(query, key, value, layout, output_attentions)
            return self.attention_output(attended, hidden_states), weights
        before, after = _compiled_regions(self.compile_options)
        query, key, value = before(self, hidden_states)
        attended, weights = self.self_attn.attend(query, key, value, layout, output_attentions, merge_heads=False)
        if attended._base is not None:
            # a view: its base, whose shape depends on the layout (one group of sequences or several), would
            # enter the graph's guards and recompile it; a fresh tensor keeps one graph for every batch
            attended = attended.clone()
        return after(self, attended, hidden_states), weights

    def attention_input(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LayerNorm, then q/k/v split into heads, :math:`(N, H, D_h)` each: the block before attention."""
        return self.self_attn.project_heads(self.layer_norm1(hidden_states))

    def attention_output(self, attended: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block after attention: output projection + skip, then LayerNorm, MLP + skip, :math:`(N, D)`.

        ``attended`` is :math:`(N, D)` or :math:`(N, H, D_h)`.

        The skip connections go into the projections: fused into their matmuls on the CPU inference path.
        """
        hidden_states = self.self_attn.project_output(attended, residual=hidden_states)
        return self.mlp(self.layer_norm2(hidden_states), residual=hidden_states)


@functools.cache
def _compiled_regions(options: tuple[tuple[str, Any], ...]) -> tuple[Callable, Callable]:
    """``torch.compile`` of the two per-token halves of :class:`EncoderBlock`, one pair per option set.

    Compiled as functions of the block (not per module), so every block of a model, of either tower and of
    any model with the same options shares one cache: a layer of the same widths reuses the graph of the
    first. Neither half sees the sequence layout, so the graphs hold for any packed batch.
    """
    kwargs = dict(options)
    return torch.compile(EncoderBlock.attention_input, **kwargs), torch.compile(EncoderBlock.attention_output, **kwargs)


def compile_blocks(module: nn.Module, *, dynamic: bool | None = True, **options: Any) -> nn.Module:
    """Compile every :class:`EncoderBlock` below ``module`` around its attention; returns ``module``.

    Each block runs as three parts: LayerNorm + q/k/v projection, attention, output projection + MLP.
    The first and last are per token, with no knowledge of which tokens form an image, so they are compiled
    (``torch.compile``, dynamic in the token count by default) and the same graphs serve every batch, whatever
    its grids and number of images: no recompilation from one NaFlex batch to the next. The attention in
    between runs eagerly with the module's varlen backend (``"grouped"``, ``"flash"`` ...), which reads the
    per-batch layout on the host; the compiled parts fuse what eager runs as separate memory passes
    (LayerNorm, bias, GELU, skip additions). Regional compilation: one pair of graphs for all blocks of
    the same widths, so compile time does not grow with depth. Embeddings, pooling heads and the
    un-padding of other input layouts stay eager. Works for inference and training (gradients flow through
    the compiled parts; :meth:`Encoder.set_grad_checkpointing` composes with it). ``output_attentions=True``
    keeps working (the eager backend computes the weights).

    Args:
        module: a model, a tower or an encoder; every :class:`EncoderBlock` inside it is compiled.
        dynamic: ``torch.compile``'s ``dynamic``; ``True`` (default) traces the token count as a symbol at the
            first call, so that batches of another size do not recompile; ``None`` is torch's default
            (specialise first, then recompile once as dynamic); ``False`` compiles per token count.
        **options: other ``torch.compile`` keyword arguments (``mode``, ``backend``, ``options``); hashable
            values only, as they key the shared cache.

    Returns:
        ``module`` (changed in place; :func:`uncompile_blocks` undoes it).

    Raises:
        ValueCheckError: ``module`` holds no :class:`EncoderBlock`.

    Example:
        >>> encoder = Encoder(2, width=8, num_heads=2, hidden_width=16)
        >>> _ = compile_blocks(encoder, backend="aot_eager")
        >>> [block.compile_options for block in encoder.layers]  # doctest: +NORMALIZE_WHITESPACE
        [(('backend', 'aot_eager'), ('dynamic', True)), (('backend', 'aot_eager'), ('dynamic', True))]
        >>> for seqlens in ([4, 3], [9, 1, 6]):  # any layout, the same two graphs
        ...     tokens, _, _ = encoder(torch.rand(sum(seqlens), 8), VarlenLayout.from_seqlens(seqlens))
        >>> _ = uncompile_blocks(encoder)
    """
    blocks = [child for child in module.modules() if isinstance(child, EncoderBlock)]
    check(len(blocks) > 0, lambda: f"compile_blocks: {type(module).__name__} holds no EncoderBlock to compile.")
    key = tuple(sorted({**options, "dynamic": dynamic}.items()))
    _compiled_regions(key)  # builds the compiled functions (no tracing yet); fails early on unhashable options
    for block in blocks:
        block.compile_options = key
    return module


def uncompile_blocks(module: nn.Module) -> nn.Module:
    """Run every :class:`EncoderBlock` below ``module`` eagerly again (undoes :func:`compile_blocks`)."""
    for child in module.modules():
        if isinstance(child, EncoderBlock):
            child.compile_options = None
    return module


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` (the ``encoder.layers.{i}`` of both towers).

    Args:
        num_layers: number of blocks.
        width: token width :math:`D`.
        num_heads: attention heads.
        hidden_width: MLP inner width.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: MLP activation name.

    Attributes:
        gradient_checkpointing: recompute each block in the backward pass instead of keeping its
            activations (``torch.utils.checkpoint``; set with :meth:`set_grad_checkpointing`).

    Example:
        >>> encoder = Encoder(2, width=8, num_heads=2, hidden_width=16)
        >>> tokens, hidden_states, _ = encoder(torch.rand(7, 8), VarlenLayout.from_seqlens([4, 3]), True)
        >>> tokens.shape, len(hidden_states)
        (torch.Size([7, 8]), 3)
    """

    def __init__(
        self,
        num_layers: int,
        width: int,
        num_heads: int,
        hidden_width: int,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderBlock(width, num_heads, hidden_width, layer_norm_eps, hidden_act) for _ in range(num_layers)
        )
        self.gradient_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass (less activation memory, one more forward)."""
        self.gradient_checkpointing = enable

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: VarlenLayout,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Run all blocks.

        Args:
            hidden_states: packed tokens :math:`(N, D)`.
            layout: sequence layout shared by every layer.
            output_hidden_states: also return the input and the output of every block.
            output_attentions: also return every block's attention weights.

        Returns:
            the last tokens :math:`(N, D)`, on request ``num_layers + 1`` hidden states, and on request one
            tuple of per-sequence :math:`(H, L, L)` weights per block.
        """
        all_states = [hidden_states] if output_hidden_states else None
        all_weights = [] if output_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, weights = checkpoint(
                    layer, hidden_states, layout, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, weights = layer(hidden_states, layout, output_attentions)
            if all_states is not None:
                all_states.append(hidden_states)
            if all_weights is not None:
                all_weights.append(weights)
        return (
            hidden_states,
            tuple(all_states) if all_states is not None else None,
            tuple(all_weights) if all_weights is not None else None,
        )
