"""LocCa targets: decoder inputs, labels and loss masks of the three tasks, with parallel prediction.

Each example gives three decoder sequences ``y`` of length :math:`L` (SigLIP 2 paper, section 2.2):

========================  ===========================================  ==========================
task                      ``y``                                        scored (loss mask)
========================  ===========================================  ==========================
captioning                ``caption, EOS, PAD...``                     caption and EOS
referring_expression      ``region caption, EOS, box(4), PAD...``      the 4 box tokens
grounded_captioning       ``box(4), region caption, EOS, PAD...``      region caption and EOS
========================  ===========================================  ==========================

The unscored part is the condition. The ``EOS`` closing the region caption tells the decoder that a box
follows, so a referring expression cannot be mistaken for a caption with the same words; a grounded caption
is told apart by its leading box tokens. Teacher forcing feeds ``shift_right(y)`` with a causal mask. For
captioning only, each example with probability ``parallel_probability`` (0.5 in SigLIP 2, after CapPa) is fed
mask tokens only, with a full self-attention mask, and must predict the whole ``y`` at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import check, check_shape

__all__ = ["TASKS", "LocCaTargets", "grounded_prefix", "referring_prefix", "shift_right"]

#: Task order along the second dimension of :class:`LocCaTargets` tensors.
TASKS = ("captioning", "referring_expression", "grounded_captioning")

_BOX_TOKENS = 4
# the shortest length that holds a box, one region word and EOS
_MIN_LENGTH = _BOX_TOKENS + 2


def shift_right(labels: torch.Tensor, start_token_id: int) -> torch.Tensor:
    """Teacher-forcing inputs: ``start_token_id`` then ``labels`` without its last position.

    Args:
        labels: int :math:`(*, L)` target ids.
        start_token_id: first input id (BOS).

    Returns:
        :math:`(*, L)` decoder inputs.

    Example:
        >>> shift_right(torch.tensor([[5, 6, 7]]), 0).tolist()
        [[0, 5, 6]]
    """
    start = labels.new_full((*labels.shape[:-1], 1), start_token_id)
    return torch.cat([start, labels[..., :-1]], dim=-1)


def referring_prefix(region_caption: Sequence[int], vocabulary: LocCaVocabulary, max_length: int) -> list[int]:
    """Condition of a referring expression: the region caption (truncated to fit the box) closed by EOS."""
    return [*_ids(region_caption)[: max_length - _BOX_TOKENS - 1], vocabulary.eos_token_id]


def grounded_prefix(box_tokens: torch.Tensor) -> list[int]:
    """Condition of a grounded caption: the four box tokens :math:`(4,)`."""
    return [int(token) for token in box_tokens.tolist()]


@dataclass
class LocCaTargets:
    """Decoder inputs and targets of the three LocCa tasks for a batch of :math:`B` images.

    Tensors have the task axis second, in :data:`TASKS` order, so the three tasks of an image run in one
    decoder pass (see :class:`~kornia_siglip2.decoders.LocCaDecoder`).

    Attributes:
        input_ids: int64 :math:`(B, 3, L)` decoder inputs: ``shift_right(labels)``, or mask tokens for
            captioning in parallel-prediction mode.
        labels: int64 :math:`(B, 3, L)` targets ``y`` (``pad_token_id`` after the end).
        loss_mask: bool :math:`(B, 3, L)`, True where a position is scored.
        causal: bool :math:`(B, 3)`, False where the decoder attends fully (parallel prediction).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    causal: torch.Tensor

    @property
    def parallel(self) -> torch.Tensor:
        """Bool :math:`(B,)`: which examples use parallel prediction for captioning."""
        return ~self.causal[:, 0]

    def to(self, device: torch.device | str) -> LocCaTargets:
        """Move every tensor to ``device``."""
        return LocCaTargets(
            *(tensor.to(device) for tensor in (self.input_ids, self.labels, self.loss_mask, self.causal))
        )

    @classmethod
    def build(
        cls,
        captions: Sequence[Sequence[int]],
        region_captions: Sequence[Sequence[int]],
        boxes: torch.Tensor,
        vocabulary: LocCaVocabulary,
        max_length: int,
        *,
        parallel_probability: float = 0.5,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> LocCaTargets:
        """Build the three tasks from token ids and one box with its region caption per image.

        Text longer than fits is truncated, keeping EOS: a caption to ``max_length - 1`` ids, a region
        caption to ``max_length - 5``.

        Args:
            captions: :math:`B` lists of text ids (no BOS/EOS/padding), the image captions.
            region_captions: :math:`B` lists of text ids describing the boxed region.
            boxes: :math:`(B, 4)` normalized ``xyxy`` boxes in :math:`[0, 1]`.
            vocabulary: the id layout (text, bins, special tokens).
            max_length: decoder length :math:`L` (at most the decoder's ``max_length``; at least 6).
            parallel_probability: probability that an example's captioning uses parallel prediction.
            generator: random source of the parallel-prediction draw (CPU), for reproducible batches.
            device: device of the returned tensors.

        Returns:
            :class:`LocCaTargets` with :math:`(B, 3, L)` tensors.

        Raises:
            ValueError: ``boxes`` is not :math:`(B, 4)`.
            ValueCheckError: batch sizes disagree, an id is not a text id, ``max_length`` is below 6, the
                probability is outside :math:`[0, 1]`, or a box is outside :math:`[0, 1]`.

        Example:
            >>> vocabulary = LocCaVocabulary(text_vocab_size=10, num_bins=4, pad_token_id=0, eos_token_id=1)
            >>> targets = LocCaTargets.build([[5, 6]], [[7]], torch.tensor([[0.0, 0.0, 0.5, 1.0]]), vocabulary,
            ...                              max_length=8, parallel_probability=0.0)
            >>> targets.labels[0].tolist()
            [[5, 6, 1, 0, 0, 0, 0, 0], [7, 1, 10, 10, 12, 13, 0, 0], [10, 10, 12, 13, 7, 1, 0, 0]]
            >>> targets.loss_mask[0].int().tolist()
            [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
            >>> targets.input_ids[0, 0].tolist()
            [0, 5, 6, 1, 0, 0, 0, 0]
        """
        check_shape(boxes, ["B", "4"], "boxes must be (B, 4) normalized xyxy coordinates.")
        batch = boxes.shape[0]
        check(
            len(captions) == batch and len(region_captions) == batch,
            lambda: (
                f"Expected {batch} captions and region captions (one per box), got {len(captions)} and "
                f"{len(region_captions)}."
            ),
        )
        check(max_length >= _MIN_LENGTH, lambda: f"max_length must be at least {_MIN_LENGTH}, got {max_length}.")
        check(
            0.0 <= parallel_probability <= 1.0,
            lambda: f"parallel_probability must lie in [0, 1], got {parallel_probability}.",
        )
        box_tokens = vocabulary.boxes_to_tokens(boxes.detach().cpu())
        labels = torch.full((batch, len(TASKS), max_length), vocabulary.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros(batch, len(TASKS), max_length, dtype=torch.bool)
        for index in range(batch):
            caption = _text_ids(captions[index], vocabulary, "captions")
            region = _text_ids(region_captions[index], vocabulary, "region_captions")
            box = grounded_prefix(box_tokens[index])
            sequences = (
                ([], [*caption[: max_length - 1], vocabulary.eos_token_id]),
                (referring_prefix(region, vocabulary, max_length), box),
                (box, [*region[: max_length - _BOX_TOKENS - 1], vocabulary.eos_token_id]),
            )
            for task, (condition, scored) in enumerate(sequences):
                sequence = condition + scored
                labels[index, task, : len(sequence)] = torch.tensor(sequence)
                loss_mask[index, task, len(condition) : len(sequence)] = True
        input_ids = shift_right(labels, vocabulary.start_token_id)
        # one Bernoulli draw per example decides its captioning mode (big_vision CapPa `masked_pred_prob`)
        parallel = torch.rand(batch, generator=generator) < parallel_probability
        input_ids[:, 0] = torch.where(parallel[:, None], vocabulary.mask_token_id, input_ids[:, 0])
        causal = torch.ones(batch, len(TASKS), dtype=torch.bool)
        causal[:, 0] = ~parallel
        targets = cls(input_ids, labels, loss_mask, causal)
        return targets if device is None else targets.to(device)


def _ids(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(token) for token in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]


def _text_ids(tokens: Sequence[int], vocabulary: LocCaVocabulary, name: str) -> list[int]:
    ids = _ids(tokens)
    check(
        all(0 <= token < vocabulary.text_vocab_size for token in ids),
        lambda: f"{name} must hold text ids in [0, {vocabulary.text_vocab_size}), got {ids}.",
    )
    return ids
