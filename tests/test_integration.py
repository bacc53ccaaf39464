"""Real-weight expected values (from transformers' integration tests, tests/models/siglip*/test_modeling_siglip*.py).

They need the checkpoints in the local Hugging Face cache; without them they are skipped with the reason.
"""

from pathlib import Path

import pytest
import torch

from kornia_siglip2 import SigLip2

pytestmark = pytest.mark.integration


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model.safetensors")
    return isinstance(found, str) and Path(found).is_file()


def _require(repo_id: str) -> None:
    if not _cached(repo_id):
        pytest.skip(f"{repo_id} is not in the local Hugging Face cache (no network here); run once online to cache it.")


def _circle_images():
    """Red background, blue circle with a green border, at three aspect ratios (transformers' test images)."""
    from PIL import Image, ImageDraw

    images = []
    for height, width in [(224, 224), (1024, 1024), (224, 1024)]:
        image = Image.new("RGB", (width, height), color="red")
        draw = ImageDraw.Draw(image)
        center_x, center_y = image.width // 2, image.height // 2
        radius = min(center_x, center_y) // 8 * 7
        box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
        draw.ellipse(box, fill="blue", outline="green", width=image.width // 20)
        images.append(image)
    return images


def test_siglip2_base_naflex_logits():
    repo_id = "google/siglip2-base-patch16-naflex"
    _require(repo_id)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(repo_id)
    texts = [
        "circle",
        "ellipsoid",
        "blue circle on red background",
        "blue circle with green border on red background",
        "green circle on red background",
        "a dog",
        "a blue dog with a green border on a red background",
    ]
    inputs = processor(text=texts, images=_circle_images(), return_tensors="pt")
    model = SigLip2.from_pretrained(repo_id)
    with torch.no_grad():
        logits_per_text = model(**inputs).logits_per_text
    expected = torch.tensor(
        [
            [1.0195, -0.0280, -1.4468],
            [-4.5395, -6.2269, -1.5667],
            [4.1757, 5.0358, 3.5159],
            [9.4264, 10.1879, 6.3353],
            [2.4409, 3.1058, 4.5491],
            [-12.3230, -13.7355, -13.4632],
            [1.1520, 1.1687, -1.9647],
        ]
    )
    torch.testing.assert_close(logits_per_text, expected, atol=1e-3, rtol=1e-3)


def test_siglip_base_224_two_cats(tmp_path):
    """Needs two things the repository does not ship: the weights in the HF cache and the COCO image file."""
    repo_id = "google/siglip-base-patch16-224"
    image_path = Path(__file__).parent / "data" / "000000039769.jpg"
    missing = []
    if not _cached(repo_id):
        missing.append(f"{repo_id} is not in the local Hugging Face cache (run once online to cache it)")
    if not image_path.is_file():
        missing.append(
            f"the COCO val2017 image 000000039769.jpg is not at {image_path} (not in the repository; "
            "download it from http://images.cocodataset.org/val2017/000000039769.jpg)"
        )
    if missing:
        pytest.skip("; ".join(missing))
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(repo_id)
    inputs = processor(
        text=["a photo of 2 cats", "a photo of 2 dogs"],
        images=Image.open(image_path),
        padding="max_length",
        return_tensors="pt",
    )
    model = SigLip2.from_pretrained(repo_id)
    with torch.no_grad():
        logits_per_image = model(**inputs).logits_per_image
    torch.testing.assert_close(logits_per_image, torch.tensor([[-0.7567, -10.3354]]), atol=1e-3, rtol=1e-3)
