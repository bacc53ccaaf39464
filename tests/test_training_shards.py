"""Tar shards: brace patterns, sources, the writer, the reader from a byte offset, fsspec URLs."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.training.data import read_manifest
from kornia_siglip2.training.shards import (
    expand_braces,
    is_shard_data,
    iter_samples,
    main,
    parse_sources,
    read_sample,
    write_shards,
)
from kornia_siglip2.training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("shards")
    manifest = write_synthetic_dataset(root / "images", 11, seed=2, min_side=12, max_side=40)
    return manifest, write_shards(manifest, str(root / "s-{:04d}.tar"), max_count=4)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a.tar", ["a.tar"]),
        ("s-{008..011}.tar", ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]),
        ("s-{8..10}.tar", ["s-8.tar", "s-9.tar", "s-10.tar"]),
        ("{x,y}/{0..1}.tar", ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]),
        ("s3://b/{000000..000001}.tar", ["s3://b/000000.tar", "s3://b/000001.tar"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


def test_sources_and_weights():
    sources = parse_sources("a-{0..2}.tar::b.tar", "0.75::0.25")
    assert [(len(source.urls), source.weight) for source in sources] == [(3, 0.75), (1, 0.25)]
    assert [source.weight for source in parse_sources("a.tar::b.tar")] == [1.0, 1.0]
    assert is_shard_data("a.tar::b.tar") and is_shard_data("http://host/x-{0..1}.tar")
    assert not is_shard_data("data/manifest.jsonl") and not is_shard_data("data/images")


@pytest.mark.parametrize(
    ("data", "weights", "match"),
    [
        ("a.tar::b.tar", "1", "gives 1 weights for 2 sources"),
        ("a.tar::b.tar", "1::0", "must be positive"),
        ("a.tar::", None, "empty source"),
        ("s-{3..1}.tar", None, "must not decrease"),
    ],
)
def test_sources_exception(data, weights, match):
    with pytest.raises(ValueCheckError, match=match):
        parse_sources(data, weights)


def test_writer_round_trip(shards):
    manifest, paths = shards
    assert [path.name for path in paths] == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    records = read_manifest(manifest)
    samples = [sample for path in paths for sample in iter_samples(str(path))]
    assert [sample.key for sample in samples] == [f"{number:09d}" for number in range(11)]
    for record, sample in zip(records, samples, strict=True):
        assert set(sample.files) == {"png", "txt", "json"}
        assert sample.files["png"] == record.image.read_bytes()
        assert sample.files["txt"].decode() == record.caption
        meta = json.loads(sample.files["json"])
        with Image.open(record.image) as image:  # the size from the file itself, not from the writer's source
            assert (meta["height"], meta["width"]) == (image.height, image.width)
        assert [(tuple(region["box"]), region["text"]) for region in meta["regions"]] == [
            (region.box, region.text) for region in record.regions
        ]


def test_read_from_offset_and_again_by_members(shards):
    _, paths = shards
    samples = list(iter_samples(str(paths[0])))
    assert samples[0].offset == 0 and all(a.next_offset == b.offset for a, b in itertools.pairwise(samples))
    # a resumed reader starts at a sample's header and reads the same samples after it
    tail = list(iter_samples(str(paths[0]), samples[1].next_offset))
    assert [(s.key, s.files, s.offset) for s in tail] == [(s.key, s.files, s.offset) for s in samples[2:]]
    again = read_sample(str(paths[0]), samples[3].key, samples[3].members)
    assert again.files == samples[3].files


def test_fsspec_urls(shards):
    fsspec = pytest.importorskip("fsspec")
    _, paths = shards
    local = [(s.key, s.files) for s in iter_samples(str(paths[1]))]
    assert [(s.key, s.files) for s in iter_samples(f"file://{paths[1]}")] == local
    with fsspec.open("memory://bucket/s-0001.tar", "wb") as handle:
        handle.write(paths[1].read_bytes())
    remote = list(iter_samples("memory://bucket/s-0001.tar"))
    assert [(s.key, s.files) for s in remote] == local
    assert [(s.key, s.files) for s in iter_samples("memory://bucket/s-0001.tar", remote[1].offset)] == local[1:]


def test_grouping_by_key(tmp_path):
    """Members group by the path up to the first dot of the file name, in tar order (the webdataset convention)."""
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in [("a/k1.jpg", b"1"), ("a/k1.txt", b"t"), ("a/k1.meta.json", b"{}"), ("k2.TXT", b"u")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(str(path)))
    assert [(s.key, sorted(s.files)) for s in samples] == [("a/k1", ["jpg", "meta.json", "txt"]), ("k2", ["txt"])]


def test_cli_write(tmp_path, capsys, shards):
    manifest, _ = shards
    assert main(["write", str(manifest), str(tmp_path / "out" / "train-{:06d}.tar"), "--max-count", "5"]) == 0
    assert "train-{000000..000002}.tar" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"train-{n:06d}.tar" for n in range(3)]


def test_writer_exception(tmp_path, shards):
    manifest, _ = shards
    with pytest.raises(ValueCheckError, match="needs a"):
        write_shards(manifest, str(tmp_path / "plain.tar"))
    with pytest.raises(ValueCheckError, match="max_count must be positive"):
        write_shards(manifest, str(tmp_path / "s-{}.tar"), max_count=0)
