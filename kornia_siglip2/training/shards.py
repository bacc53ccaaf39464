"""Webdataset-style tar shards: brace patterns, weighted sources, a resumable sample reader and a writer.

A shard is a plain tar file whose members are grouped into samples by their key: the member path up to the
first ``.`` of its file name (``000042.jpg``, ``000042.txt`` and ``000042.json`` are one sample, key
``000042``), the layout img2dataset and open_clip use. A sample holds an image (``jpg``, ``jpeg``, ``png`` or
``webp``), its caption (``txt``) and optionally a ``json`` object with ``width`` and ``height`` (so that a
token-budget packer counts the tokens before decoding) and LocCa ``regions``.

The reader is :mod:`tarfile` over a file object that :mod:`fsspec` opens: local paths, ``file://``, ``http(s)://``
and every object store whose fsspec backend is installed (``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``).
fsspec is already installed with ``huggingface_hub``; the package's own reader (rather than the webdataset
library) is what lets a checkpoint hold the exact stream position: :func:`iter_samples` starts at a byte offset
and reports each sample's member offsets, so that a resumed run re-reads only what it held in memory
(:func:`read_sample`).

Data sources (:func:`parse_sources`): ``::`` joins several sources (open_clip's convention), each a brace
pattern (:func:`expand_braces`); weights for a mixture come separately (``--data-weights 3::1``).

Writing shards (:func:`write_shards`, or ``python -m kornia_siglip2.training.shards write SOURCE PATTERN``):
any manifest or folder :func:`~kornia_siglip2.training.data.read_manifest` reads becomes shards of
``--max-count`` samples, each with its ``json`` (width, height, regions).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kornia_siglip2.errors import check

__all__ = [
    "IMAGE_EXTENSIONS",
    "RawSample",
    "Source",
    "expand_braces",
    "is_shard_data",
    "iter_samples",
    "main",
    "open_url",
    "parse_sources",
    "read_sample",
    "write_shards",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every path a brace pattern names: ``{000..003}`` (zero-padded ranges) and ``{a,b}`` (lists), left to right.

    Example:
        >>> expand_braces("data/shard-{00..02}.tar")
        ['data/shard-00.tar', 'data/shard-01.tar', 'data/shard-02.tar']
        >>> expand_braces("{a,b}-{1..2}.tar")
        ['a-1.tar', 'a-2.tar', 'b-1.tar', 'b-2.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        first, last = span.groups()
        check(int(first) <= int(last), lambda: f"brace range {{{body}}} of {pattern!r} must not decrease.")
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        choices = [str(value).zfill(width) for value in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


@dataclass(frozen=True)
class Source:
    """One data source of a mixture: its shard URLs and its sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


def parse_sources(data: str, weights: str | Sequence[float] | None = None) -> list[Source]:
    """The sources of ``--data``: ``::``-separated brace patterns, with optional ``::``-separated weights.

    Example:
        >>> [(len(s.urls), s.weight) for s in parse_sources("a-{0..3}.tar::b-{0..1}.tar", "3::1")]
        [(4, 3.0), (2, 1.0)]

    Raises:
        ValueCheckError: an empty source, a weight count different from the source count, or a weight that is
            not positive.
    """
    patterns = [part for part in data.split("::")]
    check(all(patterns), lambda: f"--data {data!r} has an empty source between '::' separators.")
    if weights is None:
        values = [1.0] * len(patterns)
    else:
        values = [float(value) for value in (weights.split("::") if isinstance(weights, str) else weights)]
    check(
        len(values) == len(patterns),
        lambda: f"--data-weights gives {len(values)} weights for {len(patterns)} sources of --data {data!r}.",
    )
    check(all(value > 0 for value in values), lambda: f"--data-weights must be positive, got {values}.")
    return [Source(tuple(expand_braces(pattern)), weight) for pattern, weight in zip(patterns, values, strict=True)]


def is_shard_data(data: str) -> bool:
    """Whether ``--data`` names tar shards (a ``.tar`` pattern, ``::`` sources or a URL) rather than a manifest.

    Example:
        >>> is_shard_data("shards/s-{0..9}.tar"), is_shard_data("s3://bucket/a.tar"), is_shard_data("manifest.jsonl")
        (True, True, False)
    """
    return "::" in data or data.endswith(".tar") or "://" in data


def open_url(url: str) -> BinaryIO:
    """A readable binary file: a local path directly, anything with ``://`` through :func:`fsspec.open`.

    Raises:
        ImportError: a URL whose protocol needs an fsspec backend that is not installed (named by fsspec).
    """
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


@dataclass
class RawSample:
    """A sample's files as read from its shard.

    Attributes:
        key: the sample's key (member path without extension).
        files: extension (lower case, e.g. ``"jpg"``, ``"txt"``) to bytes.
        members: extension to ``(data offset, size)`` in the shard, to read it again (:func:`read_sample`).
        offset: byte offset of the sample's first tar header in the shard.
        next_offset: byte offset of the next sample's first header (where a resumed reader starts).
    """

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    offset: int = 0
    next_offset: int = 0


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def iter_samples(url: str, start: int = 0) -> Iterator[RawSample]:
    """The samples of one tar shard in file order, from byte offset ``start`` (a sample's first header).

    Members are grouped by key while consecutive (as webdataset does); members without an extension and
    directories are ignored.

    Raises:
        OSError, tarfile.TarError: the shard cannot be opened or read (the caller decides whether to skip it).
    """
    with open_url(url) as handle:
        if start:
            handle.seek(start)
        current: RawSample | None = None
        with tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_key(member.name)
                if not extension:
                    continue
                header = start + member.offset
                if current is not None and key != current.key:
                    current.next_offset = header
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, offset=header)
                reader = archive.extractfile(member)
                current.files[extension] = reader.read() if reader is not None else b""
                current.members[extension] = (start + member.offset_data, member.size)
            if current is not None:
                current.next_offset = start + archive.offset
                yield current


def read_sample(url: str, key: str, members: dict[str, tuple[int, int]]) -> RawSample:
    """Read one sample again from its member offsets (what :class:`RawSample` recorded)."""
    sample = RawSample(key, members=dict(members))
    with open_url(url) as handle:
        for extension, (offset, size) in sorted(members.items(), key=lambda item: item[1][0]):
            handle.seek(offset)
            sample.files[extension] = handle.read(size)
    return sample


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shards(
    source: str | Path,
    pattern: str,
    max_count: int = 10000,
    image_key: str = "image",
    caption_key: str = "caption",
) -> list[Path]:
    """Write the pairs of a manifest or image folder as tar shards of at most ``max_count`` samples.

    Each sample is ``KEY.<image extension>`` (the file's bytes, unchanged), ``KEY.txt`` (the caption) and
    ``KEY.json`` (``width``, ``height`` from the image header and the manifest's ``regions``), with ``KEY``
    the sample's number, nine digits.

    Args:
        source: a folder, ``.jsonl`` or ``.csv`` manifest (:func:`~kornia_siglip2.training.data.read_manifest`).
        pattern: the shard paths with one ``{}`` for the shard number, e.g. ``"shards/train-{:06d}.tar"``.
        max_count: samples per shard.
        image_key: the manifest's image field.
        caption_key: the manifest's caption field.

    Returns:
        the shard paths written.

    Example:
        >>> import tempfile
        >>> from kornia_siglip2.training.synthetic import write_synthetic_dataset
        >>> folder = Path(tempfile.mkdtemp())
        >>> manifest = write_synthetic_dataset(folder / "images", 5, seed=0)
        >>> [path.name for path in write_shards(manifest, str(folder / "shard-{:03d}.tar"), max_count=2)]
        ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']
    """
    from kornia_siglip2.images import image_size
    from kornia_siglip2.training.data import read_manifest

    check(max_count >= 1, lambda: f"max_count must be positive, got {max_count}.")
    check("{" in pattern, lambda: f"pattern {pattern!r} needs a '{{}}' (e.g. 'shard-{{:06d}}.tar') for the number.")
    records = read_manifest(source, image_key, caption_key)
    written: list[Path] = []
    archive: tarfile.TarFile | None = None
    for number, record in enumerate(records):
        if number % max_count == 0:
            if archive is not None:
                archive.close()
            path = Path(pattern.format(len(written)))
            path.parent.mkdir(parents=True, exist_ok=True)
            archive = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed below
            written.append(path)
        key = f"{number:09d}"
        extension = record.image.suffix.lower().lstrip(".")
        height, width = record.size if record.size is not None else image_size(record.image)
        meta: dict[str, Any] = {"width": width, "height": height, "source": str(record.image)}
        if record.regions:
            meta["regions"] = [{"box": list(region.box), "text": region.text} for region in record.regions]
        _add_member(archive, f"{key}.{extension}", record.image.read_bytes())
        _add_member(archive, f"{key}.txt", record.caption.encode())
        _add_member(archive, f"{key}.json", json.dumps(meta).encode())
    if archive is not None:
        archive.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kornia_siglip2.training.shards write SOURCE PATTERN [--max-count N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kornia_siglip2.training.shards", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a manifest or an image folder as tar shards")
    write.add_argument("source", help="an image folder (captions in .txt beside), a .jsonl or a .csv manifest")
    write.add_argument("pattern", help="shard paths with a '{}' for the number, e.g. 'shards/train-{:06d}.tar'")
    write.add_argument("--max-count", type=int, default=10000, help="samples per shard (default %(default)s)")
    write.add_argument("--image-key", default="image", help="the manifest's image field (default %(default)s)")
    write.add_argument("--caption-key", default="caption", help="the manifest's caption field (default %(default)s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_shards(args.source, args.pattern, args.max_count, args.image_key, args.caption_key)
    last = len(paths) - 1
    print(
        f"wrote {len(paths)} shards in {time.perf_counter() - start:.1f} s; train with --data "
        f"'{args.pattern.replace('{:06d}', '{' + f'{0:06d}..{last:06d}' + '}')}'"
        if "{:06d}" in args.pattern
        else f"wrote {len(paths)} shards: {paths[0]} ... {paths[-1]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
