"""Tests of kornia_siglip2.training.objective: per-image random inputs that do not depend on the batch split."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import tiny_siglip2_config

from kornia_siglip2 import SigLip2, SigLip2Config
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses.siglip2 import SigLip2Loss, SigLip2LossSchedule
from kornia_siglip2.training.data import ByteTokenizer, ImageTextDataset, collate_packed, read_manifest
from kornia_siglip2.training.objective import (
    SigLip2Objective,
    distillation_inputs,
    locca_targets,
    sample_generator,
)
from kornia_siglip2.training.synthetic import write_synthetic_dataset

VOCABULARY = LocCaVocabulary(258, num_bins=16, pad_token_id=0, eos_token_id=257)
TINY = SigLip2Config.from_hf_dict(tiny_siglip2_config())


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("objective")
    manifest = write_synthetic_dataset(root, 6, seed=3, min_side=12, max_side=40)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2].pop("regions")  # one image without regions
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = ImageTextDataset(read_manifest(manifest), ByteTokenizer(12), patch_size=8, max_num_patches=16)
    return [dataset[index] for index in range(len(dataset))]


@pytest.fixture(scope="module")
def loss_fn() -> SigLip2Loss:
    model = SigLip2(TINY)
    return SigLip2Loss.from_model(
        model,
        VOCABULARY,
        SigLip2LossSchedule(size_factor=0.25),
        distillation_options=dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=32, num_local_views=3),
    )


def _split(items: list[dict], order: list[int], cut: int):
    """The batch of ``items`` and the same images as two batches in another order."""
    whole = collate_packed(items)
    shuffled = [items[index] for index in order]
    return whole, collate_packed(shuffled[:cut]), collate_packed(shuffled[cut:])


def test_sample_generator_streams():
    draws = {
        key: torch.rand(4, generator=sample_generator(*key)).tolist()
        for key in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0)]
    }
    assert len({tuple(value) for value in draws.values()}) == len(draws)  # every coordinate matters
    assert torch.rand(4, generator=sample_generator(0, 0, 0, 0)).tolist() == draws[(0, 0, 0, 0)]


def test_locca_targets_do_not_depend_on_the_split(items):
    whole, first, second = _split(items, [4, 0, 5, 2, 1, 3], cut=2)
    expected = locca_targets(whole, VOCABULARY, 12, epoch=1, seed=7)
    parts = [locca_targets(part, VOCABULARY, 12, epoch=1, seed=7) for part in (first, second)]
    position = {index: row for row, index in enumerate(whole.indices.tolist())}
    order = [position[index] for part in (first, second) for index in part.indices.tolist()]
    for name in ("input_ids", "labels", "loss_mask", "causal"):
        joined = torch.cat([getattr(part, name) for part in parts])
        assert torch.equal(joined, getattr(expected, name)[order]), name
    other_epoch = locca_targets(whole, VOCABULARY, 12, epoch=2, seed=7)
    assert not all(torch.equal(getattr(other_epoch, name), getattr(expected, name)) for name in ("input_ids", "labels"))


def test_locca_targets_regions_and_fallback(items):
    batch = collate_packed(items)
    targets = locca_targets(batch, VOCABULARY, 12, epoch=0, seed=0)
    for row, regions in enumerate(batch.regions):
        caption = batch.caption_ids[row]
        scored = targets.labels[row, 0][targets.loss_mask[row, 0]].tolist()
        assert scored == [*caption[:11], 257]  # the caption and EOS
        if not regions:  # captioning only: the two region tasks score nothing
            assert not targets.loss_mask[row, 1:].any()
            continue
        box_tokens = targets.labels[row, 1][targets.loss_mask[row, 1]].tolist()
        candidates = [VOCABULARY.boxes_to_tokens(box.reshape(1, 4))[0].tolist() for box, _ in regions]
        assert box_tokens in candidates  # the referring expression's box is one of the image's regions
        text = regions[candidates.index(box_tokens)][1]
        assert targets.labels[row, 2][targets.loss_mask[row, 2]].tolist() == [*text[:7], 257]


def test_locca_targets_exception(items):
    batch = collate_packed(items)
    batch.caption_ids = []
    with pytest.raises(ValueCheckError, match="6 images but 0 caption_ids"):
        locca_targets(batch, VOCABULARY, 12, epoch=0, seed=0)


def test_distillation_inputs_do_not_depend_on_the_split(items, loss_fn):
    whole, first, second = _split(items, [3, 5, 0, 1, 4, 2], cut=3)
    distillation = loss_fn.distillation

    def inputs(batch, epoch=0):
        return distillation_inputs(
            distillation, batch.images.patches, batch.images.grid_thw, batch.indices, epoch=epoch, seed=5
        )

    views, mask = inputs(whole)
    seqlens = whole.images.grid_thw.prod(-1).tolist()
    num_views = distillation.local_views.num_views
    assert views.shape[0] == num_views * len(items)
    # exactly floor(n / 2) masked patches per image (TIPS ratio 0.5)
    assert [int(chunk.sum()) for chunk in mask.split(seqlens)] == [n // 2 for n in seqlens]
    views_of = dict(zip(whole.indices.tolist(), views.split(num_views), strict=True))
    mask_of = dict(zip(whole.indices.tolist(), mask.split(seqlens), strict=True))
    for part in (first, second):
        part_views, part_mask = inputs(part)
        part_seqlens = part.images.grid_thw.prod(-1).tolist()
        for index, image_views, image_mask in zip(
            part.indices.tolist(), part_views.split(num_views), part_mask.split(part_seqlens), strict=True
        ):
            assert torch.equal(image_views, views_of[index]) and torch.equal(image_mask, mask_of[index])
    other_views, other_mask = inputs(whole, epoch=1)
    assert not torch.equal(other_views, views) and not torch.equal(other_mask, mask)


def test_start_distillation_copies_once():
    model = SigLip2(TINY)
    loss = SigLip2Loss.from_model(
        model,
        VOCABULARY,
        SigLip2LossSchedule(size_factor=0.25),
        distillation_options=dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=32),
    )
    objective = SigLip2Objective(model, loss, VOCABULARY)
    objective.update_teacher()  # before the switch: nothing happens
    teacher = loss.distillation.teacher.module
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight.add_(1.0)
    objective.start_distillation()
    assert loss.distillation_started
    assert torch.equal(
        teacher.vision.embeddings.patch_embedding.weight, model.vision_model.embeddings.patch_embedding.weight
    )
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight.add_(1.0)
    objective.start_distillation()  # once only: the teacher is not reset again
    difference = model.vision_model.embeddings.patch_embedding.weight - teacher.vision.embeddings.patch_embedding.weight
    assert torch.allclose(difference, torch.ones(()))
    assert loss.state_dict()["_extra_state"].item() is True
