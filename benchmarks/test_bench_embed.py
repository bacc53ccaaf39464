"""End-to-end embedding of a folder of photos: files -> decode -> preprocess -> encode -> embeddings file, on CPU.

ours: the ``embed`` command's pipeline (``kornia_siglip2._embed``: decoding + NaFlex preprocessing in DataLoader
workers, token-budget packed batches, chunks, one output file). transformers: the loop a user writes with its
processor and model (``load_image`` -> ``Siglip2ImageProcessor`` (PIL backend) in batches of 32 ->
``get_image_features`` -> normalize -> one safetensors file). Same checkpoint, same dtype, same files; model
loading is outside the timing for both. Two dtypes: float32, and bfloat16 where the CPU has native bf16 matmul
(what ``--dtype auto`` picks there; skipped elsewhere). ``ours-draft`` is ours with ``--decoder pillow-draft``
(JPEGs decoded at a reduced scale: not pixel-exact, its embeddings' smallest cosine to the exact ones is in
``extra_info``). Ours' entries get ``speedup_vs_transformers`` (reference median / our median, images/s ratio)
in ``extra_info``; the target of the speed issue is >= 1.5x.

A second benchmark times the JPEG decoders alone (Pillow vs ``kornia_rs``) on the same photos.

Knobs: ``BENCH_EMBED_IMAGES`` (default 200 photos), ``BENCH_EMBED_WORKERS`` (default: the CLI's default).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.machine import cpu_description, load_average

NUM_IMAGES = int(os.environ.get("BENCH_EMBED_IMAGES", "200"))
# (height, width) of phone / camera photos and web images, both orientations
PHOTO_SIZES = (
    (3024, 4032),
    (4032, 3024),
    (1080, 1920),
    (1920, 1080),
    (768, 1024),
    (1200, 1200),
    (600, 800),
    (480, 640),
)
BATCH_SIZE = 32
_MEDIANS: dict[tuple[str, str], float] = {}
_INFOS: dict[tuple[str, str], dict] = {}


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like image: smooth colour gradients, a few shapes and sensor-like noise (JPEG sizes of real photos)."""
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    from PIL import Image

    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        height, width = PHOTO_SIZES[index % len(PHOTO_SIZES)]
        scale = rng.uniform(0.5, 1.0) if height * width > 2e6 else 1.0  # vary the big ones
        height, width = int(height * scale), int(width * scale)
        sub = folder / f"album{index % 4}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(_photo(rng, height, width)).save(sub / f"img{index:04d}.jpg", quality=88)
    return folder


@pytest.fixture
def naflex_checkpoint(checkpoint, encoder_size) -> Path:
    """The session's random Siglip2Model of this size (benchmarks/conftest.py), written once."""
    return checkpoint("siglip2", encoder_size)


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.jpg"))


def _ours(folder: Path, checkpoint: Path, out: Path, dtype: torch.dtype, decoder: str = "pillow"):
    from kornia_siglip2 import _embed as embed
    from kornia_siglip2.zero_shot import ZeroShotClassifier

    classifier = ZeroShotClassifier.from_pretrained(checkpoint, load_tokenizer=False, dtype=dtype)
    workers = int(os.environ.get("BENCH_EMBED_WORKERS", max(1, min(8, os.cpu_count() or 1))))
    listing = embed.list_images(folder)

    def run():
        shutil.rmtree(f"{out}.parts", ignore_errors=True)
        job = embed.EmbedJob(
            folder=folder,
            out=out,
            listing=listing,
            model_name=str(checkpoint),
            dtype=dtype,
            batch_size=BATCH_SIZE,
            max_tokens=BATCH_SIZE * classifier.preprocessor.max_num_patches,
            workers=workers,
            decoder=decoder,
            progress=False,
            width=classifier.model.config.vision_config.hidden_size,  # what the CLI sets: merge checks every chunk's
        )
        embed.run_embed(job, classifier)
        return embed.merge(job)["embeddings"]

    return run


def _transformers(folder: Path, checkpoint: Path, out: Path, dtype: torch.dtype):
    from safetensors.torch import save_file
    from transformers import Siglip2Model
    from transformers.image_utils import load_image
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    model = Siglip2Model.from_pretrained(checkpoint, dtype=dtype).eval()
    vision = model.config.vision_config
    processor = Siglip2ImageProcessorPil(patch_size=vision.patch_size, max_num_patches=vision.num_patches)
    files = _files(folder)

    def run():
        embeddings = []
        with torch.inference_mode():
            for start in range(0, len(files), BATCH_SIZE):
                images = [load_image(str(path)) for path in files[start : start + BATCH_SIZE]]
                inputs = processor(images=images, return_tensors="pt")
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                features = model.get_image_features(**inputs)
                pooled = features if isinstance(features, torch.Tensor) else features.pooler_output
                embeddings.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        matrix = torch.cat(embeddings).contiguous()
        save_file({"image_embeds": matrix}, out, metadata={"files": "\n".join(map(str, files))})
        return matrix

    return run


def _record(benchmark, case: str, implementation: str) -> None:
    _MEDIANS[(case, implementation)] = benchmark.stats.stats.median
    _INFOS[(case, implementation)] = benchmark.extra_info
    reference = "transformers" if case.startswith("embed") else "pillow"
    for ours in ("ours", "ours-draft", "kornia_rs"):
        if (case, ours) in _MEDIANS and (case, reference) in _MEDIANS:
            ratio = _MEDIANS[(case, reference)] / _MEDIANS[(case, ours)]
            _INFOS[(case, ours)][f"speedup_vs_{reference}"] = round(ratio, 3)
            print(f"\n{case}: {ours} {ratio:.2f}x {reference} (images/s ratio)")


_EXACT: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", ["ours", "ours-draft", "transformers"])
def test_embed_folder(benchmark, photos, naflex_checkpoint, encoder_size, implementation, dtype, tmp_path):
    from kornia_siglip2._embed import cpu_has_native_bf16

    if dtype == "bfloat16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 matmul (AMX / AVX512-BF16): --dtype auto picks float32 here")
    torch_dtype = getattr(torch, dtype)
    out = tmp_path / "e.safetensors"
    if implementation == "transformers":
        run = _transformers(photos, naflex_checkpoint, out, torch_dtype)
    else:
        decoder = "pillow-draft" if implementation == "ours-draft" else "pillow"
        run = _ours(photos, naflex_checkpoint, out, torch_dtype, decoder)
    rounds = int(os.environ.get("BENCH_ROUNDS", 3))
    result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1 if encoder_size == "tiny" else 0)
    assert result.shape[0] == NUM_IMAGES
    case = f"embed_{encoder_size}_{dtype}"
    benchmark.extra_info.update(
        embed_case=case,
        size=encoder_size,
        implementation=implementation,
        images=NUM_IMAGES,
        images_per_s=round(NUM_IMAGES / benchmark.stats.stats.median, 2),
        dtype=dtype,
        threads=torch.get_num_threads(),
        cpu=cpu_description(),
        load_average=load_average(),
    )
    if implementation == "ours":
        _EXACT[case] = result
    elif implementation == "ours-draft" and case in _EXACT:
        cosine = (torch.nn.functional.normalize(result, dim=-1) * _EXACT[case]).sum(-1)
        benchmark.extra_info["min_cos_vs_exact_decode"] = round(cosine.min().item(), 6)
    _record(benchmark, case, implementation)


@pytest.mark.parametrize("implementation", ["kornia_rs", "pillow"])
def test_decode_jpeg(benchmark, photos, implementation):
    from kornia_siglip2 import _embed as embed

    files = _files(photos)[:40]
    decode = embed.decode_kornia_rs if implementation == "kornia_rs" else embed.decode_pillow
    benchmark.pedantic(lambda: [decode(path) for path in files], rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(decode_case="decode_jpeg", implementation=implementation, images=len(files))
    _record(benchmark, "decode_jpeg", implementation)
