"""The full SigLIP 2 objective in the recipe: per-image random inputs and the module DDP / FSDP2 wrap.

:class:`SigLip2Objective` holds the model and its :class:`~kornia_siglip2.losses.siglip2.SigLip2Loss` (LocCa
decoder, distillation heads, mask token, EMA teacher) so that one wrapped ``forward`` runs every term: DDP's
and FSDP2's hooks then see every parameter that takes part.

Everything random in the objective is drawn per image from ``(seed, epoch, dataset index)``
(:func:`~kornia_siglip2.training.data.sample_generator`; importable from here too), never per batch: the LocCa region
and captioning mode (:func:`locca_targets`), the SILC local crops and the TIPS patch mask
(:func:`distillation_inputs`). An image draws the same numbers whichever rank, micro-batch or batch position
it lands in, which is what lets ``W`` processes equal one process on the same global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from kornia_siglip2.decoders.targets import LocCaTargets
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import check
from kornia_siglip2.losses.distill import SelfDistillationLoss
from kornia_siglip2.losses.distill.views import random_patch_mask
from kornia_siglip2.losses.siglip2 import SigLip2Loss
from kornia_siglip2.model import SigLip2
from kornia_siglip2.packing import unpatchify
from kornia_siglip2.training.data import PackedBatch, sample_generator

__all__ = ["SigLip2Objective", "distillation_inputs", "locca_targets"]

# independent random streams of one image (data.py's token dropping is stream 3)
_LOCCA_STREAM, _VIEWS_STREAM, _MASK_STREAM = 0, 1, 2
_WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def locca_targets(
    batch: PackedBatch,
    vocabulary: LocCaVocabulary,
    max_length: int,
    *,
    epoch: int,
    seed: int,
    parallel_probability: float = 0.5,
) -> LocCaTargets:
    """The three LocCa tasks of every image of a batch, drawn per image.

    Each image uses one of its regions, drawn uniformly (LocCa trains one region per example and step), and
    one Bernoulli draw for parallel prediction of its caption. An image without regions trains the
    captioning task only: its referring-expression and grounded-captioning sequences score no token, so they
    add 0 to those tasks' means over the batch (the tasks then weigh the fraction of images with regions).

    Args:
        batch: a batch from :func:`~kornia_siglip2.training.data.collate_packed` (``caption_ids`` and
            ``regions`` filled by :class:`~kornia_siglip2.training.data.ImageTextDataset`).
        vocabulary: the LocCa id layout.
        max_length: decoder length :math:`L` (at least 6).
        epoch: the epoch of the batch.
        seed: the run's seed.
        parallel_probability: probability of parallel prediction for an image's caption.

    Returns:
        :class:`~kornia_siglip2.decoders.targets.LocCaTargets` :math:`(n, 3, L)` on the CPU.

    Raises:
        ValueCheckError: the batch carries no ``caption_ids`` for its images.
    """
    check(
        len(batch.caption_ids) == batch.indices.shape[0],
        lambda: (
            f"The batch has {batch.indices.shape[0]} images but {len(batch.caption_ids)} caption_ids: build it with "
            "collate_packed from ImageTextDataset items."
        ),
    )
    parts = []
    for position, index in enumerate(batch.indices.tolist()):
        generator = sample_generator(seed, epoch, index, _LOCCA_STREAM)
        caption = batch.caption_ids[position]
        regions = batch.regions[position] if batch.regions else []
        if regions:
            box, text = regions[int(torch.randint(len(regions), (1,), generator=generator))]
        else:
            box, text = torch.tensor(_WHOLE_IMAGE, dtype=torch.float64), caption
        target = LocCaTargets.build(
            [caption],
            [text],
            box.reshape(1, 4),
            vocabulary,
            max_length,
            parallel_probability=parallel_probability,
            generator=generator,
        )
        if not regions:
            target.loss_mask[:, 1:] = False
        parts.append(target)
    return LocCaTargets(
        torch.cat([part.input_ids for part in parts]),
        torch.cat([part.labels for part in parts]),
        torch.cat([part.loss_mask for part in parts]),
        torch.cat([part.causal for part in parts]),
    )


def distillation_inputs(
    distillation: SelfDistillationLoss,
    patches: torch.Tensor,
    grid_thw: torch.Tensor,
    indices: torch.Tensor,
    *,
    epoch: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SILC local views and TIPS mask of a packed batch, each image from its own generators.

    Args:
        distillation: the self-distillation loss (its :class:`~kornia_siglip2.losses.distill.views.LocalViews` and
            ``mask_ratio``).
        patches: :math:`(N, p \\cdot p \\cdot C)` packed global views.
        grid_thw: :math:`(n, 3)` grids.
        indices: :math:`(n,)` dataset indices of the images.
        epoch: the epoch of the batch.
        seed: the run's seed.

    Returns:
        - local views :math:`(F \\cdot V, C, S, S)`, frame-major, on the device of ``patches``.
        - bool mask :math:`(N,)` of the patches the student sees as the mask token.
    """
    views, masks = [], []
    videos = unpatchify(patches, grid_thw, distillation.patch_size)
    for video, (frames, height, width), index in zip(videos, grid_thw.tolist(), indices.tolist(), strict=True):
        views.append(distillation.local_views(list(video), sample_generator(seed, epoch, index, _VIEWS_STREAM)))
        generator = sample_generator(seed, epoch, index, _MASK_STREAM)
        masks.append(random_patch_mask([height * width] * frames, distillation.mask_ratio, generator))
    return torch.cat(views), torch.cat(masks).to(patches.device)


class SigLip2Objective(nn.Module):
    """The model and its SigLIP 2 loss in one module, whose ``forward`` returns every term.

    Wrap this module (not the model) in DDP or FSDP2: the LocCa decoder, the distillation heads and the
    teacher are then inside the wrapper, and its hooks fire on this ``forward``.

    Args:
        model: the SigLIP 2 model (the student).
        loss: its :class:`~kornia_siglip2.losses.siglip2.SigLip2Loss`.
        vocabulary: the LocCa id layout of ``loss``'s decoder (kept for :func:`locca_targets`).
    """

    def __init__(self, model: SigLip2, loss: SigLip2Loss, vocabulary: LocCaVocabulary) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.vocabulary = vocabulary

    def forward(
        self,
        patches: torch.Tensor,
        grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        targets: LocCaTargets,
        progress: float,
        local_views: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "sigmoid", "locca", "consistency", "masked"}`` scalars and ``"locca_tasks"`` :math:`(3,)`.

        The terms are means over this rank's images (the sigmoid term against every rank's texts when the
        loss is distributed); see :meth:`SigLip2Loss.forward` for the arguments.
        """
        output = self.loss(
            self.model,
            input_ids,
            targets,
            progress=progress,
            patches=patches,
            grid_thw=grid_thw,
            local_views=local_views,
            mask=mask,
        )
        return {"loss": output.loss, **output.terms(), "locca_tasks": output.locca_task_losses}

    @torch.no_grad()
    def start_distillation(self) -> None:
        """Copy the student into the EMA teacher, once (call outside ``forward``, where FSDP2 shards match)."""
        if self.loss.distillation is not None and not self.loss.distillation_started:
            self.loss.distillation.reset_teacher(self.model)
            self.loss.distillation_started = True

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher after an optimizer step (a no-op before the switch)."""
        self.loss.update_teacher(self.model)
