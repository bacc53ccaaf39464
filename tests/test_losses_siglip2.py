"""Tests of kornia_siglip2.losses.siglip2: schedule, composition, switch-on, and a short synthetic training run."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import TEXT, VISION, tolerance
from torch import nn

from kornia_siglip2 import SigLip2, SigLip2Config
from kornia_siglip2.decoders import LocCaDecoder, LocCaTargets, LocCaVocabulary
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses.distill import DistillationBranch, SelfDistillationLoss, random_patch_mask
from kornia_siglip2.losses.locca import LocCaLoss
from kornia_siglip2.losses.siglip2 import (
    LOSS_TERMS,
    MODEL_SIZE_FACTORS,
    SigLip2Loss,
    SigLip2LossSchedule,
    infer_model_size,
    model_size_factor,
)
from kornia_siglip2.packing import patchify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEADS = dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=32, num_local_views=2)
LENGTH = 8  # text and LocCa decoder length
# NaFlex batch: 4x4, 3x3 and 2x3 patches of 4 pixels
NAFLEX_SIZES = ((16, 16), (12, 12), (8, 12))
SIZES = [("B", 0.25), ("L", 0.5), ("So400m", 1.0), ("g", 0.5)]


@pytest.fixture(autouse=True)
def single_thread():
    # tiny ops run faster on one thread than on two cores shared with other jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(naflex: bool = False, device=None, dtype=torch.float32, seed: int = 0) -> SigLip2:
    torch.manual_seed(seed)
    config = SigLip2Config(
        model_type="siglip2" if naflex else "siglip",
        vision_config=dict(VISION, image_size=16, num_patches=16),
        text_config=dict(TEXT, max_position_embeddings=LENGTH),
    )
    return SigLip2(config).to(device=device, dtype=dtype)


def make_vocabulary() -> LocCaVocabulary:
    return LocCaVocabulary(TEXT["vocab_size"], num_bins=8, pad_token_id=0, eos_token_id=1)


def make_loss(model: SigLip2, schedule: SigLip2LossSchedule | None = None, **options) -> SigLip2Loss:
    torch.manual_seed(1)
    schedule = SigLip2LossSchedule(size_factor=0.5) if schedule is None else schedule
    return SigLip2Loss.from_model(model, make_vocabulary(), schedule, distillation_options=dict(HEADS, **options))


def make_batch(num_images: int = 2, device=None, dtype=torch.float32, seed: int = 0, naflex: bool = False) -> dict:
    """Images (or packed patches), text ids and LocCa targets of ``num_images`` pairs."""
    generator = torch.Generator().manual_seed(seed)
    if naflex:
        packed = [patchify(torch.rand(1, 3, h, w, generator=generator) * 2 - 1, 4) for h, w in NAFLEX_SIZES]
        num_images = len(packed)
        images = dict(
            patches=torch.cat([p for p, _ in packed]).to(device, dtype),
            grid_thw=torch.cat([g for _, g in packed]).to(device),
        )
    else:
        images = dict(images=(torch.rand(num_images, 3, 16, 16, generator=generator) * 2 - 1).to(device, dtype))
    input_ids = torch.randint(2, TEXT["vocab_size"], (num_images, LENGTH), generator=generator)
    captions = [input_ids[i, : 2 + i].tolist() for i in range(num_images)]
    corners = torch.rand(num_images, 2, 2, generator=generator).sort(dim=1).values.flatten(1)
    targets = LocCaTargets.build(
        captions, [c[:2] for c in captions], corners, make_vocabulary(), LENGTH, generator=generator, device=device
    )
    return dict(input_ids=input_ids.to(device), locca_targets=targets, **images)


class _Objective(nn.Module):
    """The total loss of ``model`` as one module, so ``torch.func.functional_call`` can swap any leaf."""

    def __init__(self, model: SigLip2, loss_fn: SigLip2Loss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, **inputs) -> torch.Tensor:
        return self.loss_fn(self.model, **inputs).loss


def _optimizer(model: SigLip2, loss_fn: SigLip2Loss) -> torch.optim.Optimizer:
    return torch.optim.SGD([*model.parameters(), *(p for p in loss_fn.parameters() if p.requires_grad)], lr=0.5)


def _assert_teacher_equals_student(loss_fn: SigLip2Loss, model: SigLip2, equal: bool = True) -> None:
    distillation = loss_fn.distillation
    student = DistillationBranch(model.vision_model, distillation.global_head, distillation.patch_head)
    teacher = dict(distillation.teacher.module.named_parameters())
    same = [torch.equal(teacher[name], parameter) for name, parameter in student.named_parameters()]
    assert all(same) if equal else not all(same)


class TestModelSize:
    @pytest.mark.parametrize(("name", "factor"), SIZES)
    def test_size_factor(self, name, factor):
        assert model_size_factor(name) == factor == MODEL_SIZE_FACTORS[name]
        assert model_size_factor(name.lower()) == factor
        assert model_size_factor(f"ViT-{name}/16") == factor

    @pytest.mark.parametrize(("width", "name"), [(768, "B"), (1024, "L"), (1152, "So400m"), (1536, "g")])
    def test_infer_from_vision_width(self, width, name):
        assert infer_model_size(width) == name
        schedule = SigLip2LossSchedule.from_vision_width(width)
        assert schedule.size_factor == MODEL_SIZE_FACTORS[name]

    def test_exception(self):
        with pytest.raises(ValueError, match="Unknown model size"):
            model_size_factor("H/14")
        with pytest.raises(ValueError, match="not a SigLIP 2 size"):
            infer_model_size(32)


class TestSigLip2LossSchedule:
    @pytest.mark.parametrize(("name", "factor"), SIZES)
    def test_weights_follow_the_schedule(self, name, factor):
        schedule = SigLip2LossSchedule.for_model_size(name)
        before = {"sigmoid": 1.0, "locca": 1.0, "consistency": 0.0, "masked": 0.0}
        after = {"sigmoid": 1.0, "locca": 1.0, "consistency": factor, "masked": 0.25 * factor}
        for progress in (0.0, 0.3, 0.5, 0.79, 0.7999999):
            assert schedule.loss_weights(progress) == before, progress
            assert not schedule.distillation_active(progress)
        for progress in (0.8, 0.80001, 0.9, 1.0):  # switched on from 80 % inclusive
            assert schedule.loss_weights(progress) == after, progress
            assert schedule.distillation_active(progress)

    def test_sigmoid_and_locca_weigh_the_same(self):
        schedule = SigLip2LossSchedule()
        for progress in torch.linspace(0, 1, 21).tolist():
            weights = schedule.loss_weights(progress)
            assert weights["sigmoid"] == weights["locca"] == 1.0

    def test_configurable_switch(self):
        assert SigLip2LossSchedule(distill_start=0.5).loss_weights(0.6)["consistency"] == 1.0
        assert SigLip2LossSchedule(distill_start=0.0).loss_weights(0.0)["masked"] == 0.25
        never = SigLip2LossSchedule(distill_start=None)
        assert never.loss_weights(1.0) == {"sigmoid": 1.0, "locca": 1.0, "consistency": 0.0, "masked": 0.0}
        assert SigLip2LossSchedule(size_factor=0.3).loss_weights(1.0)["masked"] == pytest.approx(0.075)

    def test_cardinality(self):
        weights = SigLip2LossSchedule().loss_weights(0.9)
        assert tuple(weights) == LOSS_TERMS
        assert all(isinstance(value, float) for value in weights.values())

    def test_exception(self):
        schedule = SigLip2LossSchedule()
        for progress in (-0.01, 1.01, math.nan):
            with pytest.raises(ValueCheckError, match="progress must be in"):
                schedule.loss_weights(progress)
        with pytest.raises(ValueError, match="distill_start"):
            SigLip2LossSchedule(distill_start=1.5)
        with pytest.raises(ValueError, match="masked_weight must be non-negative"):
            SigLip2LossSchedule(masked_weight=-1.0)


class TestSigLip2Loss:
    @pytest.mark.parametrize("progress", [0.1, 0.9])
    def test_smoke(self, device, dtype, progress):
        model = make_model(device=device, dtype=dtype)
        loss_fn = make_loss(model)
        output = loss_fn(model, **make_batch(device=device, dtype=dtype), progress=progress)
        assert output.distillation_active == (progress >= 0.8)
        assert output.weights == loss_fn.schedule.loss_weights(progress)
        for name, term in output.terms().items():
            assert term.shape == () and torch.isfinite(term), name
        output.loss.backward()
        assert model.logit_bias.grad is not None and loss_fn.locca.decoder.head.weight.grad is not None
        assert (loss_fn.distillation.mask_token.grad is not None) == output.distillation_active

    def test_smoke_naflex_packed(self, device):
        model = make_model(naflex=True, device=device)
        loss_fn = make_loss(model)
        output = loss_fn(model, **make_batch(device=device, naflex=True), progress=0.9)
        assert all(torch.isfinite(term) and term > 0 for term in output.terms().values())
        output.loss.backward()
        assert model.vision_model.embeddings.patch_embedding.weight.grad is not None

    def test_cardinality(self, device):
        model = make_model(device=device)
        loss_fn = make_loss(model)
        output = loss_fn(model, **make_batch(num_images=3, device=device), progress=0.95)
        assert output.loss.shape == () and output.locca_task_losses.shape == (3,)
        assert tuple(output.terms()) == tuple(output.weights) == LOSS_TERMS
        # the LocCa term is its three tasks summed (each weighted 1)
        torch.testing.assert_close(output.locca_loss, output.locca_task_losses.sum())

    @pytest.mark.parametrize("progress", [0.5, 0.85])
    def test_total_is_the_weighted_sum_of_the_terms(self, device, progress):
        model = make_model(device=device, dtype=torch.float64)
        loss_fn = make_loss(model).eval()  # eval: the teacher centers stay put, so terms can be recomputed
        batch = make_batch(device=device, dtype=torch.float64)
        images = batch["images"]
        mask = random_patch_mask([16, 16], generator=torch.Generator().manual_seed(0)).to(device)
        views = loss_fn.distillation.local_views(images, torch.Generator().manual_seed(0))
        output = loss_fn(model, **batch, progress=progress, local_views=views, mask=mask)

        weights = output.weights
        assert weights["sigmoid"] == weights["locca"] == 1.0  # equal weights (SigLIP 2 section 2.2)
        expected = sum(weights[name] * term for name, term in output.terms().items())
        torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-12)

        # each term is the component it stands for, computed on its own
        reference = model(input_ids=batch["input_ids"], pixel_values=images, return_loss=True)
        torch.testing.assert_close(output.sigmoid_loss, reference.loss, rtol=0, atol=1e-12)
        vision = reference.vision_model_output  # 4-D images in: tokens (B, h*w, D), flattened to the packed layout
        locca = loss_fn.locca(vision.last_hidden_state.flatten(0, 1), vision.cu_seqlens, batch["locca_targets"])
        torch.testing.assert_close(output.locca_loss, locca.loss, rtol=0, atol=1e-12)
        if progress < 0.8:
            assert output.consistency_loss == 0 and output.masked_loss == 0
        else:
            distilled = loss_fn.distillation(model, images, local_views=views, mask=mask)
            torch.testing.assert_close(output.consistency_loss, distilled.consistency_loss, rtol=0, atol=1e-12)
            torch.testing.assert_close(output.masked_loss, distilled.masked_loss, rtol=0, atol=1e-12)
            assert output.loss > output.sigmoid_loss + output.locca_loss

    def test_no_distillation_compute_before_the_switch(self, device):
        model = make_model(device=device)
        loss_fn = make_loss(model)
        optimizer = _optimizer(model, loss_fn)
        calls = {"distillation": 0, "teacher": 0, "vision": 0}

        def count(name):
            def hook(module, args, kwargs=None):
                calls[name] += 1

            return hook

        loss_fn.distillation.register_forward_pre_hook(count("distillation"))
        loss_fn.distillation.teacher.module.register_forward_pre_hook(count("teacher"))
        model.vision_model.register_forward_pre_hook(count("vision"))
        teacher_before = {k: v.clone() for k, v in loss_fn.distillation.teacher.state_dict().items()}
        with (
            mock.patch.object(SelfDistillationLoss, "update_teacher") as update_teacher,
            mock.patch.object(SelfDistillationLoss, "reset_teacher") as reset_teacher,
        ):
            for step, progress in enumerate((0.0, 0.25, 0.5, 0.79)):
                output = loss_fn(model, **make_batch(device=device, seed=step), progress=progress)
                assert output.consistency_loss == 0 and output.masked_loss == 0
                assert output.consistency_loss.grad_fn is None and output.masked_loss.grad_fn is None
                optimizer.zero_grad()
                output.loss.backward()
                optimizer.step()
                loss_fn.update_teacher(model)
            assert calls == {"distillation": 0, "teacher": 0, "vision": 4}  # one encoder pass per step
            update_teacher.assert_not_called()
            reset_teacher.assert_not_called()
        for name, tensor in loss_fn.distillation.teacher.state_dict().items():
            assert torch.equal(tensor, teacher_before[name]), name
        assert all(p.grad is None for p in loss_fn.distillation.parameters())  # heads, mask token untouched

        loss_fn(model, **make_batch(device=device), progress=0.8)
        # after the switch: the student branch encodes the masked global view and local views, the teacher once
        assert calls == {"distillation": 1, "teacher": 1, "vision": 6}

    def test_teacher_reset_at_switch(self, device):
        model = make_model(device=device)
        loss_fn = make_loss(model)
        optimizer = _optimizer(model, loss_fn)
        for step, progress in enumerate((0.0, 0.4)):  # the student drifts from the teacher made at construction
            output = loss_fn(model, **make_batch(device=device, seed=step), progress=progress)
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        assert not loss_fn.distillation_started
        _assert_teacher_equals_student(loss_fn, model, equal=False)

        # eval calls past the switch (e.g. validation) neither reset nor move the teacher
        loss_fn.eval()(model, **make_batch(device=device), progress=0.9)
        assert not loss_fn.distillation_started
        _assert_teacher_equals_student(loss_fn, model, equal=False)

        loss_fn.train()
        with mock.patch.object(SelfDistillationLoss, "reset_teacher", wraps=loss_fn.distillation.reset_teacher) as spy:
            output = loss_fn(model, **make_batch(device=device, seed=5), progress=0.8)
            spy.assert_called_once()
            assert loss_fn.distillation_started and output.distillation_active
            _assert_teacher_equals_student(loss_fn, model)  # teacher == student at switch-on
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            teacher = {k: v.clone() for k, v in loss_fn.distillation.teacher.module.named_parameters()}
            loss_fn.update_teacher(model)  # EMA from now on
            momentum = loss_fn.distillation.teacher.momentum
            student = DistillationBranch(
                model.vision_model, loss_fn.distillation.global_head, loss_fn.distillation.patch_head
            )
            for name, parameter in student.named_parameters():
                expected = momentum * teacher[name] + (1 - momentum) * parameter
                torch.testing.assert_close(loss_fn.distillation.teacher.module.get_parameter(name), expected)
            loss_fn(model, **make_batch(device=device, seed=6), progress=0.9)
            spy.assert_called_once()  # reset once only

        # the switch is part of the state: a resumed run does not reset the teacher again
        other = make_model(device=device, seed=3)
        resumed, fresh = make_loss(other), make_loss(other)
        resumed.load_state_dict(loss_fn.state_dict())
        assert resumed.distillation_started
        for loss in (resumed, fresh):
            loss(other, **make_batch(device=device), progress=0.9)
        _assert_teacher_equals_student(resumed, other, equal=False)
        _assert_teacher_equals_student(fresh, other)

    def test_from_model_defaults(self):
        # a ViT-B width (768) in a one-layer tower: the schedule of B/16 is inferred from it
        vision = dict(VISION, hidden_size=768, num_attention_heads=12, num_hidden_layers=1, image_size=16)
        model = SigLip2(SigLip2Config(model_type="siglip", vision_config=vision, text_config=dict(TEXT)))
        loss_fn = SigLip2Loss.from_model(model, make_vocabulary())
        assert loss_fn.schedule == SigLip2LossSchedule(size_factor=0.25, distill_start=0.8)
        assert loss_fn.locca.decoder.image_width == 768 and len(loss_fn.locca.decoder.layers) == 1
        distillation = loss_fn.distillation
        assert distillation.local_views.num_views == 8 and distillation.mask_ratio == 0.5
        assert distillation.global_head.prototypes.out_features == 4096
        schedule = SigLip2LossSchedule(distill_start=None)
        assert SigLip2Loss.from_model(make_model(), make_vocabulary(), schedule).distillation is None

    def test_exception(self):
        model = make_model()
        loss_fn = make_loss(model)
        batch = make_batch()
        with pytest.raises(ValueCheckError, match="progress must be in"):
            loss_fn(model, **batch, progress=1.5)
        images = batch.pop("images")
        with pytest.raises(ValueCheckError, match="Pass either images"):
            loss_fn(model, **batch, progress=0.5)
        patches, grid_thw = patchify(images, 4)
        with pytest.raises(ValueCheckError, match="Pass either images"):
            loss_fn(model, **batch, images=images, patches=patches, grid_thw=grid_thw, progress=0.5)
        with pytest.raises(ValueCheckError, match="Pass either images"):
            loss_fn(model, **batch, patches=patches, progress=0.5)
        with pytest.raises(ValueCheckError, match="one caption and one LocCa target per image"):
            loss_fn(model, make_batch(3)["input_ids"], batch["locca_targets"], progress=0.5, images=images)
        with pytest.raises(ValueCheckError, match="input_ids must be"):
            loss_fn(
                model,
                input_ids=batch["input_ids"][0],
                locca_targets=batch["locca_targets"],
                images=images,
                progress=0.5,
            )
        locca = LocCaLoss(LocCaDecoder.from_config(model.config, make_vocabulary()))
        with pytest.raises(ValueError, match="no distillation module"):
            SigLip2Loss(locca)
        with pytest.raises(ValueError, match="never switches it on"):
            SigLip2Loss(locca, loss_fn.distillation, SigLip2LossSchedule(distill_start=None))
        with pytest.raises(ValueError, match="not a SigLIP 2 size"):
            SigLip2Loss.from_model(model)  # width 32: give the size factor

    def test_gradcheck(self, device):
        # student-only leaves, one per term: the teacher sees the images under stop-gradient, so gradients
        # with respect to the images would (rightly) differ from finite differences
        model = make_model(device=device, dtype=torch.float64)
        loss_fn = make_loss(model).eval()
        batch = make_batch(device=device, dtype=torch.float64)
        mask = random_patch_mask([16, 16], generator=torch.Generator().manual_seed(0)).to(device)
        views = loss_fn.distillation.local_views(batch["images"], torch.Generator().manual_seed(0))
        objective = _Objective(model, loss_fn)

        def total(logit_bias, head_bias, local_views, mask_token):
            parameters = {
                "model.logit_bias": logit_bias,
                "loss_fn.locca.decoder.head.bias": head_bias,
                "loss_fn.distillation.mask_token": mask_token,
            }
            kwargs = dict(batch, progress=0.9, local_views=local_views, mask=mask)
            return torch.func.functional_call(objective, parameters, (), kwargs)

        inputs = (
            model.logit_bias.detach().clone(),
            torch.randn_like(loss_fn.locca.decoder.head.bias),
            views,
            torch.randn_like(loss_fn.distillation.mask_token),
        )
        inputs = tuple(x.requires_grad_(True) for x in inputs)
        assert torch.autograd.gradcheck(total, inputs, fast_mode=True)

    def test_dynamo(self, device, dtype):
        # host-side steps (grid reads, LocCa layout, crops) break the graph; the result must not change.
        # aot_eager traces forward and backward like inductor without its C++ compile time on CPU.
        model = make_model(device=device, dtype=dtype)
        loss_fn = make_loss(model).eval()
        batch = make_batch(device=device, dtype=dtype)
        compiled = torch.compile(loss_fn, backend="aot_eager")
        actual, expected = compiled(model, **batch, progress=0.5), loss_fn(model, **batch, progress=0.5)
        for name, term in expected.terms().items():
            torch.testing.assert_close(actual.terms()[name], term, **tolerance(dtype))
        (grad,) = torch.autograd.grad(actual.loss, model.logit_bias)
        (expected_grad,) = torch.autograd.grad(expected.loss, model.logit_bias)
        torch.testing.assert_close(grad, expected_grad, **tolerance(dtype))


def _example(name: str, monkeypatch: pytest.MonkeyPatch):
    """Import ``examples/<name>.py``: examples/ is not a package, and the script imports its helpers by name."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


class TestSyntheticTraining:
    def test_data_and_tokenizer(self, monkeypatch):
        synthetic = _example("synthetic", monkeypatch)
        batch = synthetic.make_shapes(36, torch.Generator().manual_seed(0), distinct=True)
        assert sorted(batch.captions) == sorted(synthetic.CAPTIONS)
        assert batch.images.shape == (36, 3, 32, 32) and -1 <= batch.images.min() <= batch.images.max() <= 1
        sides = (batch.boxes[:, 2:] - batch.boxes[:, :2]) * 32
        for caption, side in zip(batch.captions, sides, strict=True):
            low, high = synthetic.SIZES[caption.split()[0]]
            assert low - 1e-4 <= side[0] < high and torch.allclose(side[0], side[1])
        tokenizer = synthetic.WordTokenizer()
        ids = tokenizer.encode(batch.captions)
        assert ids.shape == (36, 8) and [tokenizer.decode(row) for row in ids.tolist()] == batch.captions
        with pytest.raises(KeyError):
            tokenizer.ids("pink circle")

    def test_short_run_learns(self, monkeypatch):
        # a shortened version of examples/train_synthetic.py (docs/training.md has the full run): ~40-60 s
        synthetic = _example("synthetic", monkeypatch)
        result = synthetic.train(synthetic.TrainConfig(steps=250, learning_rate=3e-3, log_every=0))
        assert result.loss_fn.distillation_started
        for name in LOSS_TERMS:
            # distillation terms are compared over their own 50 steps, from the switch on
            first, last = synthetic.window_means(result.history, name, window=15)
            assert last < 0.95 * first, (name, first, last)
        evaluation = synthetic.evaluate(result, num_images=360)
        assert evaluation.num_captions == 36
        assert evaluation.retrieval_accuracy > 10 * evaluation.chance, evaluation

    def test_script(self, monkeypatch, tmp_path, capsys):
        script = _example("train_synthetic", monkeypatch)
        assert script.main(["--steps", "20", "--out", str(tmp_path), "--eval-images", "36"]) == 0
        printed = capsys.readouterr().out
        assert "zero-shot retrieval" in printed and "chance" in printed
        header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
        assert header == ["step", "progress", "loss", *LOSS_TERMS, "seconds"]
        assert (tmp_path / "summary.json").exists()
        pytest.importorskip("matplotlib")
        assert (tmp_path / "training_curves.png").stat().st_size > 0
