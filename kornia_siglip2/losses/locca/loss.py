"""LocCa loss: the three decoder tasks of an image batch in one decoder pass, chunked cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kornia_siglip2.attention import VarlenLayout
from kornia_siglip2.decoders.locca import LocCaDecoder
from kornia_siglip2.decoders.targets import TASKS, LocCaTargets
from kornia_siglip2.errors import check
from kornia_siglip2.losses.locca.cross_entropy import DEFAULT_CHUNK_SIZE, sequence_cross_entropy

__all__ = ["LocCaLoss", "LocCaLossOutput"]


@dataclass
class LocCaLossOutput:
    """Output of :class:`LocCaLoss`.

    Attributes:
        loss: scalar, the weighted sum of the task losses.
        task_losses: :math:`(3,)` unweighted loss of each task, in :data:`TASKS` order.
    """

    loss: torch.Tensor
    task_losses: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{"loss": ..., "captioning": ..., ...}`` for logging."""
        return {"loss": self.loss, **dict(zip(TASKS, self.task_losses.unbind(), strict=True))}


class LocCaLoss(nn.Module):
    """LocCa objective: captioning, referring expression and grounded captioning on the un-pooled image tokens.

    Each task's loss is the softmax cross-entropy averaged over the scored tokens of each sequence, then over
    the batch (big_vision ``weighted_softmax_xent(normalize=True)``); the loss is
    :math:`\\sum_t w_t \\, \\mathcal{L}_t`. The default weights are 1 each: the SigLIP 2 paper gives no
    per-task weights, so each task counts as much as one captioning loss (and the whole LocCa loss then adds
    to the SigLIP loss with weight 1, SigLIP 2 paper section 2.2). The output projection runs in vocabulary chunks
    (:func:`~kornia_siglip2.losses.locca.sequence_cross_entropy`): the :math:`(B, 3, L, V)` logits never exist.

    Args:
        decoder: the LocCa decoder (its parameters are this module's).
        task_weights: weight of each task, in :data:`TASKS` order.
        chunk_size: vocabulary classes per chunk.

    Example:
        >>> from kornia_siglip2.decoders import LocCaVocabulary
        >>> vocabulary = LocCaVocabulary(text_vocab_size=90, num_bins=10)
        >>> decoder = LocCaDecoder(vocabulary.vocab_size, width=16, num_heads=2, mlp_width=32, num_layers=1,
        ...                        max_length=8)
        >>> targets = LocCaTargets.build([[5, 6], [7]], [[8], [9, 10]], torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 2),
        ...                              vocabulary, max_length=8)
        >>> image_tokens, cu_seqlens = torch.randn(9, 16), torch.tensor([0, 4, 9], dtype=torch.int32)
        >>> output = LocCaLoss(decoder)(image_tokens, cu_seqlens, targets)
        >>> [round(value, 4) for value in output.task_losses.tolist()]  # zero-init logits: log(100) for every task
        [4.6052, 4.6052, 4.6052]
    """

    def __init__(
        self,
        decoder: LocCaDecoder,
        task_weights: Sequence[float] = (1.0, 1.0, 1.0),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        check(len(task_weights) == len(TASKS), lambda: f"task_weights needs {len(TASKS)} values, got {task_weights}.")
        self.decoder = decoder
        self.chunk_size = chunk_size
        self.register_buffer("task_weights", torch.tensor(task_weights, dtype=torch.float32), persistent=False)

    def forward(
        self,
        image_tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        targets: LocCaTargets,
        *,
        layout: VarlenLayout | None = None,
    ) -> LocCaLossOutput:
        """Compute the LocCa loss of a packed image batch.

        Args:
            image_tokens: :math:`(N, D_v)` un-pooled vision tokens after the final LayerNorm
                (``VisionOutput.last_hidden_state``).
            cu_seqlens: int :math:`(B + 1,)` image boundaries (``VisionOutput.cu_seqlens``); may be ``None``
                with ``layout``.
            targets: the three tasks of the :math:`B` images, :math:`(B, 3, L)`.
            layout: prebuilt ``LocCaDecoder.cross_attention_layout(cu_seqlens, 3 * L)``.

        Returns:
            :class:`LocCaLossOutput` with the scalar loss and the per-task losses.

        Raises:
            ValueCheckError: shapes disagree.
        """
        check(
            targets.input_ids.ndim == 3 and targets.input_ids.shape[1] == len(TASKS),
            lambda: f"targets must be (B, {len(TASKS)}, L), got {tuple(targets.input_ids.shape)}.",
        )
        hidden = self.decoder.forward_features(
            targets.input_ids, image_tokens, cu_seqlens, targets.causal, layout=layout
        )  # [B, 3, L, D]
        head = self.decoder.head
        per_sequence = sequence_cross_entropy(
            hidden, head.weight, head.bias, targets.labels, targets.loss_mask, self.chunk_size
        )  # [B, 3]
        task_losses = per_sequence.mean(0)
        return LocCaLossOutput((task_losses * self.task_weights.to(task_losses.dtype)).sum(), task_losses)
