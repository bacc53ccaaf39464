"""The token-budget stream over tar shards: exactly once per epoch, budget fill, bad samples, resume, re-deal."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.training.data import ByteTokenizer, naflex_num_tokens
from kornia_siglip2.training.shards import parse_sources, write_shards
from kornia_siglip2.training.stream import Cursor, ShardStream, StreamFeed, StreamSpec, reader_shards
from kornia_siglip2.training.synthetic import photo_like_sizes, write_synthetic_dataset

BUDGET, PATCH, CHOICES = 48, 8, (8, 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    manifest = write_synthetic_dataset(root / "images", 40, seed=1, min_side=12, max_side=40)
    write_shards(manifest, str(root / "s-{:03d}.tar"), max_count=5)  # 8 shards
    return root


def _spec(root: Path, **overrides) -> StreamSpec:
    options = dict(token_budget=BUDGET, patch_size=PATCH, max_num_patches=CHOICES, seed=4, shuffle_buffer=6)
    options.update(overrides)
    return StreamSpec(tuple(parse_sources(str(root / "s-{000..007}.tar"))), **options)


def _epoch(feed: StreamFeed) -> list[dict]:
    items = []
    while (item := feed.next()) is not None:
        items.append(item)
    return items


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_per_epoch_across_ranks_and_workers(root, world_size):
    """2 DataLoader workers per rank: the worker processes' order is the in-process emulation's, every key once."""
    spec = _spec(root)
    keys = []
    for rank in range(world_size):
        stream = ShardStream(spec, ByteTokenizer(12), rank, world_size, num_workers=2)
        items = _epoch(StreamFeed(stream, num_workers=2))
        emulated = _epoch(StreamFeed(ShardStream(spec, ByteTokenizer(12), rank, world_size, num_workers=2)))
        assert [item["keys"] for item in items] == [item["keys"] for item in emulated]
        assert sorted({item["role"] for item in items}) == [0, 1]
        for item in items:
            # the packed batch: no padding, within the budget, the tokens the packer counted from the json sizes
            batch = item["batch"]
            assert batch.num_tokens == item["tokens"] <= BUDGET
            assert batch.images.patches.shape[0] == int(batch.images.grid_thw.prod(-1).sum())
            keys += item["keys"]
    counts = collections.Counter(keys)
    assert len(counts) == 40 and set(counts.values()) == {1}
    # the next epoch: another shard order and packing, again every key once
    orders = [reader_shards(spec, epoch, 0, 2) for epoch in (0, 1)]
    assert orders[0] != orders[1]


def test_fill_on_a_realistic_size_mix(tmp_path):
    """Photo-like sizes, tokens counted from each sample's json (the images are never decoded here): >= 95 % fill."""
    sizes = photo_like_sizes(3000, seed=0)
    pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(pixel, format="PNG")
    for shard in range(3):
        with tarfile.open(tmp_path / f"p-{shard}.tar", "w") as archive:
            for number in range(1000):
                height, width = sizes[shard * 1000 + number]
                files = {
                    "png": pixel.getvalue(),
                    "txt": b"a photo",
                    "json": json.dumps({"width": width, "height": height}).encode(),
                }
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{number:06d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    spec = StreamSpec(
        tuple(parse_sources(str(tmp_path / "p-{0..2}.tar"))),
        token_budget=8192,
        patch_size=16,
        max_num_patches=(256, 576),
        shuffle_buffer=500,
    )
    batches, counted = [], 0
    for reader in range(3):
        for batch in Cursor(spec, 0, reader, 3, spec.urls).batches():
            batches.append(batch)
            counted += len(batch)
            # the packer's count is NaFlex's token count of each json size (an independent formula call)
            assert all(item.tokens == naflex_num_tokens(*item.size, 16, item.budget) for item in batch)
    assert counted == 3000
    fill = sum(item.tokens for batch in batches for item in batch) / (len(batches) * 8192)
    print(f"fill {fill:.4f} over {len(batches)} batches")
    assert fill >= 0.95, fill


def _bad_shard(path: Path, good: Path) -> None:
    """A shard of good samples taken from ``good`` plus one bad sample of every kind."""
    with tarfile.open(good) as source:
        members = [(member.name, source.extractfile(member).read()) for member in source if member.isfile()]
    bad = [
        ("b1.png", b"not an image"),
        ("b1.txt", b"undecodable"),
        ("b2.txt", b"no image"),
        ("b3.png", members[0][1]),
        ("b4.png", members[0][1]),
        ("b4.txt", b"   "),
        ("b5.png", members[0][1]),
        ("b5.txt", b"bad json"),
        ("b5.json", b"{not json"),
        ("b6.png", members[0][1]),
        ("b6.txt", b"header lies"),
        ("b6.json", json.dumps({"width": 999, "height": 999}).encode()),
    ]
    with tarfile.open(path, "w") as archive:
        for name, data in [*members, *bad]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_named(root, tmp_path, capfd):
    _bad_shard(tmp_path / "bad.tar", root / "s-000.tar")
    spec = StreamSpec(
        tuple(parse_sources(str(tmp_path / "bad.tar"))), token_budget=BUDGET, patch_size=PATCH, max_num_patches=CHOICES
    )
    feed = StreamFeed(ShardStream(spec, ByteTokenizer(12)))
    keys = [key for item in _epoch(feed) for key in item["keys"]]
    assert sorted(key.rsplit("/", 1)[1] for key in keys) == [f"{number:09d}" for number in range(5)]
    assert feed.totals == {
        "read": 11,
        "no_image": 1,
        "no_caption": 1,
        "empty_caption": 1,
        "bad_json": 1,
        "undecodable": 1,
        "size_mismatch": 1,
        "bad_shard": 0,
    }
    err = capfd.readouterr().err
    assert f"skipped {tmp_path / 'bad.tar'} sample b1.png (undecodable" in err
    assert "sample b3 (no caption)" in err and "sample b6 (size mismatch: json says 999x999" in err


def test_truncated_shard_is_skipped(root, tmp_path):
    (tmp_path / "cut.tar").write_bytes((root / "s-001.tar").read_bytes()[:5000])
    spec = StreamSpec(
        tuple(parse_sources(f"{root / 's-000.tar'}::{tmp_path / 'cut.tar'}")),
        token_budget=BUDGET,
        patch_size=PATCH,
        max_num_patches=CHOICES,
    )
    feed = StreamFeed(ShardStream(spec, ByteTokenizer(12)))
    keys = [key for item in _epoch(feed) for key in item["keys"]]
    assert len(keys) == 5 + 1 and feed.totals["bad_shard"] == 1  # the cut shard's first sample survives


def _tensors(item: dict) -> tuple:
    batch = item["batch"]
    return item["keys"], batch.images.patches, batch.images.grid_thw, batch.input_ids, batch.indices


@pytest.mark.parametrize("stop", [1, 3, 5])
def test_resume_mid_epoch_is_bit_exact(root, stop):
    """Two roles (workers emulated in process): after ``stop`` batches, a new feed from the state continues alike."""
    spec = _spec(root)
    reference = _epoch(StreamFeed(ShardStream(spec, ByteTokenizer(12), 0, 1, num_workers=2)))
    feed = StreamFeed(ShardStream(spec, ByteTokenizer(12), 0, 1, num_workers=2))
    for _ in range(stop):
        feed.next()
    state = json.loads(json.dumps(feed.state_dict()))  # what a checkpoint holds
    resumed = StreamFeed(ShardStream(spec, ByteTokenizer(12), 0, 1, num_workers=2))
    assert resumed.load_state_dict([state]) is False
    rest = _epoch(resumed)
    assert len(rest) == len(reference) - stop
    for got, expected in zip(rest, reference[stop:], strict=True):
        for a, b in zip(_tensors(got), _tensors(expected), strict=True):
            assert a == b if isinstance(a, list) else torch.equal(a, b)


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1), (2, 1)])
def test_world_size_change_redeals_the_epoch(root, before, after):
    """Stopped mid-epoch on ``before`` ranks, resumed on ``after``: every key of the epoch once; then a new split."""
    spec = _spec(root)
    tokenizer = ByteTokenizer(12)
    feeds = [StreamFeed(ShardStream(spec, tokenizer, rank, before, num_workers=2)) for rank in range(before)]
    seen = []
    for feed in feeds:
        for _ in range(2):
            seen += feed.next()["keys"]
    states = [json.loads(json.dumps(feed.state_dict())) for feed in feeds]
    resumed = [StreamFeed(ShardStream(spec, tokenizer, rank, after, num_workers=2)) for rank in range(after)]
    assert all(feed.load_state_dict(states) for feed in resumed)
    for feed in resumed:
        seen += [key for item in _epoch(feed) for key in item["keys"]]
    counts = collections.Counter(seen)
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert sum(feed.totals["read"] for feed in resumed) == 40  # the counts moved to rank 0
    for feed in resumed:  # the next epoch is split for the new world size
        feed.end_epoch()
    assert sorted(key for feed in resumed for item in _epoch(feed) for key in item["keys"]) == sorted(counts)


def test_resampled_mixture_follows_the_weights(root):
    sources = f"{root / 's-{000..001}.tar'}::{root / 's-{002..007}.tar'}"
    spec = StreamSpec(
        tuple(parse_sources(sources, "3::1")),
        token_budget=BUDGET,
        patch_size=PATCH,
        max_num_patches=CHOICES,
        resampled=True,
        shuffle_buffer=2,
    )
    cursor = Cursor(spec, 0, 0, 1, spec.urls)
    shards = collections.Counter()
    for batch, _ in zip(cursor.batches(), range(400), strict=False):  # endless: taken until enough
        shards.update(item.shard for item in batch)
    first = sum(count for shard, count in shards.items() if shard < 2) / sum(shards.values())
    assert 0.65 < first < 0.85  # weight 3 of 4
    assert len(shards) == 8


def test_exception(root):
    with pytest.raises(ValueCheckError, match="cannot feed 3 ranks x 3 workers = 9 readers"):
        ShardStream(_spec(root), ByteTokenizer(12), 0, 3, num_workers=3)
    with pytest.raises(ValueCheckError, match="Source weights need resampling"):
        StreamSpec(tuple(parse_sources("a.tar::b.tar", "1::2")), token_budget=1000)
    with pytest.raises(ValueCheckError, match="exceeds token_budget"):
        _spec(root, max_num_patches=(64,))
