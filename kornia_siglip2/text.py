"""Text tower: token + learned position embeddings, encoder, final LayerNorm, last-position pooling + head."""

from __future__ import annotations

import torch
from torch import nn

from kornia_siglip2.config import TextConfig
from kornia_siglip2.errors import check
from kornia_siglip2.layers import Encoder, init_transformer_weights
from kornia_siglip2.outputs import TextOutput
from kornia_siglip2.packing import VarlenLayout

__all__ = ["TextEmbeddings", "TextOutput", "TextTransformer"]


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned position embedding at positions ``0 .. L-1``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ids :math:`(B, L)` into :math:`(B, L, D)` (positions ``0 .. L-1`` unless ``position_ids``)."""
        if position_ids is None:
            return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[-1]]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


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
        self.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (as transformers' towers)."""
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters (as transformers' towers)."""
        return self.final_layer_norm.weight.device

    def init_weights(self) -> None:
        """Initialise as big_vision's text transformer.

        Linear kernels xavier-uniform with zero biases and LayerNorms (1, 0) (see
        :func:`~kornia_siglip2.layers.init_transformer_weights`); token embeddings N(0, 1/sqrt(D)) (flax's
        ``nn.Embed`` default, ``variance_scaling(1, "fan_in", "normal")`` over the width); the position table
        N(0, 1/sqrt(D)) (``get_posemb(..., "learn")``).
        """
        init_transformer_weights(self)
        width = self.config.hidden_size
        nn.init.normal_(self.embeddings.token_embedding.weight, std=width**-0.5)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=width**-0.5)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool = False,
        return_dict: bool | None = None,
    ) -> TextOutput | tuple:
        """Encode token ids.

        Args:
            input_ids: :math:`(B, L)` token ids, ``L <= max_position_embeddings``.
            attention_mask: optional :math:`(B, L)`, 1 for tokens keys may attend to. SigLIP was trained
                without one; passing one changes the pooled vector (as in transformers).
            output_hidden_states: also return the embeddings and each block's output.
            position_ids: optional :math:`(B, L)` or :math:`(1, L)` positions; ``0 .. L-1`` by default.
            output_attentions: also return every block's attention weights.
            return_dict: ``False`` returns ``to_tuple()``, as transformers.

        Returns:
            :class:`~kornia_siglip2.outputs.TextOutput`.

        Raises:
            ValueCheckError: wrong shape, too long, or ids out of the vocabulary.
        """
        check(
            input_ids.ndim == 2 and not input_ids.dtype.is_floating_point,
            lambda: (
                f"input_ids must be an integer tensor of shape (B, L), got {tuple(input_ids.shape)} {input_ids.dtype}."
            ),
        )
        batch, length = input_ids.shape
        check(
            length <= self.config.max_position_embeddings,
            lambda: f"input_ids has length {length} > max_position_embeddings {self.config.max_position_embeddings}.",
        )
        if not torch.compiler.is_compiling() and input_ids.numel():
            low, high = (int(value) for value in torch.aminmax(input_ids))  # one host sync, not two
            check(
                low >= 0 and high < self.config.vocab_size,
                lambda: f"input_ids must lie in [0, {self.config.vocab_size}), got [{low}, {high}].",
            )
        if attention_mask is None:
            layout = VarlenLayout.uniform(batch, length, device=input_ids.device)
        else:
            check(
                attention_mask.shape == input_ids.shape,
                lambda: (
                    f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
                ),
            )
            layout = VarlenLayout.from_key_padding_mask(attention_mask)
        tokens = self.embeddings(input_ids, position_ids).reshape(batch * length, -1)
        tokens, hidden_states, attentions = self.encoder(tokens, layout, output_hidden_states, output_attentions)
        tokens = self.final_layer_norm(tokens).reshape(batch, length, -1)
        if hidden_states is not None:
            hidden_states = tuple(state.reshape(batch, length, -1) for state in hidden_states)
        if attentions is not None:
            attentions = tuple(_pad_key_axis(per_sequence, attention_mask, length) for per_sequence in attentions)
        output = TextOutput(tokens, self.head(tokens[:, -1]), hidden_states, attentions)
        return output.to_tuple() if return_dict is False else output


def _pad_key_axis(weights: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """Stack per-sequence weights :math:`(H, L, k_i)` into :math:`(B, H, L, L)`, zeros at masked keys."""
    if attention_mask is None:
        return torch.stack(weights)
    padded = weights[0].new_zeros(len(weights), weights[0].shape[0], length, length)
    for row, (mask, weight) in enumerate(zip(attention_mask.bool(), weights, strict=True)):
        padded[row, :, :, mask] = weight
    return padded
