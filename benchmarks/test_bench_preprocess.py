"""Image preprocessing: our Pillow-exact uint8 resize and float resize vs Pillow, and the fixed-resolution
preprocessor vs transformers' ``SiglipImageProcessor`` (PIL backend), on CPU.

Each (case, implementation) is one pytest-benchmark entry; ours' entries carry ``speedup_vs_<reference>`` in
``extra_info`` (reference median / our median, measured in the same session; > 1: ours faster). Run
``pytest benchmarks/test_bench_preprocess.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from kornia_siglip2.preprocess import SigLipImagePreprocessor
from kornia_siglip2.resample import pil_resize

# (height, width) -> (height', width'): a VGA image and a 12-megapixel phone photo to 224 x 224
RESIZES = {"vga": ((480, 640), (224, 224)), "photo12mp": ((3024, 4032), (224, 224))}
_MEDIANS: dict[tuple[str, str], float] = {}
_INFOS: dict[tuple[str, str], dict] = {}


def _image(height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _resize_runner(implementation: str, image: torch.Tensor, size: tuple[int, int]) -> Callable[[], object]:
    if implementation == "ours_uint8":
        batch = image[None]
        return lambda: pil_resize(batch, size, "bicubic")
    if implementation == "ours_float":
        batch = image[None].float() / 255
        return lambda: torch.nn.functional.interpolate(batch, size, mode="bicubic", antialias=True)
    pil = pytest.importorskip("PIL.Image")
    pil_image = pil.fromarray(image.permute(1, 2, 0).numpy())
    return lambda: pil_image.resize((size[1], size[0]), resample=3, reducing_gap=None)


def _record(benchmark, case: str, implementation: str, ours: str, reference: str) -> None:
    """Keep the median; once both of a pair are measured, write the ratio into ours' extra_info."""
    _MEDIANS[(case, implementation)] = benchmark.stats.stats.median
    _INFOS[(case, implementation)] = benchmark.extra_info
    if (case, ours) in _MEDIANS and (case, reference) in _MEDIANS:
        ratio = _MEDIANS[(case, reference)] / _MEDIANS[(case, ours)]
        _INFOS[(case, ours)][f"speedup_vs_{reference}"] = round(ratio, 3)


@pytest.mark.parametrize("implementation", ["ours_uint8", "ours_float", "pillow"])
@pytest.mark.parametrize("case", list(RESIZES))
def test_resize_bicubic(benchmark, case, implementation):
    (height, width), size = RESIZES[case]
    run = _resize_runner(implementation, _image(height, width), size)
    benchmark.pedantic(run, rounds=10 if case == "vga" else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(preprocess_case=f"resize_{case}", implementation=implementation, input=[height, width])
    _record(benchmark, case, implementation, "ours_uint8", "pillow")


@pytest.mark.parametrize("implementation", ["ours", "transformers"])
def test_fixed_preprocessor(benchmark, implementation):
    """8 VGA uint8 images -> normalized (8, 3, 224, 224) pixel values, identical in both."""
    images = [_image(480, 640) for _ in range(8)]
    if implementation == "ours":
        preprocess = SigLipImagePreprocessor(224)

        def run() -> torch.Tensor:
            return preprocess(images)

    else:
        module = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
        processor = module.SiglipImageProcessorPil(size={"height": 224, "width": 224})
        arrays = [np.ascontiguousarray(image.numpy()) for image in images]

        def run() -> torch.Tensor:
            return processor(arrays, return_tensors="pt", input_data_format="channels_first")["pixel_values"]

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(preprocess_case="fixed_preprocessor_8xvga", implementation=implementation)
    _record(benchmark, "fixed_preprocessor", implementation, "ours", "transformers")
