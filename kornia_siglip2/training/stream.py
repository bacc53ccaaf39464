"""Token-budget batches packed over a stream of tar shards, split by rank and worker, resumable to the sample.

Layout. Every epoch the shards are shuffled (from the seed and the epoch) and dealt to *readers*: reader
``s = rank * K + worker`` of ``S = W * K`` (``W`` ranks, ``K`` DataLoader workers, at least one) reads shards
``s, s + S, ...`` of the epoch's order, so every sample is read once per epoch by exactly one reader. A reader
(:class:`Cursor`) reads its shards sample by sample, skips bad samples (:data:`SKIP_REASONS`, each counted and
logged with its shard and key), keeps up to ``shuffle_buffer`` samples and hands a random one to a greedy
token-budget packer (the same first-fit over ``max_open_batches`` open batches as
:class:`~kornia_siglip2.training.data.TokenBudgetBatchSampler`). Tokens are counted before decoding, from the
sample's ``json`` width and height (img2dataset writes them) or the image header; only the images of an emitted
batch are decoded (:func:`kornia_siglip2.images.load_image`: the pixels inference reads). At the end of its
shards a reader drains its buffer into the packer and repacks the open batches first-fit decreasing, as the
sampler does.

A rank's DataLoader takes one batch from each of its workers in turn (PyTorch's order for an iterable
dataset), skipping workers that are done. With ``resampled``, readers draw shards with replacement (a source by
its weight, then a shard of it uniformly) and never end.

Resume. Each batch carries its reader's state after it (:meth:`Cursor.state_dict`: shard, byte offset, the
references of the samples in the buffer and the open batches, the generator state, the counts), and
:class:`StreamFeed` keeps the state of the last batch it handed out per worker and which worker comes next:
its :meth:`StreamFeed.state_dict` is the exact stream position of the rank. A resumed reader re-reads only
the samples it held (by their tar offsets) and continues bit for bit. On another number of readers
(world size or workers changed) the readers of the interrupted epoch are dealt to the new readers
(:func:`redeal`): each continues where it stopped, so nothing of the epoch is lost or read twice; the next
epoch is split the new way.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kornia_siglip2.errors import check
from kornia_siglip2.images import image_size, load_image
from kornia_siglip2.preprocess import NaFlexImagePreprocessor
from kornia_siglip2.training.data import collate_packed, naflex_num_tokens, num_kept_tokens, training_example
from kornia_siglip2.training.shards import IMAGE_EXTENSIONS, Source, iter_samples, read_sample

__all__ = [
    "SKIP_REASONS",
    "Cursor",
    "ShardStream",
    "StreamFeed",
    "StreamSpec",
    "reader_shards",
    "redeal",
]

SKIP_REASONS = ("no_image", "no_caption", "empty_caption", "bad_json", "undecodable", "size_mismatch", "bad_shard")
_LOGGED_SKIPS = 20  # per reader: the first ones are printed with their key, the rest only counted


@dataclass(frozen=True)
class StreamSpec:
    """What defines the stream (every rank and worker builds the same from it).

    Attributes:
        sources: the shard sources (:func:`~kornia_siglip2.training.shards.parse_sources`).
        token_budget: most patch tokens of a batch (kept tokens with ``token_drop``).
        patch_size: patch side of the model.
        max_num_patches: NaFlex patch budgets, one drawn per image.
        seed: seed of the shard order, the shuffle buffer and the budget draws.
        shuffle_buffer: samples a reader holds to shuffle (1: no shuffling inside shards).
        resampled: draw shards with replacement by source weight, endlessly (else each shard once per epoch).
        max_open_batches: open batches of the greedy packer.
        token_drop: NaViT token-drop rate the budget counts with.
    """

    sources: tuple[Source, ...]
    token_budget: int
    patch_size: int = 16
    max_num_patches: tuple[int, ...] = (256,)
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    max_open_batches: int = 8
    token_drop: float = 0.0

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "the stream needs at least one source.")
        check(self.shuffle_buffer >= 1, lambda: f"shuffle_buffer must be positive, got {self.shuffle_buffer}.")
        check(
            num_kept_tokens(max(self.max_num_patches), self.token_drop) <= self.token_budget,
            lambda: f"max_num_patches {max(self.max_num_patches)} exceeds token_budget {self.token_budget}.",
        )
        check(
            self.resampled or len({source.weight for source in self.sources}) == 1,
            "Source weights need resampling (--data-resampled): without it every shard is read once per epoch.",
        )

    @property
    def urls(self) -> list[str]:
        """Every shard of every source, in order (a shard's number is its index here)."""
        return [url for source in self.sources for url in source.urls]

    def tokens(self, height: int, width: int, budget: int) -> int:
        """Tokens an image of this size takes in a batch at patch budget ``budget``."""
        tokens = naflex_num_tokens(height, width, self.patch_size, budget)
        return num_kept_tokens(tokens, self.token_drop) if self.token_drop else tokens


def reader_shards(spec: StreamSpec, epoch: int, reader: int, num_readers: int) -> list[int]:
    """The shard numbers reader ``reader`` of ``num_readers`` reads in ``epoch`` (without resampling).

    Example:
        >>> from kornia_siglip2.training.shards import parse_sources
        >>> spec = StreamSpec(tuple(parse_sources("s-{0..4}.tar")), token_budget=256)
        >>> sorted(reader_shards(spec, 0, 0, 2) + reader_shards(spec, 0, 1, 2))
        [0, 1, 2, 3, 4]
    """
    count = len(spec.urls)
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    return order[reader::num_readers]


def _sample_index(shard: int, offset: int, draw: int) -> int:
    """A stable 62-bit id of a sample (seeds its token drop, LocCa and view draws)."""
    digest = hashlib.blake2b(f"{shard}:{offset}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _log(message: str) -> None:
    print(f"kornia_siglip2 data: {message}", file=sys.stderr, flush=True)


@dataclass
class _Item:
    """A sample in a reader's buffer or packer: its reference, size, budget and (in memory) its files."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]
    size: tuple[int, int]
    index: int
    budget: int = 0
    tokens: int = 0
    files: dict[str, bytes] = field(default_factory=dict, repr=False)

    def reference(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "key": self.key,
            "members": {name: list(value) for name, value in self.members.items()},
            "size": list(self.size),
            "index": self.index,
            "budget": self.budget,
            "tokens": self.tokens,
        }

    @classmethod
    def from_reference(cls, reference: dict[str, Any]) -> _Item:
        return cls(
            int(reference["shard"]),
            str(reference["key"]),
            {name: (int(value[0]), int(value[1])) for name, value in reference["members"].items()},
            (int(reference["size"][0]), int(reference["size"][1])),
            int(reference["index"]),
            int(reference["budget"]),
            int(reference["tokens"]),
        )


class Cursor:
    """One reader of one epoch: its shards, shuffle buffer and packer, resumable to the sample.

    Args:
        spec: the stream.
        epoch: the epoch (ignored with ``resampled``).
        reader: this reader's number.
        num_readers: readers of the epoch.
        urls: the shard URLs (``spec.urls``; passed to avoid rebuilding the list).
    """

    def __init__(self, spec: StreamSpec, epoch: int, reader: int, num_readers: int, urls: Sequence[str]) -> None:
        self.spec = spec
        self.urls = urls
        self.epoch = int(epoch)
        self.reader = int(reader)
        self.num_readers = int(num_readers)
        self.shards = [] if spec.resampled else reader_shards(spec, epoch, reader, num_readers)
        self.position = 0  # index into self.shards (resampled: draws made)
        self.shard: int | None = None
        self.offset = 0
        self.rng = np.random.Generator(np.random.PCG64([spec.seed, epoch, reader, num_readers]))
        self.buffer: list[_Item] = []
        self.open: list[list[_Item]] = []
        self.tail: list[list[_Item]] | None = None
        self.counts = {"read": 0, **dict.fromkeys(SKIP_REASONS, 0)}
        self._samples: Iterator | None = None
        self._logged = 0

    # ---- state ---------------------------------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        """No batch left."""
        return self.tail is not None and not self.tail

    def state_dict(self) -> dict[str, Any]:
        """The reader's position (JSON): shard, offset, generator state, the references of the samples it holds."""
        return {
            "epoch": self.epoch,
            "reader": self.reader,
            "num_readers": self.num_readers,
            "position": self.position,
            "shard": self.shard,
            "offset": self.offset,
            "rng": self.rng.bit_generator.state,
            "buffer": [item.reference() for item in self.buffer],
            "open": [[item.reference() for item in batch] for batch in self.open],
            "tail": None if self.tail is None else [[item.reference() for item in batch] for batch in self.tail],
            "counts": dict(self.counts),
        }

    @classmethod
    def from_state(cls, spec: StreamSpec, state: dict[str, Any], urls: Sequence[str]) -> Cursor:
        """A reader at :meth:`state_dict`'s position; the samples it held are read again from their shards."""
        cursor = cls(spec, state["epoch"], state["reader"], state["num_readers"], urls)
        cursor.position, cursor.shard, cursor.offset = int(state["position"]), state["shard"], int(state["offset"])
        cursor.rng.bit_generator.state = state["rng"]
        cursor.buffer = [_Item.from_reference(reference) for reference in state["buffer"]]
        cursor.open = [[_Item.from_reference(reference) for reference in batch] for batch in state["open"]]
        if state["tail"] is not None:
            cursor.tail = [[_Item.from_reference(reference) for reference in batch] for batch in state["tail"]]
        cursor.counts.update(state["counts"])
        held = [*cursor.buffer, *(item for batch in cursor.open for item in batch)]
        held += [item for batch in cursor.tail or () for item in batch]
        for item in held:
            item.files = read_sample(urls[item.shard], item.key, item.members).files
        return cursor

    # ---- reading -------------------------------------------------------------------------------------------

    def _skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self._logged < _LOGGED_SKIPS:
            self._logged += 1
            _log(f"skipped {where} ({reason.replace('_', ' ')}{': ' + detail if detail else ''})")

    def _next_shard(self) -> bool:
        """Open the next shard; ``False`` when this reader has none left."""
        if self.spec.resampled:
            sources = self.spec.sources
            weights = np.array([source.weight for source in sources], dtype=np.float64)
            chosen = int(self.rng.choice(len(sources), p=weights / weights.sum()))
            first = sum(len(source.urls) for source in sources[:chosen])
            self.shard = first + int(self.rng.integers(len(sources[chosen].urls)))
        elif self.position < len(self.shards):
            self.shard = self.shards[self.position]
        else:
            self.shard = None
            return False
        self.offset = 0
        return True

    def _next_sample(self) -> _Item | None:
        """The next good sample of this reader's shards, or ``None`` at their end (bad ones skipped, counted)."""
        while True:
            if self._samples is None:
                if self.shard is None and not self._next_shard():
                    return None
                self._samples = iter_samples(self.urls[self.shard], self.offset)
            url = self.urls[self.shard]
            try:
                sample = next(self._samples, None)
            except Exception as error:  # a truncated or corrupt tar: the rest of the shard is lost
                self._skip("bad_shard", url, f"{type(error).__name__}: {error}")
                sample = None
            if sample is None:
                self._samples, self.shard = None, None
                self.position += 1
                continue
            self.offset = sample.next_offset
            self.counts["read"] += 1
            item = self._validate(sample, url)
            if item is not None:
                return item

    def _validate(self, sample: Any, url: str) -> _Item | None:
        where = f"{url} sample {sample.key}"
        images = [name for name in IMAGE_EXTENSIONS if name in sample.files]
        if not images:
            self._skip("no_image", where, f"files {sorted(sample.files)}")
            return None
        if "txt" not in sample.files:
            self._skip("no_caption", where)
            return None
        try:
            caption = sample.files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            self._skip("empty_caption", where)
            return None
        size = None
        if "json" in sample.files:
            try:
                meta = json.loads(sample.files["json"])
                _regions(meta.get("regions"))
                if meta.get("width") and meta.get("height"):
                    size = (int(meta["height"]), int(meta["width"]))
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                self._skip("bad_json", where, str(error))
                return None
        if size is None:  # the header only: no decoding
            try:
                size = image_size(sample.files[images[0]])
            except Exception as error:
                self._skip("undecodable", f"{where}.{images[0]}", str(error))
                return None
        draw = self.position if self.spec.resampled else 0
        index = _sample_index(self.shard, sample.offset, draw)
        return _Item(self.shard, sample.key, sample.members, size, index, files=sample.files)

    # ---- packing -------------------------------------------------------------------------------------------

    def _pack(self, item: _Item) -> list[_Item] | None:
        """Put ``item`` in the first open batch it fits; the fullest batch when too many are open."""
        choices = self.spec.max_num_patches
        item.budget = choices[int(self.rng.integers(len(choices)))] if len(choices) > 1 else choices[0]
        item.tokens = self.spec.tokens(*item.size, item.budget)
        for batch in self.open:
            if sum(entry.tokens for entry in batch) + item.tokens <= self.spec.token_budget:
                batch.append(item)
                return None
        self.open.append([item])
        if len(self.open) > self.spec.max_open_batches:
            used = [sum(entry.tokens for entry in batch) for batch in self.open]
            fullest = max(range(len(self.open)), key=used.__getitem__)
            return self.open.pop(fullest)
        return None

    def _pop_random(self) -> _Item:
        position = int(self.rng.integers(len(self.buffer)))
        self.buffer[position], self.buffer[-1] = self.buffer[-1], self.buffer[position]
        return self.buffer.pop()

    def _repack_tail(self) -> None:
        """The open batches' images, first-fit decreasing into as few batches as possible."""
        items = sorted((item for batch in self.open for item in batch), key=lambda item: item.tokens, reverse=True)
        tail: list[list[_Item]] = []
        for item in items:
            for batch in tail:
                if sum(entry.tokens for entry in batch) + item.tokens <= self.spec.token_budget:
                    batch.append(item)
                    break
            else:
                tail.append([item])
        self.open, self.tail = [], tail

    def batches(self) -> Iterator[list[_Item]]:
        """The reader's remaining batches (lists of samples, undecoded); its state is exact at every yield."""
        while self.tail is None:
            item = self._next_sample()
            if item is None:
                while self.buffer:
                    emitted = self._pack(self._pop_random())
                    if emitted is not None:
                        yield emitted
                self._repack_tail()
                break
            self.buffer.append(item)
            if len(self.buffer) >= self.spec.shuffle_buffer:
                emitted = self._pack(self._pop_random())
                if emitted is not None:
                    yield emitted
        while self.tail:
            yield self.tail.pop(0)


def _regions(value: Any) -> list[tuple[tuple[float, float, float, float], str]]:
    """LocCa regions of a sample's json: ``[{"box": [x0, y0, x1, y1], "text": ...}]``, boxes normalized."""
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise ValueError("regions must be a list")
    regions = []
    for entry in value:
        box = [float(number) for number in entry["box"]]
        text = str(entry["text"])
        if len(box) != 4 or not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1) or not text:
            raise ValueError(f"bad region {entry!r}")
        regions.append((tuple(box), text))
    return regions


def redeal(states: Sequence[dict[str, Any]], reader: int, num_readers: int) -> list[dict[str, Any]]:
    """The interrupted readers (``states``, in reader order) that new reader ``reader`` of ``num_readers`` continues.

    Example:
        >>> [len(redeal([{}] * 4, reader, 3)) for reader in range(3)]
        [2, 1, 1]
    """
    return list(states[reader::num_readers])


def _identity(value: Any) -> Any:
    return value


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class ShardStream(IterableDataset):
    """A rank's batches: each DataLoader worker runs one reader role (or, after a re-deal, several readers).

    Iterating yields dicts with ``batch`` (a :class:`~kornia_siglip2.training.data.PackedBatch`, or ``None`` if
    every image of the packed batch failed to decode), ``keys`` (``"shard-url/key"`` of each image),
    ``tokens``, ``role``, ``state`` (the role's readers after this batch), ``done`` (the role has no batch left)
    and ``counts`` (samples read and skipped since the role's previous batch).

    Args:
        spec: the stream.
        tokenizer: captions to :math:`(n, L)` ids.
        rank: this rank.
        world_size: ranks.
        num_workers: DataLoader workers per rank (0: one role in the main process).
    """

    def __init__(
        self,
        spec: StreamSpec,
        tokenizer: Callable[[list[str]], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_roles = max(int(num_workers), 1)
        self.num_readers = self.world_size * self.num_roles
        self.urls = spec.urls
        check(
            spec.resampled or len(self.urls) >= self.num_readers,
            lambda: (
                f"{len(self.urls)} shards cannot feed {self.world_size} ranks x {self.num_roles} workers = "
                f"{self.num_readers} readers: write more, smaller shards (python -m kornia_siglip2.training.shards "
                "write --max-count ...) or lower --num-workers."
            ),
        )
        self.epoch = 0
        self.roles: list[list[dict[str, Any]] | None] = [None] * self.num_roles
        self.first_role = 0
        self._preprocessors: dict[int, NaFlexImagePreprocessor] = {}

    def start(
        self, epoch: int, roles: Sequence[list[dict[str, Any]] | None] | None = None, first_role: int = 0
    ) -> None:
        """The next iteration runs ``epoch`` from the roles' reader states (``None``: from the epoch's start)."""
        self.epoch = int(epoch)
        self.roles = list(roles) if roles is not None else [None] * self.num_roles
        check(len(self.roles) == self.num_roles, "one state list per role.")
        self.first_role = int(first_role) % self.num_roles

    def role_cursors(self, role: int) -> list[Cursor]:
        """The readers of role ``role`` at the start of the next iteration."""
        states = self.roles[role]
        if states is None:
            reader = self.rank * self.num_roles + role
            return [Cursor(self.spec, self.epoch, reader, self.num_readers, self.urls)]
        return [Cursor.from_state(self.spec, state, self.urls) for state in states]

    def _preprocessor(self, budget: int) -> NaFlexImagePreprocessor:
        if budget not in self._preprocessors:
            self._preprocessors[budget] = NaFlexImagePreprocessor(self.spec.patch_size, budget)
        return self._preprocessors[budget]

    def _item(self, item: _Item) -> dict[str, Any]:
        image = load_image(next(item.files[name] for name in IMAGE_EXTENSIONS if name in item.files))
        if tuple(image.shape[1:]) != item.size:
            raise _SizeMismatchError(
                f"json says {item.size[1]}x{item.size[0]}, image is {image.shape[2]}x{image.shape[1]}"
            )
        with torch.no_grad():
            packed = self._preprocessor(item.budget)(image[None])
        caption = item.files["txt"].decode("utf-8").strip()
        regions = _regions(json.loads(item.files["json"]).get("regions")) if "json" in item.files else []
        input_ids = self.tokenizer([caption, *(text for _, text in regions)])
        boxes = [box for box, _ in regions]
        return training_example(packed, input_ids, boxes, index=item.index, tokenizer=self.tokenizer)

    def role_batches(self, role: int) -> Iterator[dict[str, Any]]:
        """Role ``role``'s batches (what its DataLoader worker yields)."""
        cursors = self.role_cursors(role)
        reported = [dict(cursor.counts) for cursor in cursors]
        while cursors:
            cursor = cursors[0]
            for items in cursor.batches():
                good, keys, tokens = [], [], 0
                for item in items:
                    where = f"{self.urls[item.shard]} sample {item.key}"
                    try:
                        good.append(self._item(item))
                        keys.append(f"{self.urls[item.shard]}/{item.key}")
                        tokens += item.tokens
                    except _SizeMismatchError as error:
                        cursor._skip("size_mismatch", where, str(error))
                    except Exception as error:
                        cursor._skip("undecodable", where, f"{type(error).__name__}: {error}")
                states = [entry for entry in cursors if not entry.exhausted]
                counts = dict.fromkeys(cursor.counts, 0)
                for entry, before in zip(cursors, reported, strict=True):
                    for name, value in entry.counts.items():
                        counts[name] += value - before[name]
                reported = [dict(entry.counts) for entry in cursors]
                yield {
                    "batch": collate_packed(good) if good else None,
                    "keys": keys,
                    "tokens": tokens,
                    "role": role,
                    "state": [entry.state_dict() for entry in states],
                    "done": not states,
                    "counts": counts,
                }
            cursors.pop(0)
            reported.pop(0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.role_batches((worker + self.first_role) % self.num_roles)


class _SizeMismatchError(ValueError):
    pass


class StreamFeed:
    """A rank's position in the stream: hands out batches in the DataLoader's order and knows where it is.

    Args:
        stream: the rank's :class:`ShardStream`.
        num_workers: DataLoader workers (0: in this process).
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0) -> None:
        self.stream = stream
        self.num_workers = int(num_workers)
        self.epoch = 0
        self.roles: list[list[dict[str, Any]] | None] = [None] * stream.num_roles
        self.done = [False] * stream.num_roles
        self.next_role = 0
        self.totals = {"read": 0, **dict.fromkeys(SKIP_REASONS, 0)}
        self._iterator: Iterator | None = None

    def _open(self) -> Iterator:
        self.stream.start(self.epoch, self.roles, self.next_role)
        if self.num_workers == 0:
            return self._in_order()
        # fork where there is one (PyTorch's own default on Linux), also in a process that was itself spawned:
        # a spawned worker re-imports torch and the package at every epoch start (seconds to tens of seconds)
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else None
        loader = DataLoader(
            self.stream,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init,
            multiprocessing_context=context,
        )
        return iter(loader)

    def _in_order(self) -> Iterator[dict[str, Any]]:
        """The DataLoader's order without workers (one role, or the roles in turn as the workers would)."""
        generators = {role: self.stream.role_batches(role) for role in range(self.stream.num_roles)}
        order = [(self.next_role + step) % self.stream.num_roles for step in range(self.stream.num_roles)]
        while order:
            role = order.pop(0)
            item = next(generators[role], None)
            if item is not None:
                order.append(role)
                yield item

    def next(self) -> dict[str, Any] | None:
        """The rank's next item of this epoch (a dict of :class:`ShardStream`), or ``None`` at the epoch's end."""
        if self._iterator is None:
            self._iterator = self._open()
        item = next(self._iterator, None)
        if item is None:
            return None
        role = item["role"]
        self.roles[role] = item["state"]
        self.done[role] = item["done"]
        for name, value in item["counts"].items():
            self.totals[name] = self.totals.get(name, 0) + value
        following = [(role + step) % len(self.done) for step in range(1, len(self.done) + 1)]
        self.next_role = next((other for other in following if not self.done[other]), role)
        return item

    def end_epoch(self) -> None:
        """Close this epoch (its remaining batches are dropped) and start the next one from its beginning."""
        self.close()
        self.epoch += 1
        self.roles = [None] * self.stream.num_roles
        self.done = [False] * self.stream.num_roles
        self.next_role = 0

    def close(self) -> None:
        """Shut the DataLoader workers down."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif hasattr(iterator, "close"):
            iterator.close()

    def state_dict(self) -> dict[str, Any]:
        """The rank's stream position (JSON)."""
        return {
            "epoch": self.epoch,
            "roles": self.roles,
            "done": self.done,
            "next_role": self.next_role,
            "totals": dict(self.totals),
        }

    def load_state_dict(self, ranks: Sequence[dict[str, Any]]) -> bool:
        """Restore this rank's position from every rank's :meth:`state_dict`; ``True`` if the readers were re-dealt.

        With as many ranks and workers as saved, the rank takes its own state. Otherwise the unfinished readers
        of every rank, in reader order, are dealt to the new readers (:func:`redeal`); the totals of the skipped
        and read samples go to rank 0.
        """
        self.close()
        rank, num_roles = self.stream.rank, self.stream.num_roles
        same = len(ranks) == self.stream.world_size and all(len(entry["roles"]) == num_roles for entry in ranks)
        self.epoch = int(ranks[0]["epoch"])
        check(all(int(entry["epoch"]) == self.epoch for entry in ranks), "the saved ranks disagree on the epoch.")
        if same:
            own = ranks[rank]
            self.roles, self.done, self.next_role = list(own["roles"]), list(own["done"]), int(own["next_role"])
            self.totals = dict(own["totals"])
            return False
        # every reader that has not finished the epoch, as it stopped (a role not started yet: from its start)
        unfinished = []
        for saved_rank, entry in enumerate(ranks):
            saved_roles = len(entry["roles"])
            for role, states in enumerate(entry["roles"]):
                if states is None:
                    reader = saved_rank * saved_roles + role
                    fresh = Cursor(self.stream.spec, self.epoch, reader, len(ranks) * saved_roles, self.stream.urls)
                    unfinished.append(fresh.state_dict())
                else:
                    unfinished.extend(states)
        self.roles = [redeal(unfinished, rank * num_roles + role, self.stream.num_readers) for role in range(num_roles)]
        self.done = [not states for states in self.roles]
        self.next_role = 0
        self.totals = {name: 0 for name in self.totals}
        if rank == 0:
            for entry in ranks:
                for name, value in entry["totals"].items():
                    self.totals[name] = self.totals.get(name, 0) + value
        return True
