"""Generate the expected values of transformers' torchvision image processors (tests/test_preprocess.py).

Not run by the test suite: torchvision cannot be installed beside the project's torch. Run it in a separate
environment, e.g.::

    python3.11 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0
    /tmp/tvenv/bin/python scripts/torchvision_reference.py

and paste its output into ``TORCHVISION_REFERENCE`` of ``tests/test_preprocess.py``. Each entry is the SHA-256 of
the float32 bytes of ``pixel_values`` (bit-exact equality) plus two readable checks: the sum of the values and the
number of uint8 levels by which transformers' PIL backend differs from its torchvision backend on the same input.
The images come from ``reference_images`` (numpy's PCG64, identical in both environments).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

SIZES = [(480, 640), (100, 1000), (37, 91), (300, 300)]


def reference_images(seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients plus noise, ``(H, W, 3)`` uint8, so that resizing matters."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in SIZES:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) % 97 * 2.5], -1)
        images.append(np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8))
    return images


def digest(pixel_values: torch.Tensor) -> str:
    """SHA-256 of the float32 bytes (C order)."""
    return hashlib.sha256(pixel_values.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    """Print one TORCHVISION_REFERENCE line per (processor, image)."""
    from transformers import Siglip2ImageProcessor, SiglipImageProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    images = reference_images()
    processors = {
        "fixed": (SiglipImageProcessor(size={"height": 224, "width": 224}), SiglipImageProcessorPil),
        "naflex": (Siglip2ImageProcessor(patch_size=16, max_num_patches=256), Siglip2ImageProcessorPil),
    }
    for name, (processor, pil_class) in processors.items():
        pil = pil_class(**processor.to_dict())
        for index, image in enumerate(images):
            theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
            other = pil(images=[image], return_tensors="pt")["pixel_values"][0]
            levels = int(((theirs - other).abs() * 127.5).round().max())
            print(f'    ("{name}", {index}): ("{digest(theirs)}", {theirs.double().sum().item()!r}, {levels}),')


if __name__ == "__main__":
    main()
