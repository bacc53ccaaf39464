"""The inputs people pass (numpy, PIL, tensors, paths) against transformers' processor; no autograd unless asked;
quiet loading; 16-bit images."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from kornia_siglip2._demo import DEMO_LABELS, build_tiny_checkpoint
from kornia_siglip2.images import image_tensor
from kornia_siglip2.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassifier

PROMPTS = [DEFAULT_TEMPLATE.format(label=label) for label in DEMO_LABELS]
LOGIT_ATOL = 1e-4  # two float32 implementations on identical pixels (see tests/test_zero_shot.py)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        "naflex": build_tiny_checkpoint(tmp_path_factory.mktemp("naflex"), patch_size=8, max_num_patches=64),
        "fixed": build_tiny_checkpoint(tmp_path_factory.mktemp("fixed"), naflex=False, patch_size=8, image_size=32),
    }


@pytest.fixture(scope="module")
def classifiers(folders):
    return {name: ZeroShotClassifier.from_pretrained(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth + noisy RGB image saved as PNG, and a JPEG of it with EXIF orientation 6 (rotate 90 degrees)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:45, 0:70]
    pixels = np.stack([x * 3.5, y * 5.0, (x + y) * 2.0], -1) + rng.normal(0, 25, (45, 70, 3))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("photo")
    Image.fromarray(pixels).save(folder / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif, quality=95)
    return pixels, folder / "photo.png", folder / "rotated.jpg"


def transformers_logits(folder, naflex, images, **processor_kwargs):
    """transformers' processor + model on ``images`` as given (numpy, PIL, tensors)."""
    from transformers import Siglip2Model, Siglip2Processor, Siglip2Tokenizer, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    tokenizer = Siglip2Tokenizer.from_pretrained(folder, add_bos_token=False, add_eos_token=True, padding_side="right")
    tokenizer.model_input_names = ["input_ids"]
    if naflex:
        image_processor = Siglip2ImageProcessorPil.from_pretrained(folder)
        processor = Siglip2Processor(image_processor, tokenizer)
        kwargs = {"patch_size": image_processor.patch_size, "max_num_patches": image_processor.max_num_patches}
        model = Siglip2Model.from_pretrained(folder).eval()
    else:
        processor = SiglipProcessor(SiglipImageProcessorPil.from_pretrained(folder), tokenizer)
        kwargs = {"padding": "max_length", "max_length": 64, "truncation": True}
        model = SiglipModel.from_pretrained(folder).eval()
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", **kwargs, **processor_kwargs)
    with torch.no_grad():
        return model(**inputs).logits_per_image


@pytest.mark.parametrize("kind", ["naflex", "fixed"])
def test_input_kinds_match_transformers(kind, folders, classifiers, photo):
    """numpy HWC / CHW uint8, grey numpy, PIL, CHW uint8 tensors and paths: same logits as transformers' processor
    given the same object."""
    from PIL import Image

    pixels, png, _ = photo
    grey = pixels[..., 1].copy()
    cases = {
        "numpy HWC uint8": [pixels],
        "numpy CHW uint8": [np.ascontiguousarray(pixels.transpose(2, 0, 1))],
        "PIL": [Image.fromarray(pixels)],
        "tensor CHW uint8": [torch.from_numpy(pixels).permute(2, 0, 1).contiguous()],
    }
    classifier = classifiers[kind]
    for name, images in cases.items():
        theirs = transformers_logits(folders[kind], kind == "naflex", images)
        ours = classifier.logits(images, DEMO_LABELS)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGIT_ATOL, msg=name)
    # grey arrays (transformers' processor rejects them, and grey PIL images) are read as its load_image reads a
    # grey file: converted to RGB, the value repeated
    theirs = transformers_logits(folders[kind], kind == "naflex", [Image.fromarray(grey).convert("RGB")])
    for form in (grey, grey[..., None], grey[None]):
        torch.testing.assert_close(classifier.logits([form], DEMO_LABELS), theirs, rtol=0, atol=LOGIT_ATOL)
    # a path is read as transformers' load_image reads it
    from transformers.image_utils import load_image as hf_load_image

    theirs = transformers_logits(folders[kind], kind == "naflex", [hf_load_image(str(png))])
    torch.testing.assert_close(classifier.logits([png], DEMO_LABELS), theirs, rtol=0, atol=LOGIT_ATOL)


def test_float_tensor_matches_transformers_without_rescale(folders, classifiers, photo):
    """A float (3, H, W) tensor in [0, 1] is what transformers sees with do_rescale=False (its own torch resize
    differs from ours by the antialias kernel only: compared on the fixed path without resize)."""
    pixels, _, _ = photo
    classifier = classifiers["fixed"]
    square = torch.from_numpy(pixels[:32, :32]).permute(2, 0, 1).float() / 255  # already 32 x 32: no resize
    theirs = transformers_logits(folders["fixed"], False, [square.numpy()], do_rescale=False)
    torch.testing.assert_close(classifier.logits([square], DEMO_LABELS), theirs, rtol=0, atol=LOGIT_ATOL)
    uint8 = classifier.logits([(square * 255).round().to(torch.uint8)], DEMO_LABELS)
    torch.testing.assert_close(classifier.logits([square], DEMO_LABELS), uint8, rtol=0, atol=LOGIT_ATOL)


def test_exif_orientation(folders, classifiers, photo):
    """A JPEG with EXIF orientation 6, by path and as a PIL image: rotated, as transformers' load_image does."""
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    _, _, rotated = photo
    theirs = transformers_logits(folders["naflex"], True, [hf_load_image(str(rotated))])
    classifier = classifiers["naflex"]
    with Image.open(rotated) as opened:
        opened.load()
        assert image_tensor(opened).shape == (3, 70, 45)  # portrait after the rotation
        torch.testing.assert_close(classifier.logits([opened], DEMO_LABELS), theirs, rtol=0, atol=LOGIT_ATOL)
    torch.testing.assert_close(classifier.logits([rotated], DEMO_LABELS), theirs, rtol=0, atol=LOGIT_ATOL)


def test_embedding_api_takes_every_kind(classifiers, photo):
    from PIL import Image

    pixels, png, _ = photo
    classifier = classifiers["naflex"]
    forms = [pixels, Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1), png, str(png)]
    embeddings = classifier.embed_images(forms, batch_size=2)
    torch.testing.assert_close(embeddings, embeddings[:1].expand_as(embeddings), rtol=0, atol=1e-6)


def test_bad_inputs_say_what_to_do(classifiers):
    classifier = classifiers["naflex"]
    with pytest.raises(ValueError, match=r"images\[0\].*permute\(2, 0, 1\)"):
        classifier.image_features([torch.zeros(20, 30, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"4 channels.*alpha"):
        classifier.image_features([np.zeros((20, 30, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"dtype uint16.*uint8"):
        classifier.image_features([np.zeros((20, 30, 3), dtype=np.uint16)])
    with pytest.raises(TypeError, match=r"images\[1\].*path, a PIL image, a numpy array"):
        classifier.image_features([np.zeros((20, 30, 3), dtype=np.uint8), 3.5])


class TestAutograd:
    def test_no_graph_by_default(self, classifiers):
        classifier = classifiers["naflex"]
        images = torch.rand(2, 3, 24, 40)
        outputs = [
            classifier(images, ["a", "b"]),
            classifier.logits(images, ["a", "b"]),
            classifier.image_features(images),
            classifier.text_features(["a"]),
            classifier.embed_images(images),
            classifier.embed_texts(["a"]),
        ]
        assert all(output.grad_fn is None and not output.requires_grad for output in outputs)

    def test_gradients_when_asked(self, classifiers):
        classifier = classifiers["naflex"]
        images = torch.rand(2, 3, 24, 40, requires_grad=True)  # an input that requires grad asks for them
        classifier(images, ["a cat"]).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        classifier.zero_grad()
        probabilities = classifier(torch.rand(2, 3, 24, 40), ["a cat"], grad=True)  # fine-tuning
        probabilities.sum().backward()
        assert classifier.model.logit_scale.grad is not None
        classifier.zero_grad()
        assert classifier(images, ["a"], grad=False).grad_fn is None


class TestQuietLoading:
    def test_from_pretrained_prints_nothing(self, folders):
        code = (
            "import sys\nfrom kornia_siglip2 import ZeroShotClassifier\n"
            f"ZeroShotClassifier.from_pretrained({str(folders['naflex'])!r})\n"
            f"ZeroShotClassifier.from_pretrained({str(folders['fixed'])!r})\n"
            "from transformers import logging\nprint(logging.get_verbosity())\n"
        )
        env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}
        env["HF_HUB_OFFLINE"] = "1"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.strip() == "30"  # transformers' WARNING level is left as it was
        # asked for: the messages come back, the ones transformers itself prints when it loads these tokenizers
        # (which messages those are depends on the release: 5.24 warns about `bos_token_id`, 5.6 says nothing)
        env["TRANSFORMERS_VERBOSITY"] = "warning"
        asked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert asked.returncode == 0, asked.stderr
        reference_code = "from transformers import AutoTokenizer\n" + "".join(
            f"AutoTokenizer.from_pretrained({str(folders[name])!r})\n" for name in ("naflex", "fixed")
        )
        reference = subprocess.run(
            [sys.executable, "-c", reference_code], capture_output=True, text=True, env=env, timeout=120
        )
        assert reference.returncode == 0, reference.stderr
        for line in reference.stderr.splitlines():
            assert line in asked.stderr, (line, asked.stderr)


def test_sixteen_bit_png_warns(tmp_path, classifiers):
    from PIL import Image

    path = tmp_path / "depth.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    with pytest.warns(UserWarning, match=r"depth\.png.*clips every value above 255"):
        classifiers["naflex"].image_features([path])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classifiers["naflex"].image_features([np.zeros((8, 8, 3), dtype=np.uint8)])  # 8-bit: no warning
