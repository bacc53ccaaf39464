"""Text tower: token + learned position embeddings, encoder, final LayerNorm, last-position pooling + head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kornia_siglip2.attention import VarlenLayout
from kornia_siglip2.config import TextConfig
from kornia_siglip2.layers import Encoder

__all__ = ["TextEmbeddings", "TextOutput", "TextTransformer"]


@dataclass
class TextOutput:
    """Output of :class:`TextTransformer`.

    Attributes:
        last_hidden_state: tokens after the final LayerNorm, :math:`(B, L, D)`.
        pooler_output: head applied to the last position, :math:`(B, P)`.
        hidden_states: embeddings and every block's output, each :math:`(B, L, D)`, on request.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned position embedding at positions ``0 .. L-1``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ids :math:`(B, L)` into :math:`(B, L, D)`."""
        length = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class TextTransformer(nn.Module):
    """SigLIP text tower: embeddings, encoder, final LayerNorm, last-position pooling and head.

    Pooling takes the hidden state at the last position (index -1) whatever the padding, as the model
    was trained (``padding="max_length"``), then applies ``head``.

    Args:
        config: text hyper-parameters.

    Example:
        >>> config = TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                     num_attention_heads=2, max_position_embeddings=8, projection_size=12)
        >>> out = TextTransformer(config)(torch.randint(0, 50, (3, 8)))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([3, 8, 16]), torch.Size([3, 12]))
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.layer_norm_eps,
            config.hidden_act,
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TextOutput:
        """Encode token ids.

        Args:
            input_ids: :math:`(B, L)` token ids, ``L <= max_position_embeddings``.
            attention_mask: optional :math:`(B, L)`, 1 for tokens keys may attend to. SigLIP was trained
                without one; passing one changes the pooled vector (as in transformers).
            output_hidden_states: also return the embeddings and each block's output.

        Returns:
            :class:`TextOutput`.

        Raises:
            ValueError: wrong shape, too long, or ids out of the vocabulary.
        """
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor of shape (B, L), got {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {length} > max_position_embeddings {self.config.max_position_embeddings}."
            )
        if not torch.compiler.is_compiling() and input_ids.numel():
            low, high = (int(value) for value in torch.aminmax(input_ids))  # one host sync, not two
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got [{low}, {high}].")
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
                )
            key_padding_mask = attention_mask.bool()
        layout = VarlenLayout.from_seqlens([length] * batch, device=input_ids.device)
        tokens = self.embeddings(input_ids).reshape(batch * length, -1)
        tokens, hidden_states = self.encoder(tokens, layout, output_hidden_states, key_padding_mask)
        tokens = self.final_layer_norm(tokens).reshape(batch, length, -1)
        if hidden_states is not None:
            hidden_states = tuple(state.reshape(batch, length, -1) for state in hidden_states)
        return TextOutput(tokens, self.head(tokens[:, -1]), hidden_states)
