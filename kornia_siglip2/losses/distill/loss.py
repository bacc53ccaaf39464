"""SILC local-to-global consistency and TIPS masked prediction against an EMA teacher (SigLIP 2 section 2.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kornia_siglip2.errors import check, check_shape
from kornia_siglip2.losses.distill.ema import EMATeacher
from kornia_siglip2.losses.distill.heads import DINOHead, distillation_cross_entropy
from kornia_siglip2.losses.distill.views import LOCAL_CROP_SCALE, LocalViews, local_view_size, random_patch_mask
from kornia_siglip2.packing import grid_thw_to_seqlens, pack_inputs, patchify, unpatchify
from kornia_siglip2.vision import VisionTransformer

__all__ = ["DistillationBranch", "SelfDistillationLoss", "SelfDistillationOutput"]


@dataclass
class SelfDistillationOutput:
    """Output of :class:`SelfDistillationLoss`.

    Attributes:
        consistency_loss: scalar SILC local-to-global cross-entropy, mean over every (image, local view).
        masked_loss: scalar TIPS masked-prediction cross-entropy, mean over masked patches of each frame,
            then over frames.
        mask: bool :math:`(N,)` patches of the global view that the student saw as the mask token.
    """

    consistency_loss: torch.Tensor
    masked_loss: torch.Tensor
    mask: torch.Tensor


class DistillationBranch(nn.Module):
    """A vision tower and its two projection heads: one side of self-distillation, and what the teacher copies.

    Args:
        vision: the vision tower; it needs its MAP head (the pooled feature of SILC).
        global_head: head on the pooled feature of each frame.
        patch_head: head on per-patch features.

    Raises:
        ValueCheckError: ``vision`` has no MAP head (kornia check).
    """

    def __init__(self, vision: VisionTransformer, global_head: DINOHead, patch_head: DINOHead) -> None:
        super().__init__()
        check(vision.head is not None, "Self-distillation needs the pooled feature: vision_use_head=True.")
        self.vision = vision
        self.global_head = global_head
        self.patch_head = patch_head

    def forward(
        self,
        patches: torch.Tensor,
        grid_thw: torch.Tensor,
        selected: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a packed batch and project its pooled features and its selected patches.

        Args:
            patches: :math:`(N, p \\cdot p \\cdot C)` packed patches.
            grid_thw: :math:`(n, 3)` grid of each packed image.
            selected: bool :math:`(N,)` patches to project with the patch head.
            mask: optional bool :math:`(N,)` patches replaced by ``mask_token`` before the encoder.
            mask_token: :math:`(D,)` learned mask embedding.

        Returns:
            - global logits :math:`(\\sum t, K)`, one row per frame.
            - patch logits :math:`(M, K)` of the selected patches, in packed order.
        """
        output = self.vision(patches, grid_thw, mask=mask, mask_token=mask_token)
        # the patch head only sees the selected (masked) tokens: half the head's work (DINOv2's iBOT loss)
        return self.global_head(output.pooler_output), self.patch_head(output.last_hidden_state[selected])


class SelfDistillationLoss(nn.Module):
    """SigLIP 2 self-distillation: SILC local-to-global consistency and TIPS masked prediction.

    The teacher is an :class:`EMATeacher` copy of the student's vision tower plus two DINO heads
    (:class:`DINOHead`, one for pooled and one for per-patch features); this module owns the student's
    heads, the learned ``mask_token`` and the teacher centers. The student tower is not a submodule: pass
    it (or the whole ``SigLip2``) to :meth:`forward` and :meth:`update_teacher`, so its parameters are
    not counted twice.

    Per call, with the batch as the global view (SILC computes the image-text loss on that same view, so
    its 0.4-1 area crop belongs in the data pipeline, see
    :func:`~kornia_siglip2.losses.distill.views.global_view_augmentation`):

    - the teacher encodes the global view once, without mask;
    - the student encodes, in one packed batch, the global view with ``floor(mask_ratio * n)`` patches of
      each frame replaced by ``mask_token`` and ``num_local_views`` local crops per frame at
      ``local_size`` pixels (fixed-resolution towers resize their position table; NaFlex towers take
      any grid);
    - ``consistency_loss``: cross-entropy of each local view's pooled head output against the teacher's
      pooled output of its global view;
    - ``masked_loss``: the same cross-entropy on the patch head at masked positions only.

    Temperatures 0.1 (student) and 0.04 (teacher) and center momentum 0.9 are DINO's; each head has its
    own center, as in iBOT. Weighting the two terms (SigLIP 2: 1 and 0.25, times a size factor) is the
    caller's job. Call :meth:`update_teacher` after each optimizer step, and :meth:`reset_teacher` when the
    losses switch on (SigLIP 2: at 80 % of training). Build the optimizer from the parameters with
    ``requires_grad``: the teacher's are frozen.

    Args:
        student: the student vision tower, or a model with a ``vision_model`` attribute (``SigLip2``);
            its width sizes the heads and the teacher starts as a copy of it.
        hidden_dim: hidden width of both heads.
        bottleneck_dim: bottleneck width of both heads.
        num_prototypes: output size :math:`K` of both heads.
        student_temperature: :math:`\\tau_s`.
        teacher_temperature: :math:`\\tau_t`.
        center_momentum: momentum of the running teacher centers.
        teacher_momentum: EMA momentum of the teacher (fixed, as in SILC).
        num_local_views: local views per frame (SILC / SigLIP 2: 8).
        local_size: local view side in pixels, a multiple of the patch size; defaults to
            :func:`~kornia_siglip2.losses.distill.views.local_view_size` of the tower's resolution.
        local_scale: area fraction of the local crops.
        mask_ratio: fraction of each frame's patches masked for the student (TIPS / SigLIP 2: 0.5).
        seed: seed of the module's generator for local crops and masks; give each rank its own.

    Raises:
        ValueCheckError: ``local_size`` is not a multiple of the patch size, or the tower has no MAP head.

    Example:
        >>> from kornia_siglip2 import VisionConfig, VisionTransformer
        >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                       num_attention_heads=4, patch_size=4, image_size=16,
        ...                       position_embedding="fixed")
        >>> tower = VisionTransformer(config)
        >>> loss = SelfDistillationLoss(tower, hidden_dim=16, bottleneck_dim=8, num_prototypes=32)
        >>> loss.local_views.size
        8
        >>> out = loss(tower, torch.rand(2, 3, 16, 16))
        >>> (out.consistency_loss + 0.25 * out.masked_loss).backward()
        >>> int(out.mask.sum()), tower.embeddings.patch_embedding.weight.grad is not None
        (16, True)
        >>> loss.update_teacher(tower)
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 4096,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.996,
        num_local_views: int = 8,
        local_size: int | None = None,
        local_scale: tuple[float, float] = LOCAL_CROP_SCALE,
        mask_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vision = _vision_tower(student)
        config = vision.config
        if local_size is None:
            # the global view's side: the training resolution, or the NaFlex position table's side
            side = round(config.num_positions**0.5) * config.patch_size if config.is_naflex else config.image_size
            local_size = local_view_size(side, config.patch_size)
        check(
            local_size % config.patch_size == 0,
            f"local_size {local_size} must be a multiple of the patch size {config.patch_size}.",
        )
        check(0.0 <= mask_ratio <= 1.0, f"mask_ratio must be in [0, 1], got {mask_ratio}.")
        check(0.0 <= center_momentum <= 1.0, f"center_momentum must be in [0, 1], got {center_momentum}.")
        self.patch_size = config.patch_size
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.center_momentum = center_momentum
        self.mask_ratio = mask_ratio
        self.local_views = LocalViews(local_size, num_local_views, local_scale)
        self.global_head = DINOHead(config.hidden_size, hidden_dim, bottleneck_dim, num_prototypes)
        self.patch_head = DINOHead(config.hidden_size, hidden_dim, bottleneck_dim, num_prototypes)
        # zeros, as iBOT's and DINOv2's mask token
        self.mask_token = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("global_center", torch.zeros(num_prototypes))
        self.register_buffer("patch_center", torch.zeros(num_prototypes))
        self.teacher = EMATeacher(self._student_branch(vision), teacher_momentum)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self,
        student: nn.Module,
        images: torch.Tensor | None = None,
        *,
        patches: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> SelfDistillationOutput:
        """Both self-distillation terms for one batch of global views.

        Args:
            student: the student tower (or ``SigLip2``) the teacher was copied from.
            images: :math:`(B, C, H, W)` global views, ``H`` and ``W`` multiples of the patch size.
            patches: packed global views :math:`(N, p \\cdot p \\cdot C)` (NaFlex batches), instead of
                ``images``.
            grid_thw: :math:`(n, 3)` grid of each packed image, with ``patches``.
            local_views: optional precomputed :math:`(F \\cdot V, C, S, S)` local views, frame-major
                (``F`` frames, ``V`` views each); cropped here with :class:`LocalViews` when absent.
            mask: optional bool :math:`(N,)` student mask; drawn with :func:`random_patch_mask` when absent.

        Returns:
            :class:`SelfDistillationOutput` with the two scalar losses and the mask used.

        Raises:
            ValueCheckError: inputs are missing, given twice, or of the wrong shape (kornia check).
        """
        vision = _vision_tower(student)
        check(images is None or images.ndim == 4, "images must be (B, C, H, W); pass packed images as patches.")
        patches, grid_thw = pack_inputs(images, patches=patches, grid_thw=grid_thw, patch_size=self.patch_size)
        seqlens = grid_thw_to_seqlens(grid_thw)
        num_frames = seqlens.shape[0]
        if local_views is None:
            frames = images
            if frames is None:
                frames = [frame for video in unpatchify(patches, grid_thw, self.patch_size) for frame in video]
            local_views = self.local_views(frames, self.generator)
        check_shape(local_views, ["FV", "C", "S", "S"])
        check(
            local_views.shape[0] > 0 and local_views.shape[0] % num_frames == 0,
            f"local_views has {local_views.shape[0]} views, not a positive multiple of the {num_frames} frames.",
        )
        if mask is None:
            mask = random_patch_mask(seqlens, self.mask_ratio, self.generator)
        check(
            mask.shape == patches.shape[:1] and mask.dtype == torch.bool,
            f"mask must be a bool tensor of shape ({patches.shape[0]},), got {mask.dtype} {tuple(mask.shape)}.",
        )
        mask = mask.to(patches.device)
        local_patches, local_grid = patchify(local_views.to(patches.dtype), self.patch_size)

        teacher_global, teacher_patch = self.teacher(patches, grid_thw, mask)
        # one packed student batch: masked global views, then the local views (no mask); the pooled
        # outputs of the masked global views are not used, a few rows of MAP head for one encoder call
        student_mask = torch.cat([mask, mask.new_zeros(local_patches.shape[0])])
        student_global, student_patch = self._student_branch(vision)(
            torch.cat([patches, local_patches]),
            torch.cat([grid_thw, local_grid.to(grid_thw)]),
            student_mask,
            mask=student_mask,
            mask_token=self.mask_token,
        )

        num_views = local_views.shape[0] // num_frames
        consistency = distillation_cross_entropy(
            student_global[num_frames:],
            teacher_global.repeat_interleave(num_views, dim=0),
            self.student_temperature,
            self.teacher_temperature,
            self.global_center,
        ).mean()
        per_patch = distillation_cross_entropy(
            student_patch, teacher_patch, self.student_temperature, self.teacher_temperature, self.patch_center
        )
        # iBOT: mean over each frame's masked patches, then over frames (a frame with none adds 0)
        frame_index = torch.repeat_interleave(torch.arange(num_frames, device=mask.device), seqlens.to(mask.device))
        masked_frames = frame_index[mask]
        per_frame = per_patch.new_zeros(num_frames).index_add(0, masked_frames, per_patch)
        counts = torch.bincount(masked_frames, minlength=num_frames).clamp(min=1)
        masked = (per_frame / counts).mean()

        if self.training:
            self._update_center(self.global_center, teacher_global)
            self._update_center(self.patch_center, teacher_patch)
        return SelfDistillationOutput(consistency_loss=consistency, masked_loss=masked, mask=mask)

    @torch.no_grad()
    def update_teacher(self, student: nn.Module) -> None:
        """EMA step of the teacher towards the student tower and heads; call after each optimizer step."""
        self.teacher.update(self._student_branch(_vision_tower(student)))

    @torch.no_grad()
    def reset_teacher(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student tower and heads (when the losses switch on)."""
        self.teacher.reset_from(self._student_branch(_vision_tower(student)))

    def _student_branch(self, vision: VisionTransformer) -> DistillationBranch:
        return DistillationBranch(vision, self.global_head, self.patch_head)

    @torch.no_grad()
    def _update_center(self, center: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """DINO: ``c = m * c + (1 - m) * mean(teacher_logits)``, the mean taken over all ranks."""
        accumulate = torch.promote_types(torch.promote_types(teacher_logits.dtype, center.dtype), torch.float32)
        total = teacher_logits.sum(0, dtype=accumulate)  # a half-precision sum over a large batch overflows
        count = torch.tensor(float(teacher_logits.shape[0]), device=center.device, dtype=accumulate)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count > 0:
            center.mul_(self.center_momentum).add_((total / count).to(center.dtype), alpha=1.0 - self.center_momentum)


def _vision_tower(student: nn.Module) -> VisionTransformer:
    """The vision tower of ``student`` (a ``SigLip2``) or ``student`` itself."""
    vision = getattr(student, "vision_model", student)
    check(
        isinstance(vision, VisionTransformer),
        f"student must be a VisionTransformer or have a vision_model one, got {type(student).__name__}.",
    )
    return vision
