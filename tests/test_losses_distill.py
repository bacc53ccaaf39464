"""Tests of kornia_siglip2.losses.distill: DINO heads, EMA teacher, local views, masks, SILC + TIPS losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT, VISION, tolerance
from torch import nn

from kornia_siglip2 import SigLip2, SigLip2Config, VisionConfig, VisionTransformer, patchify
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses.distill import (
    DINOHead,
    DistillationBranch,
    EMATeacher,
    LocalViews,
    SelfDistillationLoss,
    distillation_cross_entropy,
    global_view_augmentation,
    local_view_size,
    random_patch_mask,
    teacher_probabilities,
)
from kornia_siglip2.packing import grid_thw_to_seqlens

HEADS = dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=32)
PATCH = VISION["patch_size"]
# NaFlex global views of 4x4, 3x3 and 2x3 patches: an odd count (9) checks the floor rounding
NAFLEX_SIZES = ((16, 16), (12, 12), (8, 12))


def make_tower(naflex: bool, device=None, dtype=torch.float32, seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    position_embedding = "naflex" if naflex else "fixed"
    config = VisionConfig(
        **dict(VISION, image_size=16, num_patches=16, position_embedding=position_embedding, **overrides)
    )
    return VisionTransformer(config).to(device=device, dtype=dtype)


def make_loss(tower: nn.Module, device=None, dtype=torch.float32, **options) -> SelfDistillationLoss:
    torch.manual_seed(1)
    return SelfDistillationLoss(tower, **dict(HEADS, **options)).to(device=device, dtype=dtype)


def naflex_batch(device=None, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    packed = [patchify(torch.rand(1, 3, h, w, generator=generator), PATCH) for h, w in NAFLEX_SIZES]
    patches = torch.cat([p for p, _ in packed]).to(device=device, dtype=dtype)
    return patches, torch.cat([g for _, g in packed]).to(device)


def fixed_batch(device=None, dtype=torch.float32, seed: int = 0, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 16, 16, generator=generator) * 2 - 1).to(device=device, dtype=dtype)


def assert_student_only_gradients(loss: SelfDistillationLoss, tower: nn.Module) -> None:
    for name, parameter in [*tower.named_parameters(), *loss.named_parameters()]:
        if name.startswith("teacher."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert loss.mask_token.grad.abs().sum() > 0


class TestDINOHead:
    def test_smoke(self, device, dtype):
        head = DINOHead(32, **HEADS).to(device, dtype)
        logits = head(torch.randn(5, 32, device=device, dtype=dtype))
        assert logits.shape == (5, 32) and logits.dtype == dtype
        # cosines between the unit bottleneck and unit prototypes
        assert logits.abs().max() <= 1 + 1e-2

    def test_cardinality(self, device, dtype):
        head = DINOHead(32, hidden_dim=16, bottleneck_dim=8, num_prototypes=7, num_layers=1).to(device, dtype)
        assert head(torch.randn(2, 3, 32, device=device, dtype=dtype)).shape == (2, 3, 7)
        assert len([m for m in DINOHead(32, **HEADS).mlp if isinstance(m, nn.Linear)]) == 3

    def test_prototypes_are_weight_normalized(self, device):
        head = DINOHead(32, **HEADS).to(device)
        features = torch.randn(4, 32, device=device)
        expected = head(features)
        with torch.no_grad():
            head.prototypes.weight.mul_(torch.rand(32, 1, device=device) + 0.5)  # rescale each prototype
        torch.testing.assert_close(head(features), expected)

    def test_exception(self):
        with pytest.raises(ValueCheckError, match=r"features must have shape \(\*, 32\)"):
            DINOHead(32, **HEADS)(torch.randn(4, 31))
        with pytest.raises(ValueCheckError, match="num_layers"):
            DINOHead(32, num_layers=0)

    def test_gradcheck(self, device):
        head = DINOHead(6, hidden_dim=5, bottleneck_dim=4, num_prototypes=7).to(device, torch.float64)
        features = torch.randn(3, 6, device=device, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(head, (features,))

    def test_dynamo(self, device, dtype):
        head = DINOHead(32, **HEADS).to(device, dtype)
        features = torch.randn(6, 32, device=device, dtype=dtype)
        compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(features), head(features), **tolerance(dtype))


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


class TestDistillationCrossEntropy:
    def test_smoke(self, device, dtype):
        student = torch.randn(4, 16, device=device, dtype=dtype)
        loss = distillation_cross_entropy(student, torch.randn(4, 16, device=device, dtype=dtype))
        assert loss.shape == (4,) and loss.dtype == torch.promote_types(dtype, torch.float32)
        assert torch.isfinite(loss).all() and (loss >= 0).all()

    def test_matches_formula(self, device):
        student, teacher = (torch.randn(5, 9, device=device, dtype=torch.float64) for _ in range(2))
        center = torch.randn(9, device=device, dtype=torch.float64)
        expected = -(F.softmax((teacher - center) / 0.04, -1) * F.log_softmax(student / 0.1, -1)).sum(-1)
        torch.testing.assert_close(distillation_cross_entropy(student, teacher, 0.1, 0.04, center), expected)

    def test_at_least_teacher_entropy(self, device):
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(64, 32, generator=generator, dtype=torch.float64).to(device)
        teacher = torch.randn(64, 32, generator=generator, dtype=torch.float64).to(device)
        loss = distillation_cross_entropy(student, teacher)
        probs = teacher_probabilities(teacher)
        entropy = _entropy(probs)
        assert (loss >= entropy).all()
        # the gap is KL(p_t || p_s)
        kl = F.kl_div(F.log_softmax(student / 0.1, -1), probs, reduction="none").sum(-1)
        torch.testing.assert_close(loss - entropy, kl)

    @pytest.mark.parametrize("temperature", [0.04, 0.1, 1.0])
    def test_equals_entropy_when_student_matches_teacher(self, device, temperature):
        teacher = torch.randn(8, 32, device=device, dtype=torch.float64)
        center = torch.randn(32, device=device, dtype=torch.float64)
        # student logits equal to the centered teacher logits, same temperature: p_s == p_t
        student = (teacher - center).clone().requires_grad_(True)
        loss = distillation_cross_entropy(student, teacher, temperature, temperature, center)
        torch.testing.assert_close(loss, _entropy(teacher_probabilities(teacher, temperature, center)))
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert grad.abs().max() < 1e-12

    def test_teacher_gets_no_gradient(self, device):
        student = torch.randn(3, 8, device=device, requires_grad=True)
        teacher = torch.randn(3, 8, device=device, requires_grad=True)
        distillation_cross_entropy(student, teacher).sum().backward()
        assert student.grad is not None and teacher.grad is None

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="same shape"):
            distillation_cross_entropy(torch.randn(3, 8), torch.randn(3, 9))
        with pytest.raises(ValueCheckError, match="student_temperature must be positive"):
            distillation_cross_entropy(torch.randn(3, 8), torch.randn(3, 8), student_temperature=0.0)
        with pytest.raises(ValueCheckError, match=r"center must have shape \(8,\)"):
            distillation_cross_entropy(torch.randn(3, 8), torch.randn(3, 8), center=torch.zeros(7))
        with pytest.raises(ValueError, match="Shape"):
            distillation_cross_entropy(torch.randn(8), torch.randn(8))

    def test_gradcheck(self, device):
        student = torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True)
        teacher, center = torch.randn(3, 5, device=device, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda s: distillation_cross_entropy(s, teacher, center=center), (student,))

    def test_dynamo(self, device, dtype):
        student, teacher = (torch.randn(6, 32, device=device, dtype=dtype) for _ in range(2))
        center = torch.randn(32, device=device, dtype=dtype)
        compiled = torch.compile(distillation_cross_entropy, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            compiled(student, teacher, center=center),
            distillation_cross_entropy(student, teacher, center=center),
            **tolerance(dtype),
        )


class TestEMATeacher:
    def test_switch_on_equals_student(self, device, dtype):
        student = make_tower(naflex=True, device=device, dtype=dtype)
        teacher = EMATeacher(student)
        teacher_state = teacher.module.state_dict()
        for name, tensor in student.state_dict().items():
            assert torch.equal(teacher_state[name], tensor), name
        patches, grid_thw = naflex_batch(device, dtype)
        # both without autograd: the same (CPU inference) kernels, so equal weights give bit-equal outputs
        with torch.no_grad():
            assert torch.equal(teacher(patches, grid_thw).pooler_output, student(patches, grid_thw).pooler_output)

    def test_no_gradient(self, device):
        student = make_tower(naflex=False, device=device)
        teacher = EMATeacher(student)
        assert not any(parameter.requires_grad for parameter in teacher.parameters())
        patches, grid_thw = patchify(fixed_batch(device).requires_grad_(True), PATCH)
        target = teacher(patches, grid_thw).pooler_output
        assert not target.requires_grad
        (student(patches, grid_thw).pooler_output - target).square().sum().backward()
        assert all(parameter.grad is None for parameter in teacher.parameters())
        assert all(parameter.grad is not None for parameter in student.parameters())

    @pytest.mark.parametrize("momentum", [0.996, 0.9, 0.0, 1.0])
    def test_update_is_exact(self, device, dtype, momentum):
        student = make_tower(naflex=True, device=device, dtype=dtype)
        teacher = EMATeacher(student, momentum=momentum)
        for step in range(2):
            with torch.no_grad():
                for parameter in student.parameters():
                    parameter.add_(torch.randn_like(parameter))
            previous = {name: tensor.clone() for name, tensor in teacher.module.named_parameters()}
            teacher.update(student)
            for name, parameter in student.named_parameters():
                expected = momentum * previous[name] + (1 - momentum) * parameter
                if dtype == torch.bfloat16:
                    # foreach kernels and plain ops round bf16 products differently: within an ulp of the O(1) values
                    torch.testing.assert_close(teacher.module.get_parameter(name), expected, atol=2**-6, rtol=2**-7)
                else:
                    assert torch.equal(teacher.module.get_parameter(name), expected), (step, name)

    def test_reset_from(self, device):
        student = make_tower(naflex=True, device=device)
        teacher = EMATeacher(student, momentum=0.5)
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.mul_(2.0)
        teacher.update(student)
        assert not torch.equal(teacher.module.post_layernorm.weight, student.post_layernorm.weight)
        teacher.reset_from(student)
        for name, parameter in student.named_parameters():
            assert torch.equal(teacher.module.get_parameter(name), parameter), name

    def test_train_keeps_teacher_in_eval(self):
        teacher = EMATeacher(nn.Dropout(0.5)).train()
        assert teacher.training and not teacher.module.training
        assert torch.equal(teacher(torch.ones(100)), torch.ones(100))

    def test_exception(self):
        with pytest.raises(ValueCheckError, match=r"momentum must be in \[0, 1\]"):
            EMATeacher(nn.Linear(3, 2), momentum=1.5)
        teacher = EMATeacher(nn.Linear(3, 2))
        with pytest.raises(ValueError, match="Shape of 'weight' differs"):
            teacher.update(nn.Linear(3, 4))
        with pytest.raises(ValueError, match="does not match the teacher"):
            teacher.reset_from(nn.Linear(3, 2, bias=False))


class TestRandomPatchMask:
    def test_exact_count_per_frame(self, device):
        seqlens = torch.tensor([16, 9, 6, 1, 4, 25], device=device)
        mask = random_patch_mask(seqlens, generator=torch.Generator().manual_seed(0))
        assert mask.dtype == torch.bool and mask.shape == (61,) and mask.device.type == device.type
        counts = [int(chunk.sum()) for chunk in mask.split(seqlens.tolist())]
        assert counts == [8, 4, 3, 0, 2, 12]  # floor(n / 2): exactly half for even n
        other = random_patch_mask(seqlens.tolist(), mask_ratio=0.25, generator=torch.Generator().manual_seed(0))
        assert [int(chunk.sum()) for chunk in other.split(seqlens.tolist())] == [math.floor(n / 4) for n in seqlens]

    def test_seeded(self):
        seqlens = torch.tensor([16, 9])
        first = random_patch_mask(seqlens, generator=torch.Generator().manual_seed(3))
        assert torch.equal(first, random_patch_mask(seqlens, generator=torch.Generator().manual_seed(3)))
        assert not torch.equal(first, random_patch_mask(seqlens, generator=torch.Generator().manual_seed(4)))

    def test_uniform_over_positions(self):
        # 400 independent frames of 6 and 5 patches in one call: each position masked with probability k / n
        mask = random_patch_mask([6, 5] * 400, generator=torch.Generator().manual_seed(0))
        frequency = mask.reshape(400, 11).double().mean(0)
        torch.testing.assert_close(frequency[:6], torch.full((6,), 0.5, dtype=torch.float64), atol=0.1, rtol=0)
        torch.testing.assert_close(frequency[6:], torch.full((5,), 0.4, dtype=torch.float64), atol=0.1, rtol=0)

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="mask_ratio"):
            random_patch_mask([4], mask_ratio=1.5)
        with pytest.raises(ValueError, match="Shape"):
            random_patch_mask(torch.ones(2, 2, dtype=torch.long))


class TestViews:
    def test_local_view_size(self):
        assert local_view_size(224, 16) == 96  # DINO's 96-pixel local crops
        assert local_view_size(16, 4) == 8 and local_view_size(4, 4) == 4

    def test_smoke(self, device, dtype):
        images = torch.rand(2, 3, 16, 16, device=device, dtype=dtype)
        views = LocalViews(8, num_views=3)(images, generator=torch.Generator().manual_seed(0))
        assert views.shape == (6, 3, 8, 8) and views.dtype == dtype and views.device.type == device.type
        assert global_view_augmentation(16)(images).shape == (2, 3, 16, 16)

    def test_images_of_different_sizes_keep_their_order(self, device):
        # constant images: every view of image i is the constant i, whatever the crop
        sizes = [(16, 16), (12, 20), (16, 16)]
        images = [torch.full((3, h, w), float(i), device=device) for i, (h, w) in enumerate(sizes)]
        views = LocalViews(8, num_views=4)(images, generator=torch.Generator().manual_seed(0))
        expected = torch.arange(3.0, device=device).repeat_interleave(4)
        torch.testing.assert_close(views.mean((1, 2, 3)), expected)
        torch.testing.assert_close(views.amax((1, 2, 3)), expected)

    def test_seeded_and_global_rng_untouched(self):
        images = torch.rand(2, 3, 16, 16)
        local = LocalViews(8, num_views=2)
        state = torch.get_rng_state()
        first = local(images, generator=torch.Generator().manual_seed(5))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(first, local(images, generator=torch.Generator().manual_seed(5)))
        assert not torch.equal(first, local(images, generator=torch.Generator().manual_seed(6)))

    def test_exception(self):
        with pytest.raises(ValueError, match="Shape"):
            LocalViews(8)([torch.rand(16, 16)])
        with pytest.raises(ValueCheckError, match="positive"):
            LocalViews(8, num_views=0)


class TestSelfDistillationLoss:
    @pytest.mark.parametrize("naflex", [False, True])
    def test_smoke_fixed_size_images(self, device, dtype, naflex):
        # fixed-res: the 2x2-patch local views resize the 4x4 position table; NaFlex resizes it per grid
        tower = make_tower(naflex=naflex, device=device, dtype=dtype)
        loss = make_loss(tower, device, dtype)
        out = loss(tower, fixed_batch(device, dtype))
        assert out.consistency_loss.shape == () and out.masked_loss.shape == ()
        assert torch.isfinite(out.consistency_loss) and torch.isfinite(out.masked_loss)
        (out.consistency_loss + 0.25 * out.masked_loss).backward()
        assert_student_only_gradients(loss, tower)

    def test_smoke_naflex_packed(self, device, dtype):
        tower = make_tower(naflex=True, device=device, dtype=dtype)
        loss = make_loss(tower, device, dtype)
        patches, grid_thw = naflex_batch(device, dtype)
        out = loss(tower, patches=patches, grid_thw=grid_thw)
        assert torch.isfinite(out.consistency_loss) and torch.isfinite(out.masked_loss)
        (out.consistency_loss + out.masked_loss).backward()
        assert_student_only_gradients(loss, tower)

    def test_siglip2_model_as_student(self, device):
        config = SigLip2Config(model_type="siglip2", vision_config=dict(VISION, num_patches=16), text_config=dict(TEXT))
        model = SigLip2(config).to(device)
        loss = make_loss(model, device)
        out = loss(model, fixed_batch(device))
        out.consistency_loss.backward()
        assert model.vision_model.post_layernorm.weight.grad is not None
        assert all(parameter.grad is None for parameter in model.text_model.parameters())
        loss.update_teacher(model)

    def test_cardinality(self, device):
        tower = make_tower(naflex=True, device=device)
        loss = make_loss(tower, device, num_local_views=3)
        assert loss.local_views.size == 8 and loss.local_views.num_views == 3
        patches, grid_thw = naflex_batch(device)
        out = loss(tower, patches=patches, grid_thw=grid_thw)
        counts = [int(chunk.sum()) for chunk in out.mask.split(grid_thw_to_seqlens(grid_thw).tolist())]
        assert counts == [8, 4, 3]  # 16, 9, 6 patches: floor(n / 2)
        assert loss.global_head.prototypes.weight.shape == (32, 8) and loss.mask_token.shape == (32,)

    def test_exception(self, device):
        tower = make_tower(naflex=True, device=device)
        loss = make_loss(tower, device)
        images = fixed_batch(device)
        patches, grid_thw = patchify(images, PATCH)
        with pytest.raises(ValueCheckError, match="either images"):
            loss(tower)
        with pytest.raises(ValueCheckError, match="either images"):
            loss(tower, images, patches=patches, grid_thw=grid_thw)
        with pytest.raises(ValueCheckError, match="either images"):
            loss(tower, patches=patches)
        with pytest.raises(ValueCheckError, match=r"mask must be a bool tensor of shape \(32,\)"):
            loss(tower, images, mask=torch.zeros(31, dtype=torch.bool, device=device))
        with pytest.raises(ValueCheckError, match="not a positive multiple of the 2 frames"):
            loss(tower, images, local_views=torch.rand(3, 3, 8, 8, device=device))
        with pytest.raises(ValueCheckError, match="student must be a VisionTransformer"):
            loss(nn.Linear(2, 2), images)
        with pytest.raises(ValueCheckError, match="multiple of the patch size"):
            make_loss(tower, local_size=6)
        with pytest.raises(ValueCheckError, match="vision_use_head"):
            make_loss(make_tower(naflex=True, vision_use_head=False))

    def test_teacher_equals_student_at_switch_on(self, device):
        tower = make_tower(naflex=True, device=device)
        loss = make_loss(tower, device)
        patches, grid_thw = naflex_batch(device)
        selected = random_patch_mask(grid_thw_to_seqlens(grid_thw))
        with torch.no_grad():  # the same kernels on both sides (the frozen teacher takes the inference path)
            teacher_global, teacher_patch = loss.teacher(patches, grid_thw, selected)
            student_global, student_patch = DistillationBranch(tower, loss.global_head, loss.patch_head)(
                patches, grid_thw, selected
            )
        assert torch.equal(teacher_global, student_global) and torch.equal(teacher_patch, student_patch)
        # after drifting apart, reset_teacher copies the student again
        with torch.no_grad():
            loss.global_head.prototypes.weight.add_(1.0)
        loss.update_teacher(tower)
        loss.reset_teacher(tower)
        assert torch.equal(loss.teacher.module.global_head.prototypes.weight, loss.global_head.prototypes.weight)

    def test_update_teacher_is_exact_ema(self, device):
        tower = make_tower(naflex=False, device=device)
        loss = make_loss(tower, device, teacher_momentum=0.996)
        optimizer = torch.optim.SGD([*tower.parameters(), *(p for p in loss.parameters() if p.requires_grad)], lr=1.0)
        out = loss(tower, fixed_batch(device))
        (out.consistency_loss + out.masked_loss).backward()
        optimizer.step()
        previous = {name: tensor.clone() for name, tensor in loss.teacher.module.named_parameters()}
        loss.update_teacher(tower)
        student = DistillationBranch(tower, loss.global_head, loss.patch_head)
        changed = 0
        for name, parameter in student.named_parameters():
            expected = 0.996 * previous[name] + (1 - 0.996) * parameter
            assert torch.equal(loss.teacher.module.get_parameter(name), expected), name
            changed += not torch.equal(previous[name], expected)
        assert changed > 0

    def test_masked_loss_ignores_unmasked_positions(self, device):
        tower = make_tower(naflex=True, device=device)
        loss = make_loss(tower, device).eval()  # eval: the centers stay put between the two runs
        patches, grid_thw = naflex_batch(device)
        mask = random_patch_mask(grid_thw_to_seqlens(grid_thw), generator=torch.Generator().manual_seed(0))
        views = loss.local_views([torch.rand(3, 16, 16, device=device)] * 3, torch.Generator().manual_seed(0))
        inputs = dict(patches=patches, grid_thw=grid_thw, local_views=views, mask=mask)
        reference = loss(tower, **inputs)

        def perturb_unmasked(rows_masked: torch.Tensor):
            def hook(module, args, output):
                noise = torch.randn_like(output) * (~rows_masked)[:, None]
                return output + noise

            return hook

        # the features the heads read (after the final LayerNorm), student and teacher, at unmasked rows;
        # the student's packed batch is the masked global view followed by the unmasked local views
        student_rows = torch.cat([mask, mask.new_zeros(views.shape[0] * 4)])
        handles = [
            tower.post_layernorm.register_forward_hook(perturb_unmasked(student_rows)),
            loss.teacher.module.vision.post_layernorm.register_forward_hook(perturb_unmasked(mask)),
        ]
        try:
            perturbed = loss(tower, **inputs)
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(perturbed.masked_loss, reference.masked_loss)
        assert not torch.equal(perturbed.consistency_loss, reference.consistency_loss)  # the hooks did fire

    def test_centers_follow_the_teacher_in_training_only(self, device):
        tower = make_tower(naflex=False, device=device)
        loss = make_loss(tower, device)
        images = fixed_batch(device)
        loss.eval()(tower, images)
        assert not loss.global_center.any() and not loss.patch_center.any()
        mask = random_patch_mask([16, 16], generator=torch.Generator().manual_seed(0))
        teacher_global, teacher_patch = loss.teacher(*patchify(images, PATCH), mask.to(device))
        loss.train()(tower, images, mask=mask.to(device))
        torch.testing.assert_close(loss.global_center, 0.1 * teacher_global.mean(0))
        torch.testing.assert_close(loss.patch_center, 0.1 * teacher_patch.mean(0))

    def test_seeded(self, device):
        tower = make_tower(naflex=True, device=device)
        images = fixed_batch(device)
        first, second = make_loss(tower, device, seed=7).eval(), make_loss(tower, device, seed=7).eval()
        out_first, out_second = first(tower, images), second(tower, images)
        assert torch.equal(out_first.mask, out_second.mask)
        assert torch.equal(out_first.consistency_loss, out_second.consistency_loss)
        assert not torch.equal(first(tower, images).mask, out_first.mask)  # the generator moves on

    def test_gradcheck(self, device):
        dtype = torch.float64
        tower = make_tower(naflex=False, device=device, dtype=dtype)
        loss = make_loss(tower, device, dtype, num_local_views=2).eval()
        images = fixed_batch(device, dtype)
        mask = random_patch_mask([16, 16], generator=torch.Generator().manual_seed(0)).to(device)
        views = loss.local_views(images, torch.Generator().manual_seed(0)).requires_grad_(True)
        mask_token = torch.randn(32, device=device, dtype=dtype, requires_grad=True)

        def both_terms(views, mask_token):
            out = torch.func.functional_call(
                loss, {"mask_token": mask_token}, (tower, images), dict(local_views=views, mask=mask)
            )
            return out.consistency_loss, out.masked_loss

        assert torch.autograd.gradcheck(both_terms, (views, mask_token), fast_mode=True)

    def test_dynamo(self, device, dtype):
        # host-side steps (crops, masks, grid reads) break the graph; the result must not change.
        # aot_eager traces forward and backward like inductor without its minutes of C++ codegen on CPU.
        tower = make_tower(naflex=True, device=device, dtype=dtype, num_hidden_layers=1)
        loss = make_loss(tower, device, dtype).eval()
        patches, grid_thw = naflex_batch(device, dtype)
        mask = random_patch_mask(grid_thw_to_seqlens(grid_thw), generator=torch.Generator().manual_seed(0))
        views = loss.local_views([torch.rand(3, 16, 16, device=device, dtype=dtype)] * 3, torch.Generator())
        inputs = dict(patches=patches, grid_thw=grid_thw, local_views=views, mask=mask.to(device))
        compiled = torch.compile(loss, backend="aot_eager")
        actual, expected = compiled(tower, **inputs), loss(tower, **inputs)
        torch.testing.assert_close(actual.consistency_loss, expected.consistency_loss, **tolerance(dtype))
        torch.testing.assert_close(actual.masked_loss, expected.masked_loss, **tolerance(dtype))
        (grad,) = torch.autograd.grad(actual.masked_loss, loss.mask_token)
        (expected_grad,) = torch.autograd.grad(expected.masked_loss, loss.mask_token)
        torch.testing.assert_close(grad, expected_grad, **tolerance(dtype))


class TestSelfDistillationValues:
    """Both terms against an independent float64 computation: every view through the tower alone, the DINO
    cross-entropy written out with exp/log, iBOT's mean over each frame's masked patches."""

    @staticmethod
    def _cross_entropy(student, teacher, tau_s, tau_t, center):
        teacher = (teacher - center) / tau_t
        p_t = torch.exp(teacher - teacher.amax(-1, keepdim=True))
        p_t = p_t / p_t.sum(-1, keepdim=True)
        shifted = student / tau_s - (student / tau_s).amax(-1, keepdim=True)
        log_p_s = shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))
        return -(p_t * log_p_s).sum(-1)

    def test_matches_independent_float64(self):
        tower = make_tower(naflex=True, dtype=torch.float64, seed=3)
        loss = make_loss(tower, dtype=torch.float64, num_local_views=2)
        with torch.no_grad():  # teacher != student and non-zero centers, so neither can hide a mistake
            for parameter in loss.teacher.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
            loss.global_center.normal_(0, 0.1)
            loss.patch_center.normal_(0, 0.1)
            loss.mask_token.normal_()
        images = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        local_views = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        mask = torch.zeros(32, dtype=torch.bool)
        mask[[0, 3, 5, 6, 9, 17, 20, 31]] = True  # 6 patches of image 0, 2 of image 1
        loss.eval()  # no center update inside the call
        out = loss(tower, images, local_views=local_views, mask=mask)

        teacher_tower, teacher_global_head, teacher_patch_head = (
            loss.teacher.module.vision,
            loss.teacher.module.global_head,
            loss.teacher.module.patch_head,
        )
        tau_s, tau_t = loss.student_temperature, loss.teacher_temperature
        consistency, masked = [], []
        for index in range(2):
            patches, grid = patchify(images[index : index + 1], PATCH)
            teacher = teacher_tower(patches, grid)
            teacher_global = teacher_global_head(teacher.pooler_output)
            for view in local_views[2 * index : 2 * index + 2]:
                student = tower(*patchify(view[None], PATCH))
                student_global = loss.global_head(student.pooler_output)
                consistency.append(
                    self._cross_entropy(student_global, teacher_global, tau_s, tau_t, loss.global_center)
                )
            frame_mask = mask[16 * index : 16 * index + 16]
            student = tower(patches, grid, mask=frame_mask, mask_token=loss.mask_token)
            per_patch = self._cross_entropy(
                loss.patch_head(student.last_hidden_state[frame_mask]),
                teacher_patch_head(teacher.last_hidden_state[frame_mask]),
                tau_s,
                tau_t,
                loss.patch_center,
            )
            masked.append(per_patch.mean())
        torch.testing.assert_close(out.consistency_loss, torch.cat(consistency).mean(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out.masked_loss, torch.stack(masked).mean(), atol=1e-12, rtol=1e-12)
