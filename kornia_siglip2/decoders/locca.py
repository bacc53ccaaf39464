"""LocCa decoder: a pre-LN transformer decoder that cross-attends to the packed, un-pooled vision tokens.

Architecture of big_vision's CapPa decoder (``models/proj/cappa/cappa.py``), used by SigLIP 2 for LocCa:
token embedding (``vocab_size + 1`` rows, the last the mask token) plus learned positions; blocks of
``x + SelfAttn(LN(x))``, ``x + CrossAttn(LN(x), image)``, ``x + MLP(LN(x))``; a final LayerNorm; a zero-init
logits layer, so every logit is 0 at init and the loss starts at exactly :math:`\\log V`.

Both attentions are the package's one :class:`~kornia_siglip2.attention.Attention` module over packed
tokens. Self-attention: each of the :math:`S` decoder sequences of :math:`L` tokens is one block, causal or
full (parallel prediction) per sequence. Cross-attention: all decoder queries of image :math:`i` (its
:math:`T` task sequences of :math:`L` tokens) form one query block that attends to that image's :math:`N_i`
tokens only, whatever the image sizes in the packed batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from kornia_siglip2.attention import Attention
from kornia_siglip2.config import SigLip2Config
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import check
from kornia_siglip2.layers import MLP, init_transformer_weights
from kornia_siglip2.packing import VarlenLayout

__all__ = ["DecoderBlock", "LocCaDecoder"]


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: self-attention, cross-attention to the image, MLP, each with a residual.

    Args:
        width: decoder width :math:`D`.
        num_heads: attention heads.
        mlp_width: MLP inner width.
        image_width: vision token width :math:`D_v`.
        layer_norm_eps: LayerNorm epsilon (1e-6, flax's default in big_vision).
        hidden_act: MLP activation name.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_width: int,
        image_width: int,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.self_attn = Attention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        # keys and values straight from the vision width (flax's MultiHeadDotProductAttention in CapPa)
        self.cross_attn = Attention(width, num_heads, key_width=image_width)
        self.layer_norm3 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, mlp_width, hidden_act)

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_tokens: torch.Tensor,
        self_layout: VarlenLayout,
        cross_layout: VarlenLayout,
    ) -> torch.Tensor:
        """Transform packed decoder tokens :math:`(S L, D)`, image-major.

        Args:
            hidden_states: :math:`(S L, D)` decoder tokens, sequence after sequence.
            image_tokens: :math:`(N, D_v)` packed vision tokens.
            self_layout: one block per decoder sequence, causal or not.
            cross_layout: the queries of each image attending to that image's tokens.
        """
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), self_layout)[0]
        hidden_states = hidden_states + self.cross_attn(self.layer_norm2(hidden_states), cross_layout, image_tokens)[0]
        return hidden_states + self.mlp(self.layer_norm3(hidden_states))


class LocCaDecoder(nn.Module):
    """Transformer decoder of LocCa / CapPa over packed vision tokens.

    Args:
        vocab_size: output classes :math:`V` (text tokens and box bins); the embedding has :math:`V + 1`
            rows, the last (``mask_token_id = V``) being the parallel-prediction mask token.
        width: decoder width :math:`D`.
        num_heads: attention heads.
        mlp_width: MLP inner width.
        num_layers: decoder blocks.
        max_length: length of the learned position table (longest :math:`L`).
        image_width: vision token width :math:`D_v`; defaults to ``width``.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: MLP activation name.

    Example:
        >>> decoder = LocCaDecoder(vocab_size=50, width=16, num_heads=2, mlp_width=32, num_layers=1, max_length=8,
        ...                        image_width=24)
        >>> image_tokens = torch.randn(12 + 20, 24)  # two images of 12 and 20 tokens, packed
        >>> cu_seqlens = torch.tensor([0, 12, 32], dtype=torch.int32)
        >>> decoder(torch.randint(0, 50, (2, 3, 8)), image_tokens, cu_seqlens).shape
        torch.Size([2, 3, 8, 50])
        >>> bool((decoder(torch.randint(0, 50, (2, 8)), image_tokens, cu_seqlens) == 0).all())  # zero-init head
        True
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        num_heads: int,
        mlp_width: int,
        num_layers: int,
        max_length: int,
        image_width: int | None = None,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> None:
        super().__init__()
        check(
            num_heads > 0 and width % num_heads == 0,
            lambda: f"width {width} must be divisible by num_heads {num_heads}.",
        )
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.image_width = width if image_width is None else image_width
        self.token_embedding = nn.Embedding(vocab_size + 1, width)
        self.position_embedding = nn.Parameter(torch.empty(max_length, width))
        self.layers = nn.ModuleList(
            DecoderBlock(width, num_heads, mlp_width, self.image_width, layer_norm_eps, hidden_act)
            for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.head = nn.Linear(width, vocab_size)
        self.reset_parameters()

    @property
    def mask_token_id(self) -> int:
        """Input id of the mask token (the embedding's last row)."""
        return self.vocab_size

    def reset_parameters(self) -> None:
        """Initialize as big_vision's CapPa: see the comments for each choice."""
        # xavier_uniform weights and zero biases (big_vision MlpBlock; its biases are N(0, 1e-6))
        init_transformer_weights(self)
        # CapPa: EmbedTargets normal(stddev=1.0); learned positions normal(stddev=1/sqrt(width)) (vit.get_posemb)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=self.position_embedding.shape[-1] ** -0.5)
        # zero-init logits (CapPa LogitsDense kernel_init=zeros): the initial loss is exactly log V
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(
        cls,
        config: SigLip2Config,
        vocabulary: LocCaVocabulary | None = None,
        num_layers: int | None = None,
        max_length: int | None = None,
    ) -> LocCaDecoder:
        """Size the decoder from a SigLIP 2 config: width, heads, MLP and activation of the text tower.

        Depth defaults to half the text tower's, rounded down (SigLIP 2 paper section 2.2): B/16 6, L/16 12
        and 13 for So400m, whose text tower has 27 layers (the paper leaves 13 vs 14 open; rounding down
        keeps the decoder at most half the text depth). Key/value projections take the vision width.

        Args:
            config: the dual-tower config.
            vocabulary: token layout; defaults to the text vocabulary plus 1000 box bins.
            num_layers: decoder depth override.
            max_length: position table length; defaults to the text tower's ``max_position_embeddings`` (64).

        Example:
            >>> config = SigLip2Config()  # B/16 text tower: 12 layers, 768 wide
            >>> with torch.device("meta"):  # shapes only, no memory
            ...     decoder = LocCaDecoder.from_config(config)
            >>> len(decoder.layers), decoder.head.in_features, decoder.vocab_size
            (6, 768, 33000)
        """
        text = config.text_config
        vocabulary = LocCaVocabulary.from_config(text) if vocabulary is None else vocabulary
        return cls(
            vocab_size=vocabulary.vocab_size,
            width=text.hidden_size,
            num_heads=text.num_attention_heads,
            mlp_width=text.intermediate_size,
            num_layers=text.num_hidden_layers // 2 if num_layers is None else num_layers,
            max_length=text.max_position_embeddings if max_length is None else max_length,
            image_width=config.vision_config.hidden_size,
            layer_norm_eps=text.layer_norm_eps,
            hidden_act=text.hidden_act,
        )

    @staticmethod
    def cross_attention_layout(
        cu_seqlens: torch.Tensor | Sequence[int], queries_per_image: int, device: torch.device | str | None = None
    ) -> VarlenLayout:
        """Layout in which the :math:`T \\cdot L` decoder queries of image :math:`i` attend to its tokens only.

        Build it once to reuse across calls (reading ``cu_seqlens`` syncs with the device) or to trace the
        decoder with ``torch.compile(fullgraph=True)``.

        Args:
            cu_seqlens: int :math:`(n + 1,)` image boundaries in the packed tokens (``VisionOutput.cu_seqlens``).
            queries_per_image: decoder tokens per image, :math:`T \\cdot L`.
            device: device of the layout's index tensors.
        """
        boundaries = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        seqlens = [end - start for start, end in itertools.pairwise(boundaries)]
        return VarlenLayout.from_seqlens([queries_per_image] * len(seqlens), seqlens, device=device)

    def forward_features(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        causal: torch.Tensor | None = None,
        *,
        layout: VarlenLayout | None = None,
    ) -> torch.Tensor:
        """Decoder states after the final LayerNorm (the input of :attr:`head`).

        Args:
            input_ids: int :math:`(n, L)` or :math:`(n, T, L)` decoder inputs, :math:`T` sequences per image.
            image_tokens: :math:`(N, D_v)` packed un-pooled vision tokens (``VisionOutput.last_hidden_state``).
            cu_seqlens: int :math:`(n + 1,)` image boundaries in ``image_tokens``; not needed with ``layout``.
            causal: bool, ``input_ids.shape[:-1]``: True for a causal mask, False for full attention
                (parallel prediction); ``None`` means causal everywhere.
            layout: prebuilt :meth:`cross_attention_layout`.

        Returns:
            :math:`(*, L, D)` states, ``*`` the leading shape of ``input_ids``.

        Raises:
            ValueCheckError: shapes disagree, or :math:`L` exceeds ``max_length``.
        """
        check(
            input_ids.ndim in (2, 3),
            lambda: f"input_ids must be (n, L) or (n, T, L), got {tuple(input_ids.shape)}.",
        )
        check(
            image_tokens.ndim == 2 and image_tokens.shape[-1] == self.image_width,
            lambda: f"image_tokens must be (N, {self.image_width}), got {tuple(image_tokens.shape)}.",
        )
        length = input_ids.shape[-1]
        check(length <= self.max_length, lambda: f"input length {length} exceeds max_length {self.max_length}.")
        check(
            causal is None or causal.shape == input_ids.shape[:-1],
            lambda: f"causal must have shape {tuple(input_ids.shape[:-1])}, got {tuple(causal.shape)}.",
        )
        if layout is None:
            check(cu_seqlens is not None, "LocCaDecoder needs cu_seqlens or a layout.")
            layout = self.cross_attention_layout(cu_seqlens, input_ids[0].numel(), device=image_tokens.device)
        check(
            len(layout.seqlens_q) == input_ids.shape[0],
            lambda: f"input_ids has {input_ids.shape[0]} images but the vision tokens {len(layout.seqlens_q)}.",
        )
        hidden_states = self.token_embedding(input_ids.reshape(-1, length)) + self.position_embedding[:length]
        num_sequences = hidden_states.shape[0]
        if causal is None:
            self_layout = VarlenLayout.from_seqlens([length] * num_sequences, device=input_ids.device, causal=True)
        elif torch.compiler.is_compiling():  # the mask is data: keep it on the device (dense attention)
            self_layout = dataclasses.replace(
                VarlenLayout.from_seqlens([length] * num_sequences, device=input_ids.device),
                causal_flags=causal.reshape(-1),
            )
        else:  # one host read per call, then equal-length groups per mask kind
            self_layout = VarlenLayout.from_seqlens(
                [length] * num_sequences, device=input_ids.device, causal=causal.reshape(-1).tolist()
            )
        image_tokens = image_tokens.to(hidden_states.dtype)
        hidden_states = hidden_states.reshape(num_sequences * length, -1)  # [S * L, D], image-major
        for block in self.layers:
            hidden_states = block(hidden_states, image_tokens, self_layout, layout)
        return self.layer_norm(hidden_states).view(*input_ids.shape, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        causal: torch.Tensor | None = None,
        *,
        layout: VarlenLayout | None = None,
    ) -> torch.Tensor:
        """Logits :math:`(*, L, V)`; arguments as :meth:`forward_features`.

        This materializes all logits: training uses :class:`~kornia_siglip2.losses.locca.LocCaLoss`, which
        never does.
        """
        return self.head(self.forward_features(input_ids, image_tokens, cu_seqlens, causal, layout=layout))
