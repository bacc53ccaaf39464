"""Output containers with transformers' ``ModelOutput`` contract, without depending on transformers.

A :class:`ModelOutput` is a dataclass that also behaves like transformers' outputs: attribute access
(``out.pooler_output``), key access (``out["pooler_output"]``), index access over the fields that are not
``None`` (``out[0]``), ``keys()`` / ``values()`` / ``items()``, ``to_tuple()`` and ``in``. Fields listed in
``_extra_fields`` (such as the packed frame boundaries ``cu_seqlens``) are attributes only, so indices and
tuples are those transformers gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kornia_siglip2.packing import packed_to_padded

__all__ = ["ModelOutput", "SigLip2Output", "TextOutput", "VisionOutput"]


class ModelOutput:
    """Base class of the package's outputs (transformers' ``ModelOutput`` behaviour on a dataclass).

    Example:
        >>> out = TextOutput(last_hidden_state=torch.zeros(2, 3, 4), pooler_output=torch.ones(2, 4))
        >>> list(out.keys()), out[1] is out.pooler_output, out["last_hidden_state"].shape
        (['last_hidden_state', 'pooler_output'], True, torch.Size([2, 3, 4]))
        >>> len(out.to_tuple()), "hidden_states" in out
        (2, False)
    """

    _extra_fields: ClassVar[tuple[str, ...]] = ()

    def keys(self) -> list[str]:
        """Names of the fields that are set (not ``None``), in declaration order."""
        return [
            field.name
            for field in dataclasses.fields(self)  # type: ignore[arg-type]
            if field.name not in self._extra_fields and getattr(self, field.name) is not None
        ]

    def values(self) -> list[Any]:
        """Values of :meth:`keys`."""
        return [getattr(self, key) for key in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        """``(key, value)`` pairs of :meth:`keys`."""
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields as a tuple (what transformers returns with ``return_dict=False``)."""
        return tuple(self.values())

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` if that field is set, else ``default``."""
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


@dataclass(eq=False)
class VisionOutput(ModelOutput):
    """Output of the vision tower (transformers' ``BaseModelOutputWithPooling``).

    Its layout follows the input's: packed input (``patches`` + ``grid_thw``) gives packed tokens
    :math:`(N, D)`; transformers' padded NaFlex input gives :math:`(B, L, D)` with zeros at padding; 4-D
    images give :math:`(B, h w, D)`.

    Attributes:
        last_hidden_state: tokens after the final LayerNorm.
        pooler_output: one MAP-pooled vector per frame, :math:`(\\sum t, D)` (``None`` without head).
        hidden_states: embeddings and every block's output, on request, in the layout of ``last_hidden_state``.
        attentions: per block, on request: per frame :math:`(H, L_i, L_i)` weights (packed input), or
            :math:`(B, H, L, L)` (padded and 4-D input, zeros at padded positions).
        cu_seqlens: int32 :math:`(\\sum t + 1,)` frame boundaries of the packed tokens (an attribute, not a
            key: indices and tuples are transformers').
    """

    _extra_fields: ClassVar[tuple[str, ...]] = ("cu_seqlens",)

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[Any, ...] | None = None
    cu_seqlens: torch.Tensor | None = None

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


@dataclass(eq=False)
class TextOutput(ModelOutput):
    """Output of the text tower (transformers' ``BaseModelOutputWithPooling``).

    Attributes:
        last_hidden_state: tokens after the final LayerNorm, :math:`(B, L, D)`.
        pooler_output: head applied to the last position, :math:`(B, P)`.
        hidden_states: embeddings and every block's output, each :math:`(B, L, D)`, on request.
        attentions: per block, the attention weights :math:`(B, H, L, L)`, on request.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class SigLip2Output(ModelOutput):
    """Output of :meth:`SigLip2.forward` (transformers' ``SiglipOutput``: same fields, same order).

    Attributes:
        loss: sigmoid loss (SigLIP paper, Algorithm 1) when ``return_loss=True``, else ``None``.
        logits_per_image: :math:`(n_{img}, n_{txt})` scaled cosine similarities plus bias.
        logits_per_text: :math:`(n_{txt}, n_{img})`, the transpose.
        text_embeds: L2-normalized pooled text features :math:`(n_{txt}, D)`.
        image_embeds: L2-normalized pooled image features :math:`(n_{img}, D)`.
        text_model_output: the text tower's :class:`TextOutput`.
        vision_model_output: the vision tower's :class:`VisionOutput`.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: TextOutput | None = None
    vision_model_output: VisionOutput | None = None
