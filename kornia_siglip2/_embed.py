"""The ``embed`` command's machinery: list a folder, shard it, decode + preprocess in workers, encode, keep chunks.

Output contract (also in ``kornia-siglip2 embed --help`` and the user guide):

- rows follow the **sorted relative POSIX paths** of the images (Python string order of ``a/b.jpg``), whatever the
  number of processes; with ``--skip-errors`` the skipped images have no row;
- ``.safetensors``: tensor ``image_embeds`` :math:`(N, D)` float32, L2-normalized; metadata ``files`` (JSON list,
  entry ``i`` = image of row ``i``), ``skipped`` (JSON list of ``{"file", "error"}``), ``model``,
  ``model_fingerprint`` (:func:`model_fingerprint`), ``dtype``, ``row_order``, ``format`` and, when links named a
  file or folder twice, ``duplicates`` (``{"file", "same_as"}``);
- ``.npy``: the :math:`(N, D)` float32 array, plus a sidecar ``<name>.json`` beside it holding the same metadata
  (``.npy`` itself cannot carry any).

Work is kept in ``<out>.parts/``: one ``chunk-KKKKKK.safetensors`` per ``--chunk-size`` rows of the global sorted
list, each written atomically as soon as it is computed. Rank ``r`` of ``W`` computes chunks ``r, r + W, ...``;
rerunning the same command skips the chunks already there (an interrupted run resumes), and the process that
finds every chunk present writes ``<out>`` atomically (temporary file + rename) and removes ``<out>.parts/``.

Provenance: ``<out>.parts/manifest.json`` records what the chunks are made of (the file list's hash, the model
files' fingerprint (:func:`model_fingerprint`), dtype, preprocessing and decoder, chunk size); a resume whose
inputs differ is refused, naming what changed. Each chunk records its run (the manifest's hash), its index and
its file slice's hash; every chunk is verified (run, index, rows, files, width) before it is resumed or merged,
and a damaged one is named. Each rank holds an ``flock`` on ``<out>.parts/.rank-R.lock`` while it runs: a
second identical command is refused (``flock`` is reliable on local file systems; on NFS it depends on the
server's lock daemon).

Listing: symbolic links are followed once (a folder or file reached again through a link, by its real path, is
not listed twice: the later names are recorded under ``duplicates``); FIFOs, sockets and devices are never
opened (reading a FIFO would block forever), dangling links and link loops are reported as such; file names
that are not UTF-8 are recorded with ``\\xNN`` escapes (:func:`display_name`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kornia_siglip2.locks import exclusive_lock

__all__: list[str] = []

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
EMBED_KEY = "image_embeds"
ROW_ORDER = "sorted relative POSIX paths (Python string order); skipped images have no row"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_MANIFEST = "manifest.json"


@dataclass
class Listing:
    """Images of a folder: sorted relative POSIX paths, and what could not be read (``{"file", "error"}``).

    ``duplicates``: names under which an already listed file or folder was reached again through a symbolic
    link (``{"file", "same_as"}``); they get no row.
    """

    files: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)


def display_name(name: str) -> str:
    """A file name as recorded in metadata and messages: bytes that are not UTF-8 become ``\\xNN`` escapes.

    Python decodes such names with ``surrogateescape``; JSON and safetensors metadata need valid UTF-8.

    Example:
        >>> display_name(os.fsdecode(b"caf\\xe9.png")), display_name("café.png")
        ('caf\\\\xe9.png', 'café.png')
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _names_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))


def _unreadable(path: str) -> str | None:
    """Why the image at ``path`` cannot be read (without opening it), or ``None``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "dangling symbolic link (its target does not exist)" if os.path.islink(path) else "file vanished"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        return error.strerror or type(error).__name__
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
        if stat.S_ISBLK(info.st_mode):
            kind = "a block device"
        return f"not a regular file ({kind}); never opened"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def list_images(folder: Path, skip_errors: bool = False) -> Listing:
    """Every image under ``folder`` (recursive, by suffix), sorted by relative POSIX path.

    A folder or file that cannot be read (no permission, a dangling link, a link loop, a FIFO / socket /
    device, which is never opened) is an error naming it, unless ``skip_errors``: it is then listed in
    :attr:`Listing.skipped` with the reason. Symbolic links are followed once: a folder or file whose real path
    was already listed is not listed again (:attr:`Listing.duplicates`), so link cycles end.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    found: list[tuple[str, str]] = []  # (relative name, real path)
    skipped: list[dict[str, str]] = []
    duplicates: list[dict[str, str]] = []
    seen_folders: dict[str, str] = {}

    def relative(path: str) -> str:
        return Path(path).relative_to(folder).as_posix() if Path(path) != folder else "."

    def fail(path: str, reason: str, what: str) -> None:
        name = display_name(relative(path))
        if not skip_errors:
            error = PermissionError if reason == "permission denied" else OSError
            raise error(
                f"cannot read {what} {display_name(path)}: {reason}; fix it, or pass --skip-errors to skip it "
                "(it is then listed in the output's 'skipped' metadata)"
            )
        skipped.append({"file": name + ("/" if what == "folder" else ""), "error": reason})

    def on_error(error: OSError) -> None:
        fail(str(error.filename), error.strerror or type(error).__name__, "folder")

    for directory, subfolders, names in os.walk(folder, onerror=on_error, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen_folders:  # reached again through a link (a cycle, or two names of one folder)
            duplicates.append({"file": display_name(relative(directory)) + "/", "same_as": seen_folders[real]})
            subfolders[:] = []
            continue
        seen_folders[real] = display_name(relative(directory)) + "/"
        subfolders.sort()
        for name in names:
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(directory, name)
            reason = _unreadable(path)
            if reason is not None:
                fail(path, reason, "image")
                continue
            found.append((relative(path), os.path.realpath(path)))
    files: list[str] = []
    first: dict[str, str] = {}
    for name, real in sorted(found):
        if real in first:
            duplicates.append({"file": display_name(name), "same_as": display_name(first[real])})
            continue
        first[real] = name
        files.append(name)
    skipped.sort(key=lambda entry: entry["file"])
    duplicates.sort(key=lambda entry: entry["file"])
    return Listing(files, skipped, duplicates)


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 fingerprint of a model folder's weights and configuration: what the chunks of ``embed`` record.

    Covers every ``*.safetensors`` file and the configuration JSON files at the folder's top level: the JSON files
    whole; each weight file by its size, its safetensors header (every tensor's name, dtype, shape and offsets,
    and the metadata) and :data:`FINGERPRINT_BLOCKS` blocks of :data:`FINGERPRINT_BLOCK_SIZE` bytes spread evenly
    over it (all of it when smaller). New weights under the same folder name (another training, a fine-tune, a
    re-save in another dtype) change it; hashing whole files would cost seconds per GiB (SHA-256 reads about
    500 MiB/s here) at every start, this reads 16 MiB per file.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text("{}")
        >>> before = model_fingerprint(folder)
        >>> _ = (folder / "config.json").write_text('{"hidden_size": 8}')
        >>> model_fingerprint(folder) != before
        True
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or not (path.suffix == ".safetensors" or path.name in _MODEL_JSON):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            whole = path.suffix != ".safetensors" or size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_SIZE
            if whole:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
                continue
            head = handle.read(8)
            header_size = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + handle.read(min(header_size, size)))
            step = (size - FINGERPRINT_BLOCK_SIZE) // (FINGERPRINT_BLOCKS - 1)
            for block in range(FINGERPRINT_BLOCKS):
                handle.seek(block * step)
                digest.update(handle.read(FINGERPRINT_BLOCK_SIZE))
    return digest.hexdigest()


#: :func:`model_fingerprint` reads this many blocks of each large weight file ...
FINGERPRINT_BLOCKS = 64
#: ... of this many bytes (16 MiB in all per file)
FINGERPRINT_BLOCK_SIZE = 256 * 1024
_MODEL_JSON = ("config.json", "model.safetensors.index.json", "preprocessor_config.json")


def check_writable(out: Path) -> None:
    """Fail now, before any compute, if ``out`` cannot be written (a folder in the way, no permission)."""
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name ending in .safetensors or .npy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise PermissionError(f"--out {out} cannot be written: {error.strerror or error}") from error


def auto_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype on ``device`` (``--dtype auto``).

    bfloat16 on CPUs with native bf16 matmul (AMX / AVX512-BF16) and on GPUs that support it (float16 on the
    others), float32 on every other CPU.

    Example:
        >>> auto_dtype(torch.device("cpu")) in (torch.float32, torch.bfloat16)
        True
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises bf16 matmul instructions (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def decode_pillow(path: Path) -> torch.Tensor:
    """Decode with Pillow through :func:`~kornia_siglip2.images.load_image`: pixels equal transformers'."""
    from kornia_siglip2.images import load_image

    return load_image(path)


def decode_kornia_rs(path: Path) -> torch.Tensor:
    """Decode JPEGs with ``kornia_rs`` (faster; pixels may differ from Pillow's by a few levels), others with Pillow.

    JPEGs with an EXIF orientation other than 1 go through Pillow, which applies it.
    """
    if path.suffix.lower() not in _JPEG_SUFFIXES:
        return decode_pillow(path)
    from PIL import Image

    with Image.open(path) as opened:
        if opened.mode != "RGB" or opened.getexif().get(0x0112, 1) != 1:
            return decode_pillow(path)
    import kornia_rs

    array = kornia_rs.io.read_image_jpeg(str(path), "rgb")
    return torch.from_numpy(array.__array__() if hasattr(array, "__array__") else array).permute(2, 0, 1)


DECODERS: dict[str, Callable[[Path], torch.Tensor]] = {"pillow": decode_pillow, "kornia-rs": decode_kornia_rs}
#: decoders that see the preprocessor's target size: JPEGs decoded at a reduced scale
SCALED_DECODERS = ("pillow-draft",)


def decode_pillow_draft(path: Path, target_size: Callable[[int, int], tuple[int, int] | None]) -> tuple[Any, Any]:
    """``pillow-draft``: :func:`~kornia_siglip2.images.load_image_reduced` (JPEGs decoded at a reduced scale)."""
    from kornia_siglip2.images import load_image_reduced

    return load_image_reduced(path, target_size)


class _Images(torch.utils.data.Dataset):
    """Decode + preprocess one image per item in a worker: ``(row, preprocessed or None, error or None)``."""

    def __init__(self, root: Path, files: Sequence[str], rows: Sequence[int], preprocessor: Any, decoder: str):
        self.root, self.files, self.rows = root, files, list(rows)
        known = (*DECODERS, *SCALED_DECODERS)
        if decoder not in known:
            raise ValueError(f"decoder must be one of {', '.join(known)}, got {decoder!r}")
        self.preprocessor, self.decoder = preprocessor, decoder
        self.decode = DECODERS.get(decoder, decode_pillow)

    def _decode(self, path: Path) -> tuple[torch.Tensor, tuple[int, int] | None]:
        if self.decoder in SCALED_DECODERS:
            return decode_pillow_draft(path, lambda height, width: target_size(self.preprocessor, height, width))
        return self.decode(path), None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[int, Any, str | None]:
        row = self.rows[item]
        path = self.root / self.files[row]
        try:
            pixels, source_size = self._decode(path)
        except Exception as error:
            return row, None, " ".join(str(error).split()) or type(error).__name__
        with torch.inference_mode():
            preprocessed = preprocess_with_pillow(self.preprocessor, pixels, source_size)
            if preprocessed is None:
                preprocessed = self.preprocessor([pixels])
        if isinstance(preprocessed, torch.Tensor):
            return row, preprocessed.clone(), None
        return row, (preprocessed.patches.clone(), preprocessed.grid_thw.clone()), None


_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling.BILINEAR / BICUBIC


def target_size(preprocessor: Any, height: int, width: int) -> tuple[int, int] | None:
    """The size a Pillow-exact preprocessor resizes a ``height x width`` image to; ``None`` for other ones."""
    from kornia_siglip2.preprocess import NaFlexImagePreprocessor, SigLipImagePreprocessor, naflex_target_size

    if _PIL_RESAMPLE.get(getattr(preprocessor, "resample", None)) is None or not getattr(
        preprocessor, "pil_exact", False
    ):
        return None
    if isinstance(preprocessor, NaFlexImagePreprocessor):
        return tuple(naflex_target_size(height, width, preprocessor.patch_size, preprocessor.max_num_patches))
    if isinstance(preprocessor, SigLipImagePreprocessor):
        return tuple(preprocessor.image_size)
    return None


def preprocess_with_pillow(preprocessor: Any, pixels: torch.Tensor, source_size: tuple[int, int] | None = None) -> Any:
    """``preprocessor([pixels])`` for one uint8 image, resized by Pillow's own C code instead of its replay.

    :func:`~kornia_siglip2.resample.pil_resize` reproduces Pillow's ``Image.resize(size, resample,
    reducing_gap=None)`` bit for bit, so calling Pillow gives the same tensors (tested) at Pillow's speed; the
    workers of ``embed`` are on the CPU anyway. ``source_size``: the size of the full image when ``pixels`` is
    a reduced decode of it (:func:`decode_pillow_draft`); the target size is computed from it. Returns ``None``
    when the shortcut does not apply (float input, ``pil_exact=False``, an unknown preprocessor).
    """
    from kornia_siglip2.packing import patchify
    from kornia_siglip2.preprocess import NaFlexImagePreprocessor, PackedImages

    code = _PIL_RESAMPLE.get(getattr(preprocessor, "resample", None))
    if pixels.dtype != torch.uint8 or code is None:
        return None
    height, width = pixels.shape[-2:]
    size = target_size(preprocessor, *(source_size or (height, width)))
    if size is None:
        return None
    if tuple(size) == (height, width):
        resized = pixels
    else:
        import numpy as np
        from PIL import Image

        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        array = np.asarray(image.resize((size[1], size[0]), resample=code, reducing_gap=None))
        resized = torch.from_numpy(array.copy()).permute(2, 0, 1)
    normalized = preprocessor._normalize(resized[None].to(preprocessor.image_mean.dtype) / 255)
    if isinstance(preprocessor, NaFlexImagePreprocessor):
        return PackedImages(*patchify(normalized, preprocessor.patch_size))
    return normalized


def _first(batch: Any) -> Any:
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the main process computes


@dataclass
class EmbedJob:
    """One ``embed`` run (or one rank of it)."""

    folder: Path
    out: Path
    listing: Listing
    model_name: str
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    chunk_size: int = 1024
    batch_size: int = 32
    max_tokens: int | None = None
    workers: int = 0
    decoder: str = "pillow"
    skip_errors: bool = False
    progress: bool | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    model_sha256: str = ""
    width: int = 0

    @property
    def parts(self) -> Path:
        return Path(f"{self.out}.parts")

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.listing.files) / self.chunk_size)

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / f"chunk-{chunk:06d}.safetensors"

    def chunk_rows(self, chunk: int) -> range:
        """The rows (indices into ``listing.files``) of chunk ``chunk``."""
        return range(chunk * self.chunk_size, min(len(self.listing.files), (chunk + 1) * self.chunk_size))

    def chunk_files_sha256(self, chunk: int) -> str:
        rows = self.chunk_rows(chunk)
        return _names_sha256(self.listing.files[rows.start : rows.stop])

    def manifest(self) -> dict[str, Any]:
        return {
            "version": 2,
            "num_files": len(self.listing.files),
            "files_sha256": _names_sha256(self.listing.files),
            "model": self.model_name,
            "model_sha256": self.model_sha256,
            "width": self.width,
            "dtype": str(self.dtype).removeprefix("torch."),
            "chunk_size": self.chunk_size,
            **self.settings,
        }

    @property
    def run_id(self) -> str:
        """SHA-256 of :meth:`manifest`: every chunk of this run records it."""
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _atomic_write_all(writes: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """:func:`_atomic_write` for several files: every one is written in full before any replaces its target."""
    temporaries: list[Path] = []
    try:
        for path, write in writes:
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(handle)
            temporaries.append(Path(name))
            write(temporaries[-1])
        for (path, _), temporary in zip(writes, temporaries, strict=True):
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        raise


def _save_chunk(
    job: EmbedJob, chunk: int, embeddings: torch.Tensor, rows: list[int], skipped: list[dict[str, Any]]
) -> None:
    """Write one chunk with its provenance: the run, its index, its file slice's hash (safetensors metadata)."""
    from safetensors.torch import save_file

    tensors = {EMBED_KEY: embeddings.float().cpu().contiguous(), "rows": torch.tensor(rows, dtype=torch.int64)}
    metadata = {
        "skipped": json.dumps(skipped),
        "run": job.run_id,
        "chunk": str(chunk),
        "files_sha256": job.chunk_files_sha256(chunk),
    }
    _atomic_write(job.chunk_path(chunk), lambda temporary: save_file(tensors, temporary, metadata=metadata))


def _read_chunk(job: EmbedJob, chunk: int) -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """A kept chunk, verified: its run, index, file slice, rows and width. Raises naming the chunk file."""
    from safetensors import safe_open

    path = job.chunk_path(chunk)

    def damaged(reason: str) -> ValueError:
        return ValueError(
            f"chunk {path} cannot be used: {reason}; delete it and rerun the same command to recompute it"
        )

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            embeddings = handle.get_tensor(EMBED_KEY)
            rows_tensor = handle.get_tensor("rows")
        skipped = json.loads(metadata.get("skipped", "[]"))
    except Exception as error:  # safetensors raises its own types for a damaged header
        raise damaged(f"it is damaged ({' '.join(str(error).split()) or type(error).__name__})") from error
    if metadata.get("run") != job.run_id:
        raise damaged("it was computed by another run (other images, model, dtype or preprocessing)")
    if metadata.get("chunk") != str(chunk):
        raise damaged(f"it holds chunk {metadata.get('chunk')!r}, not {chunk} (a copied file?)")
    if metadata.get("files_sha256") != job.chunk_files_sha256(chunk):
        raise damaged("its images are not this chunk's images")
    expected = job.chunk_rows(chunk)
    rows = rows_tensor.tolist() if rows_tensor.ndim == 1 and rows_tensor.dtype == torch.int64 else None
    skipped_rows = [entry.get("row") for entry in skipped] if isinstance(skipped, list) else None
    if rows is None or skipped_rows is None or sorted(rows + skipped_rows) != list(expected):
        raise damaged(f"its rows and skipped images do not cover rows {expected.start}..{expected.stop - 1} once")
    if rows != sorted(rows):
        raise damaged("its rows are out of order")
    if tuple(embeddings.shape) != (len(rows), job.width) or embeddings.dtype != torch.float32:
        raise damaged(
            f"its embeddings are {tuple(embeddings.shape)} {embeddings.dtype}, expected ({len(rows)}, {job.width}) "
            "float32 (cut short?)"
        )
    return embeddings, rows, skipped


_MANIFEST_FIELDS = {
    "files_sha256": "the image list",
    "num_files": "the number of images",
    "model_sha256": "the model's weight or config files",
    "model": "the model name",
    "width": "the embedding width",
    "dtype": "the dtype",
    "chunk_size": "--chunk-size",
    "preprocessor": "the preprocessing options",
    "decoder": "--decoder",
}


def _prepare_parts(job: EmbedJob) -> None:
    job.parts.mkdir(parents=True, exist_ok=True)
    manifest_file = job.parts / _MANIFEST
    expected = job.manifest()
    if manifest_file.is_file():
        try:
            found = json.loads(manifest_file.read_text(encoding="utf-8"))
            get = found.get  # a JSON object
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(
                f"cannot read {manifest_file} ({' '.join(str(error).split()) or type(error).__name__}): delete "
                f"{job.parts} to start again"
            ) from error
        if found != expected:
            changed = sorted(key for key in set(found) | set(expected) if get(key) != expected.get(key))
            what = ", ".join(f"{_MANIFEST_FIELDS.get(key, key)} ({key})" for key in changed)
            raise ValueError(
                f"{job.parts} holds the chunks of a different run: changed since they were computed: {what}. Rerun "
                f"with the same folder, model and options to resume it, or delete {job.parts} to start again"
            )
        return
    text = json.dumps(expected, indent=1)
    _atomic_write(manifest_file, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _batches(
    samples: Iterator[tuple[int, Any, str | None]], job: EmbedJob, naflex: bool, chunk_of: Callable[[int], int]
) -> Iterator[tuple[int, list[int], Any, list[dict[str, str]], bool]]:
    """Group samples into forward batches (NaFlex: by token budget) that never cross a chunk boundary.

    Yields ``(chunk, rows, preprocessed batch or None, skipped, chunk_ends)``.
    """
    from kornia_siglip2.preprocess import PackedImages

    rows: list[int] = []
    items: list[Any] = []
    skipped: list[dict[str, str]] = []
    tokens = 0
    current = -1
    budget = job.max_tokens

    def flush(chunk_ends: bool) -> tuple[int, list[int], Any, list[dict[str, str]], bool]:
        nonlocal rows, items, skipped, tokens
        batch: Any = None
        if items:
            if naflex:
                batch = PackedImages(torch.cat([p for p, _ in items]), torch.cat([g for _, g in items]))
            else:
                batch = torch.cat(items)
        result = (current, rows, batch, skipped, chunk_ends)
        rows, items, skipped, tokens = [], [], [], 0
        return result

    for row, preprocessed, error in samples:
        chunk = chunk_of(row)
        if current >= 0 and chunk != current:
            yield flush(True)
        current = chunk
        if error is not None:
            if not job.skip_errors:
                raise ValueError(
                    f"cannot read image {display_name(str(job.folder / job.listing.files[row]))}: {error}; the "
                    "chunks computed so far "
                    f"are kept in {job.parts} (rerun to resume), or pass --skip-errors to skip unreadable images"
                )
            skipped.append({"file": display_name(job.listing.files[row]), "error": error, "row": row})
            continue
        size = preprocessed[0].shape[0] if naflex else 1
        over_budget = naflex and budget is not None and items and tokens + size > budget
        if len(items) >= job.batch_size or over_budget:
            yield flush(False)
        rows.append(row)
        items.append(preprocessed)
        tokens += size
    if current >= 0:
        yield flush(True)


def run_embed(job: EmbedJob, classifier: Any) -> tuple[int, int]:
    """Compute this rank's missing chunks, then merge if every chunk is there.

    Returns:
        ``(rows computed now, chunks resumed from disk)``.
    """
    from tqdm import tqdm

    _prepare_parts(job)
    mine = range(job.rank, job.num_chunks, job.world_size)
    todo = [chunk for chunk in mine if not job.chunk_path(chunk).is_file()]
    for chunk in mine:
        if chunk not in todo:
            _read_chunk(job, chunk)  # a kept chunk must be this run's, whole: else an error naming it
    resumed = len(mine) - len(todo)
    rows = [row for chunk in todo for row in job.chunk_rows(chunk)]
    naflex = classifier.model.config.is_naflex
    preprocessor = classifier.preprocessor.cpu()  # workers preprocess on the CPU; the model may be elsewhere
    dataset = _Images(job.folder, job.listing.files, rows, preprocessor, job.decoder)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_first,
        num_workers=job.workers,
        worker_init_fn=_worker_init if job.workers else None,
        prefetch_factor=4 if job.workers else None,
        persistent_workers=False,
    )
    device = classifier.device
    show = job.progress if job.progress is not None else True
    desc = "embedding images" if job.world_size == 1 else f"embedding images (rank {job.rank}/{job.world_size})"
    done = 0
    pending: list[torch.Tensor] = []
    pending_rows: list[int] = []
    pending_skipped: list[dict[str, str]] = []
    with tqdm(total=len(rows), unit="img", desc=desc, file=sys.stderr, disable=not show or not rows) as bar:
        chunk_of = lambda row: row // job.chunk_size  # noqa: E731
        for chunk, batch_rows, batch, skipped, chunk_ends in _batches(iter(loader), job, naflex, chunk_of):
            if batch is not None:
                pending.append(_encode(classifier.model, batch, device))
                pending_rows += batch_rows
            pending_skipped += skipped
            bar.update(len(batch_rows) + len(skipped))
            done += len(batch_rows)
            if chunk_ends:
                embeddings = torch.cat(pending) if pending else torch.zeros(0, job.width)
                _save_chunk(job, chunk, embeddings, pending_rows, pending_skipped)
                pending, pending_rows, pending_skipped = [], [], []
    return done, resumed


def _encode(model: Any, batch: Any, device: torch.device) -> torch.Tensor:
    """Embeddings of one preprocessed batch (float32 on the CPU), through the zero-shot module's one model call."""
    from kornia_siglip2.zero_shot import _image_embeddings

    with torch.inference_mode():
        if isinstance(batch, torch.Tensor):
            moved = batch.to(device)
        else:
            moved = type(batch)(*(tensor.to(device) for tensor in batch))
        return _image_embeddings(model, moved).float().cpu()


def rank_lock(job: EmbedJob) -> contextlib.AbstractContextManager:
    """Hold ``<out>.parts/.rank-R.lock`` while this rank runs: a second identical command is refused, not mixed in."""
    return exclusive_lock(
        job.parts / f".rank-{job.rank}.lock",
        lambda: (
            f"another embed process (rank {job.rank}) is already writing {job.parts}: wait for it to finish, "
            "or give this one another --out"
        ),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Exclusive ``flock`` on ``path``; yields False when the file's folder is gone (another rank merged)."""
    try:
        handle = open(path, "a")  # noqa: SIM115
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: ranks must not finish at the same instant
            pass
        yield True
    finally:
        handle.close()


def merge(job: EmbedJob) -> dict[str, Any] | None:
    """Write ``job.out`` from the chunks if all are there (atomically), remove the parts; ``None`` if not yet.

    Every chunk is verified first (:func:`_read_chunk`): one that is damaged, cut short, copied from another
    chunk or computed by another run is an error naming it, and nothing is written.
    """
    with _locked(job.parts / ".lock") as held:
        if not held or not (job.parts / _MANIFEST).is_file():
            return {"merged_by_other": True}
        missing = [chunk for chunk in range(job.num_chunks) if not job.chunk_path(chunk).is_file()]
        if missing:
            return None
        embeddings, rows, skipped = [], [], list(job.listing.skipped)
        for chunk in range(job.num_chunks):
            chunk_embeddings, chunk_rows, chunk_skipped = _read_chunk(job, chunk)
            embeddings.append(chunk_embeddings)
            rows += chunk_rows
            skipped += [{"file": entry["file"], "error": entry["error"]} for entry in chunk_skipped]
        matrix = torch.cat([torch.zeros(0, job.width), *embeddings]).contiguous()
        files = [display_name(job.listing.files[row]) for row in rows]
        metadata = {
            "files": files,
            "skipped": sorted(skipped, key=lambda entry: entry["file"]),
            **({"duplicates": job.listing.duplicates} if job.listing.duplicates else {}),
            "model": job.model_name,
            **({"model_fingerprint": job.model_sha256} if job.model_sha256 else {}),
            "dtype": str(job.dtype).removeprefix("torch."),
            "row_order": ROW_ORDER,
            "key": EMBED_KEY,
        }
        write_output(job.out, matrix, metadata)
        for path in job.parts.iterdir():
            if path.name != ".lock":
                path.unlink()
        (job.parts / ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            job.parts.rmdir()
        return {"embeddings": matrix, **metadata}


def sidecar_path(out: Path) -> Path:
    """The JSON file beside a ``.npy`` output that holds its metadata (``emb.npy`` -> ``emb.json``)."""
    return out.with_suffix(".json")


def write_output(out: Path, embeddings: torch.Tensor, metadata: dict[str, Any]) -> None:
    """Write the final output atomically (``.safetensors`` with metadata, or ``.npy`` + JSON sidecar)."""
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        strings = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
        strings["format"] = "pt"
        _atomic_write(out, lambda temporary: save_file({EMBED_KEY: embeddings}, temporary, metadata=strings))
        return
    import numpy as np

    def save_npy(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, embeddings.numpy())

    side = {**metadata, "shape": list(embeddings.shape), "array": out.name}
    text = json.dumps(side, indent=1)
    # both files are written in full before either replaces its predecessor: a failure while writing the array
    # (disk full, a kill) must not leave a new sidecar describing the old array
    _atomic_write_all(
        [(out, save_npy), (sidecar_path(out), lambda temporary: temporary.write_text(text, encoding="utf-8"))]
    )
