"""Transformer building blocks shared by the vision and text towers: MLP, attention, pre-LN block, encoder.

Every block works on packed tokens :math:`(N, D)` and a :class:`~kornia_siglip2.attention.VarlenLayout`
that says which tokens attend to each other; a text batch is the special case of equal lengths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.attention import VarlenLayout, varlen_attention

__all__ = ["MLP", "Encoder", "EncoderBlock", "SelfAttention", "activation"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function called ``name`` in HF configs (``gelu_pytorch_tanh`` for SigLIP)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {tuple(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


class MLP(nn.Module):
    """Two-layer perceptron ``fc2(act(fc1(x)))``.

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to :math:`(*, D)` tokens."""
        return self.fc2(self.act(self.fc1(hidden_states)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection over packed tokens.

    Args:
        width: token width :math:`D`.
        num_heads: heads :math:`H` (``D`` divisible by ``H``).

    Example:
        >>> attention = SelfAttention(8, num_heads=2)
        >>> layout = VarlenLayout.from_seqlens([3, 2])
        >>> attention(torch.rand(5, 8), layout).shape
        torch.Size([5, 8])
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: VarlenLayout,
        key_padding_mask: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Attend within each sequence of ``layout``.

        Args:
            hidden_states: packed tokens :math:`(N, D)`.
            layout: which tokens form a sequence.
            key_padding_mask: optional :math:`(B, L)` bool mask (True = attend) for a layout of ``B``
                sequences of equal length ``L``; used by the text tower's ``attention_mask``.
            backend: attention backend, see :func:`~kornia_siglip2.attention.varlen_attention`.

        Returns:
            :math:`(N, D)` tokens.
        """
        num_tokens = hidden_states.shape[0]
        # [N, 3D] -> 3 x [N, H, Dh]
        query, key, value = self.qkv(hidden_states).view(num_tokens, 3, self.num_heads, self.head_dim).unbind(1)
        if key_padding_mask is None:
            attended = varlen_attention(query, key, value, layout=layout, backend=backend)
        else:
            batch, length = key_padding_mask.shape
            query, key, value = (
                tensor.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                for tensor in (query, key, value)
            )
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_padding_mask[:, None, None, :])
            attended = attended.transpose(1, 2)
        return self.out_proj(attended.reshape(num_tokens, -1))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN1(x))`` then ``x + mlp(LN2(x))``.

    Args:
        width: token width :math:`D`.
        num_heads: attention heads.
        hidden_width: MLP inner width.
        layer_norm_eps: LayerNorm epsilon (1e-6 in SigLIP).
        hidden_act: MLP activation name.
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
        self.self_attn = SelfAttention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, hidden_width, hidden_act)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: VarlenLayout,
        key_padding_mask: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Transform packed tokens :math:`(N, D)`; see :meth:`SelfAttention.forward` for the arguments."""
        hidden_states = hidden_states + self.self_attn(
            self.layer_norm1(hidden_states), layout, key_padding_mask, backend
        )
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` (the ``encoder.layers.{i}`` of both towers).

    Example:
        >>> encoder = Encoder(2, width=8, num_heads=2, hidden_width=16)
        >>> tokens, hidden_states = encoder(torch.rand(7, 8), VarlenLayout.from_seqlens([4, 3]), True)
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
        #: attention backend used by every layer (see :data:`kornia_siglip2.attention.BACKENDS`)
        self.attention_backend = "auto"

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: VarlenLayout,
        output_hidden_states: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run all blocks.

        Args:
            hidden_states: packed tokens :math:`(N, D)`.
            layout: sequence layout shared by every layer.
            output_hidden_states: also return the input and the output of every block.
            key_padding_mask: see :meth:`SelfAttention.forward`.

        Returns:
            the last tokens :math:`(N, D)` and, on request, ``num_layers + 1`` hidden states.
        """
        all_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, layout, key_padding_mask, self.attention_backend)
            if all_states is not None:
                all_states.append(hidden_states)
        return hidden_states, (tuple(all_states) if all_states is not None else None)
