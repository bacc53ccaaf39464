"""Tests of kornia_siglip2.training.data: manifests, the token-budget sampler, the packed collate."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.images import load_image
from kornia_siglip2.preprocess import NaFlexImagePreprocessor, naflex_target_size
from kornia_siglip2.training.data import (
    ByteTokenizer,
    ImageTextDataset,
    TokenBudgetBatchSampler,
    collate_packed,
    drop_tokens,
    read_manifest,
)
from kornia_siglip2.training.synthetic import photo_like_sizes, write_synthetic_dataset

CHOICES = (64, 144, 256)


def _tokens(size, max_num_patches, patch_size=16):
    # independent of naflex_num_tokens: the resized size from the preprocessing module, in patches
    height, width = naflex_target_size(*size, patch_size, max_num_patches)
    return height * width // patch_size**2


@pytest.fixture(scope="module")
def sizes():
    return photo_like_sizes(503, seed=1)  # a prime count: uneven tails for 2 and 3 ranks


class TestTokenBudgetBatchSampler:
    @pytest.mark.parametrize("world_size", [1, 2, 3])
    @pytest.mark.parametrize("budget", [1024, 4096])
    def test_exactly_once_and_budget(self, sizes, world_size, budget):
        samplers = [
            TokenBudgetBatchSampler(sizes, budget, 16, CHOICES, num_replicas=world_size, rank=rank, seed=7)
            for rank in range(world_size)
        ]
        seen = Counter()
        lengths = []
        for sampler in samplers:
            sampler.set_epoch(3)
            batches = list(sampler)
            lengths.append(len(batches))
            assert len(batches) == len(sampler)
            for batch in batches:
                assert batch, "empty batch"
                assert sum(_tokens(sizes[index], patches) for index, patches in batch) <= budget
                assert all(patches in CHOICES for _, patches in batch)
                seen.update(index for index, _ in batch)
        assert seen == Counter(range(len(sizes)))  # every image exactly once across the ranks
        assert len(set(lengths)) == 1  # every rank takes the same number of steps

    def test_deterministic_per_epoch(self, sizes):
        first = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=2, rank=1, seed=3)
        second = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=2, rank=1, seed=3)
        first.set_epoch(5)
        second.set_epoch(5)
        assert list(first) == list(second)
        second.set_epoch(6)
        assert list(first) != list(second)
        other_seed = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=2, rank=1, seed=4)
        other_seed.set_epoch(5)
        assert list(first) != list(other_seed)

    def test_no_shuffle_ignores_the_seed(self, sizes):
        plans = [TokenBudgetBatchSampler(sizes, 4096, 16, 256, shuffle=False, seed=seed).plan() for seed in (0, 1)]
        assert plans[0] == plans[1]

    def test_start_batch_resumes(self, sizes):
        sampler = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=3, rank=2, seed=0)
        sampler.set_epoch(1)
        full = list(sampler)
        sampler.set_epoch(1, start_batch=4)
        assert list(sampler) == full[4:]
        assert len(sampler) == len(full) - 4
        restored = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=3, rank=2, seed=0)
        restored.load_state_dict(sampler.state_dict())
        assert list(restored) == full[4:]

    @pytest.mark.parametrize("world_size", [1, 2, 3])
    def test_fill_on_photo_like_sizes(self, world_size):
        """Mean fill of the budget on a web-like size mix, all batches of the epoch counted (tails included)."""
        sizes = photo_like_sizes(2000, seed=0)
        sampler = TokenBudgetBatchSampler(sizes, 4096, 16, CHOICES, num_replicas=world_size, seed=0)
        plan = sampler.plan()
        fill = sum(_tokens(sizes[i], m) for batch in plan for i, m in batch) / (len(plan) * 4096)
        assert fill == pytest.approx(sampler.fill())
        assert fill >= 0.95, f"mean fill {fill:.4f}"

    def test_exception(self, sizes):
        with pytest.raises(ValueCheckError, match="exceeds token_budget"):
            TokenBudgetBatchSampler(sizes, 100, 16, 256)
        with pytest.raises(ValueCheckError, match="rank 2 not in"):
            TokenBudgetBatchSampler(sizes, 1000, 16, 256, num_replicas=2, rank=2)
        with pytest.raises(ValueCheckError, match="cannot give each of 3 ranks"):
            TokenBudgetBatchSampler(sizes[:2], 1000, 16, 256, num_replicas=3)
        with pytest.raises(ValueCheckError, match="seed"):
            TokenBudgetBatchSampler(sizes, 1000, 16, 256, seed=1).load_state_dict(
                {"epoch": 0, "start_batch": 0, "seed": 2}
            )


class TestManifest:
    def test_jsonl_csv_folder(self, tmp_path):
        manifest = write_synthetic_dataset(tmp_path / "data", 4, seed=0)
        records = read_manifest(manifest)
        assert len(records) == 4 and all(record.image.is_file() for record in records)
        assert records[0].size == load_image(records[0].image).shape[1:]
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        csv_path = tmp_path / "data" / "manifest.csv"
        csv_path.write_text("image,caption\n" + "".join(f"{row['image']},{row['caption']}\n" for row in rows))
        assert [(r.image, r.caption) for r in read_manifest(csv_path)] == [(r.image, r.caption) for r in records]
        for row in rows:
            (tmp_path / "data" / row["image"]).with_suffix(".txt").write_text(row["caption"] + "\n")
        folder = read_manifest(tmp_path / "data")
        assert [(r.image, r.caption) for r in folder] == [(r.image, r.caption) for r in records]

    def test_exception(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="No image folder or manifest"):
            read_manifest(tmp_path / "missing.jsonl")
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"image": "a.png"}\n')
        with pytest.raises(ValueCheckError, match="line 1 has no 'caption'"):
            read_manifest(bad)
        (tmp_path / "x.txt").write_text("")
        with pytest.raises(ValueCheckError, match=r"must be \.jsonl or \.csv"):
            read_manifest(tmp_path / "x.txt")
        folder = tmp_path / "images"
        folder.mkdir()
        write_synthetic_dataset(folder, 1)
        with pytest.raises(FileNotFoundError, match="has no caption file"):
            read_manifest(folder)


class TestRegions:
    def test_jsonl_regions_reach_the_batch(self, tmp_path):
        manifest = tmp_path / "m.jsonl"
        write_synthetic_dataset(tmp_path, 2, seed=0)
        rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
        rows[1].pop("regions")  # an image without regions
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
        records = read_manifest(manifest)
        assert records[1].regions == ()
        assert [region.text for region in records[0].regions] == [r["text"] for r in rows[0]["regions"]]
        assert records[0].regions[1].box == (0.0, 0.0, 1.0, 1.0)
        tokenizer = ByteTokenizer(12)
        dataset = ImageTextDataset(records, tokenizer, patch_size=8, max_num_patches=16)
        batch = collate_packed([dataset[0], dataset[1]])
        # ids up to EOS: the caption's UTF-8 bytes + 1, truncated to L - 1 = 11 by the tokenizer
        assert batch.caption_ids[0] == [byte + 1 for byte in rows[0]["caption"].encode()[:11]]
        box, text = batch.regions[0][0]
        assert box.tolist() == rows[0]["regions"][0]["box"]
        assert text == [byte + 1 for byte in rows[0]["regions"][0]["text"].encode()[:11]]
        assert batch.regions[1] == []

    def test_synthetic_region_is_the_rectangle(self, tmp_path):
        records = read_manifest(write_synthetic_dataset(tmp_path, 3, seed=1))
        for record in records:
            image = load_image(record.image)
            x0, y0, x1, y1 = record.regions[0].box
            height, width = image.shape[1:]
            inside = image[:, round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)]
            colour = record.regions[0].text.split()[1]  # "a <colour> rectangle"
            assert record.caption.startswith(f"a {colour} rectangle")
            assert (inside == inside[:, :1, :1]).all()  # one colour inside the box
            assert not (image == inside[:, :1, :1]).all()  # and another outside

    @pytest.mark.parametrize(
        ("regions", "match"),
        [
            ('{"box": [0, 0, 1, 1]}', "needs a 'box' and a non-empty 'text'"),
            ('{"box": [0, 0, 1], "text": "x"}', "must be 4 numbers"),
            ('{"box": [0.5, 0, 0.2, 1], "text": "x"}', "must be normalized xyxy"),
            ('{"box": [0, 0, 1, 1.5], "text": "x"}', "must be normalized xyxy"),
        ],
    )
    def test_exception(self, tmp_path, regions, match):
        manifest = tmp_path / "m.jsonl"
        manifest.write_text('{"image": "a.png", "caption": "c", "regions": [' + regions + "]}\n")
        with pytest.raises(ValueCheckError, match=match):
            read_manifest(manifest)


@pytest.fixture
def twelve_images(tmp_path) -> ImageTextDataset:
    """12 generated image-text pairs, patch 8, at most 64 patches per image."""
    records = read_manifest(write_synthetic_dataset(tmp_path, 12, seed=2))
    return ImageTextDataset(records, ByteTokenizer(16), patch_size=8, max_num_patches=64)


def test_loader_packs_without_padding(twelve_images):
    """Workers preprocess; a batch is the images' patches back to back, equal to preprocessing each alone."""
    dataset = twelve_images
    records = dataset.records
    sampler = TokenBudgetBatchSampler(dataset.sizes(), 160, 8, (16, 64), num_replicas=1, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_packed, num_workers=1)
    seen = []
    for batch, plan in zip(loader, sampler, strict=True):
        grid = batch.images.grid_thw
        assert batch.num_tokens == int(grid.prod(-1).sum()) <= 160  # zero padding tokens
        assert batch.indices.tolist() == [index for index, _ in plan]
        offset = 0
        for row, (index, max_num_patches) in enumerate(plan):
            expected = NaFlexImagePreprocessor(8, max_num_patches)(load_image(records[index].image)[None])
            count = expected.patches.shape[0]
            torch.testing.assert_close(batch.images.patches[offset : offset + count], expected.patches)
            assert grid[row].tolist() == expected.grid_thw[0].tolist()
            assert batch.input_ids[row].tolist() == ByteTokenizer(16)([records[index].caption])[0].tolist()
            offset += count
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(12))


def _kept(tokens, token_drop):
    # independent of num_kept_tokens: drop the floor of the fraction, keep at least one
    return max(1, tokens - int(tokens * token_drop))


class TestTokenDrop:
    """NaViT token dropping: the budget counts kept tokens; each image draws its own subset."""

    @pytest.mark.parametrize("world_size", [1, 2, 3])
    def test_exactly_once_and_budget_in_kept_tokens(self, sizes, world_size):
        budget, rate = 1024, 0.5
        seen = Counter()
        lengths = []
        for rank in range(world_size):
            sampler = TokenBudgetBatchSampler(
                sizes, budget, 16, CHOICES, num_replicas=world_size, rank=rank, seed=7, token_drop=rate
            )
            sampler.set_epoch(2)
            batches = list(sampler)
            lengths.append(len(batches))
            for batch in batches:
                assert sum(_kept(_tokens(sizes[index], patches), rate) for index, patches in batch) <= budget
                seen.update(index for index, _ in batch)
        assert seen == Counter(range(len(sizes)))
        assert len(set(lengths)) == 1

    def test_more_images_per_batch_and_full_budget(self):
        sizes = photo_like_sizes(2000, seed=0)
        plain = TokenBudgetBatchSampler(sizes, 4096, 16, CHOICES, seed=0)
        dropping = TokenBudgetBatchSampler(sizes, 4096, 16, CHOICES, seed=0, token_drop=0.5)
        plan = dropping.plan()
        fill = sum(_kept(_tokens(sizes[i], m), 0.5) for batch in plan for i, m in batch) / (len(plan) * 4096)
        assert fill == pytest.approx(dropping.fill()) and fill >= 0.95, fill
        assert len(plan) <= 0.55 * len(plain.plan())  # about twice the images per batch

    def test_rate_zero_is_off(self, sizes):
        assert TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, seed=1, token_drop=0.0).plan() == (
            TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, seed=1).plan()
        )
        batch = collate_packed([_item(0, 3, 4), _item(1, 2, 2)])
        assert drop_tokens(batch, 0.0, epoch=0, seed=0) is batch

    def test_resume_with_dropping(self, sizes):
        sampler = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=2, rank=1, seed=0, token_drop=0.3)
        sampler.set_epoch(4)
        full = list(sampler)
        restored = TokenBudgetBatchSampler(sizes, 2048, 16, CHOICES, num_replicas=2, rank=1, seed=0, token_drop=0.3)
        restored.set_epoch(4, start_batch=3)
        assert list(restored) == full[3:]

    def test_subset_per_image_whatever_the_batch(self):
        """An image keeps the same patches in any batch, position or rank split; other epochs draw anew."""
        items = [_item(index, h, w) for index, (h, w) in enumerate([(3, 4), (1, 1), (5, 2), (2, 7)])]

        def kept_rows(groups, epoch=1, seed=5):
            rows = {}
            for group in groups:
                dropped = drop_tokens(collate_packed([items[i] for i in group]), 0.4, epoch=epoch, seed=seed)
                images = dropped.images
                counts = [_kept(h * w, 0.4) for _, h, w in images.grid_thw.tolist()]
                assert images.patches.shape[0] == sum(counts) == int(images.keep_mask.sum())
                for index, patches in zip(dropped.indices.tolist(), images.patches.split(counts), strict=True):
                    rows[index] = patches
            return rows

        one = kept_rows([[0, 1, 2, 3]])
        other = kept_rows([[3, 1], [2], [0]])
        assert all(torch.equal(one[index], other[index]) for index in range(4))
        # the kept rows are rows of the image's own patches, in grid order
        for index, item in enumerate(items):
            positions = [int((item["patches"] == row).all(-1).nonzero()) for row in one[index]]
            assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert one[1].shape[0] == 1  # a one-patch image keeps its patch
        assert not all(torch.equal(one[index], kept_rows([[0, 1, 2, 3]], epoch=2)[index]) for index in (0, 2, 3))
        assert not all(torch.equal(one[index], kept_rows([[0, 1, 2, 3]], seed=6)[index]) for index in (0, 2, 3))

    def test_exception(self, sizes):
        with pytest.raises(ValueCheckError, match=r"token_drop must be in \[0, 1\)"):
            TokenBudgetBatchSampler(sizes, 1000, 16, 256, token_drop=1.0)
        with pytest.raises(ValueCheckError, match=r"exceeds token_budget 100 \(keeping 128\)"):
            TokenBudgetBatchSampler(sizes, 100, 16, 256, token_drop=0.5)
        TokenBudgetBatchSampler(sizes, 128, 16, 256, token_drop=0.5)  # 128 kept tokens fit
        batch = collate_packed([_item(0, 2, 2)])
        with pytest.raises(ValueCheckError, match=r"token_drop must be in \[0, 1\)"):
            drop_tokens(batch, -0.1, epoch=0, seed=0)
        with pytest.raises(ValueCheckError, match="already dropped"):
            drop_tokens(drop_tokens(batch, 0.5, epoch=0, seed=0), 0.5, epoch=0, seed=0)


def _item(index, height, width):
    patches = torch.arange(height * width * 12, dtype=torch.float32).reshape(-1, 12) + 1000 * index
    return {
        "patches": patches,
        "grid_thw": torch.tensor([[1, height, width]]),
        "input_ids": torch.zeros(4, dtype=torch.long),
        "index": index,
    }


def test_loader_with_token_drop_fits_the_budget(twelve_images):
    """The loader's batches after drop_tokens: the sampler's kept count, within the budget, every image once."""
    dataset = twelve_images
    sampler = TokenBudgetBatchSampler(dataset.sizes(), 96, 8, (16, 64), seed=0, token_drop=0.5)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_packed, num_workers=0)
    seen = []
    for batch, plan in zip(loader, sampler, strict=True):
        dropped = drop_tokens(batch, 0.5, epoch=0, seed=0)
        assert dropped.num_tokens == sum(sampler.num_tokens(item) for item in plan) <= 96
        full = batch.images.patches
        assert torch.equal(dropped.images.patches, full[dropped.images.keep_mask])
        seen += dropped.indices.tolist()
    assert sorted(seen) == list(range(12))
