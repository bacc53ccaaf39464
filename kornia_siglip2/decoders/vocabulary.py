"""Token layout of the LocCa decoder: text ids, box-coordinate bins, the mask token; box quantization.

The decoder predicts ``vocab_size = text_vocab_size + num_bins`` classes:

- ``[0, text_vocab_size)``: the text tokenizer's ids (32000 for SigLIP, 256000 for SigLIP 2's Gemma tokenizer);
- ``[text_vocab_size, text_vocab_size + num_bins)``: one token per coordinate bin, appended after the text
  vocabulary as PaliGemma appends its ``<locXXXX>`` tokens to Gemma's (SigLIP 2's 256k vocabulary has none);
- ``mask_token_id = vocab_size``: the extra embedding row of parallel prediction, an input only, never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kornia_siglip2.config import TextConfig
from kornia_siglip2.errors import check, check_shape

__all__ = ["LocCaVocabulary"]


@dataclass(frozen=True)
class LocCaVocabulary:
    """Where text, box bins and special tokens sit in the decoder's vocabulary, and how boxes become tokens.

    A box is written as four tokens in ``(x_min, y_min, x_max, y_max)`` order, each coordinate in
    :math:`[0, 1]` quantized into ``num_bins`` equal bins (``floor(c * num_bins)``, 1.0 falling in the last
    bin) and decoded to the bin centre, so a round trip is off by at most half a bin.

    Args:
        text_vocab_size: size of the text tokenizer's vocabulary.
        num_bins: number of coordinate bins (1000: a bin is a thousandth of the image side, finer than a
            patch at any SigLIP resolution; PaliGemma uses 1024).
        pad_token_id: padding id written after the end of a sequence (never scored).
        eos_token_id: end-of-sequence id; also closes the region caption of a referring expression.
        bos_token_id: first decoder input (``shift_right``'s fill value); ``None`` uses ``pad_token_id`` as
            big_vision's CapPa does (``shift_right`` pads with 0, its pad id).

    Example:
        >>> vocabulary = LocCaVocabulary(text_vocab_size=100, num_bins=4)
        >>> vocabulary.vocab_size, vocabulary.mask_token_id
        (104, 104)
        >>> tokens = vocabulary.boxes_to_tokens(torch.tensor([[0.0, 0.3, 0.5, 1.0]]))
        >>> tokens.tolist()
        [[100, 101, 102, 103]]
        >>> vocabulary.tokens_to_boxes(tokens).tolist()
        [[0.125, 0.375, 0.625, 0.875]]
    """

    text_vocab_size: int
    num_bins: int = 1000
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.text_vocab_size <= 0 or self.num_bins <= 0:
            raise ValueError(
                f"text_vocab_size and num_bins must be positive, got {self.text_vocab_size} and {self.num_bins}."
            )
        for name in ("pad_token_id", "eos_token_id", "start_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.text_vocab_size:
                raise ValueError(f"{name} {token} must be a text id in [0, {self.text_vocab_size}).")

    @classmethod
    def from_config(cls, text_config: TextConfig, num_bins: int = 1000, **kwargs: int | None) -> LocCaVocabulary:
        """Text vocabulary and pad id of a text tower; ``eos_token_id`` (1 in both SigLIP tokenizers) etc. as kwargs.

        Example:
            >>> LocCaVocabulary.from_config(TextConfig(vocab_size=32000)).vocab_size
            33000
        """
        pad = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        return cls(text_config.vocab_size, num_bins, **{"pad_token_id": pad, **kwargs})

    @property
    def vocab_size(self) -> int:
        """Number of output classes :math:`V` (text tokens and box bins)."""
        return self.text_vocab_size + self.num_bins

    @property
    def mask_token_id(self) -> int:
        """Input id of the parallel-prediction mask token (the embedding's extra last row)."""
        return self.vocab_size

    @property
    def start_token_id(self) -> int:
        """The id actually used as first decoder input (``bos_token_id`` or ``pad_token_id``)."""
        return self.pad_token_id if self.bos_token_id is None else self.bos_token_id

    @property
    def box_token_offset(self) -> int:
        """Id of bin 0."""
        return self.text_vocab_size

    def boxes_to_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Quantize normalized ``xyxy`` boxes into bin tokens.

        Args:
            boxes: :math:`(*, 4)` coordinates in :math:`[0, 1]`.

        Returns:
            int64 :math:`(*, 4)` token ids in ``[text_vocab_size, vocab_size)``.

        Raises:
            ValueError: the last dimension is not 4.
            ValueCheckError: a coordinate is outside :math:`[0, 1]`.
        """
        check_shape(boxes, ["*", "4"], "boxes must be (*, 4) normalized xyxy coordinates.")
        check(
            bool(((boxes >= 0) & (boxes <= 1)).all()),
            lambda: f"boxes must be normalized to [0, 1], got values in [{boxes.min()}, {boxes.max()}].",
        )
        bins = torch.floor(boxes * self.num_bins).long().clamp(0, self.num_bins - 1)
        return bins + self.box_token_offset

    def tokens_to_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode bin tokens to the normalized coordinates of the bin centres.

        Args:
            tokens: int :math:`(*, 4)` box token ids.

        Returns:
            float32 :math:`(*, 4)` normalized ``xyxy`` coordinates.

        Raises:
            ValueError: the last dimension is not 4.
            ValueCheckError: a token is not a box token.
        """
        check_shape(tokens, ["*", "4"], "box tokens must be (*, 4).")
        bins = tokens.long() - self.box_token_offset
        check(
            bool(((bins >= 0) & (bins < self.num_bins)).all()),
            lambda: f"box tokens must lie in [{self.box_token_offset}, {self.vocab_size}), got {tokens.tolist()}.",
        )
        return (bins.float() + 0.5) / self.num_bins
