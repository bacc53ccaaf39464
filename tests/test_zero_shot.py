"""ZeroShotClassifier end to end against transformers' processor + model on the same tiny checkpoints and files."""

import json
import shutil

import numpy as np
import pytest
import torch

from kornia_siglip2.demo import DEMO_LABELS, build_tiny_checkpoint, write_shape_images
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.images import load_image
from kornia_siglip2.preprocess import NaFlexImagePreprocessor, SigLipImagePreprocessor, to_padded
from kornia_siglip2.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassifier

# float32 accumulation in two different model implementations (the pixels are identical: uint8 files are resized
# with Pillow's own integer arithmetic, see tests/test_resample.py); measured max 1.2e-6 on these logits.
LOGIT_ATOL = 1e-4
PROMPTS = [DEFAULT_TEMPLATE.format(label=label) for label in DEMO_LABELS]


@pytest.fixture(scope="module")
def naflex_folder(tmp_path_factory):
    # patch 8 and 64 patches keep it fast; the demo images still get different grids
    return build_tiny_checkpoint(tmp_path_factory.mktemp("naflex"), patch_size=8, max_num_patches=64)


@pytest.fixture(scope="module")
def fixed_folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fixed"), naflex=False, patch_size=8, image_size=32, seed=1)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """The demo's shapes plus a noise image and a palette PNG with transparency (read as RGB on white)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    paths = write_shape_images(folder)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8)).save(folder / "noise.png")
    rgba = rng.integers(0, 256, (50, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    return [*paths, folder / "noise.png", folder / "transparent.png"]


@pytest.fixture(scope="module")
def naflex_classifier(naflex_folder):
    return ZeroShotClassifier.from_pretrained(naflex_folder)


def transformers_inputs(folder, files, naflex):
    """transformers' processor on the same files; its tokenizer with SigLIP 2's documented settings."""
    from transformers import Siglip2Processor, Siglip2Tokenizer, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    tokenizer = Siglip2Tokenizer.from_pretrained(folder, add_bos_token=False, add_eos_token=True, padding_side="right")
    tokenizer.model_input_names = ["input_ids"]  # SigLIP is used without a text attention mask
    if naflex:
        image_processor = Siglip2ImageProcessorPil.from_pretrained(folder)
        processor = Siglip2Processor(image_processor, tokenizer)
        # Siglip2Processor's class defaults (patch 16, 256 patches) override its image processor's config
        kwargs = {"patch_size": image_processor.patch_size, "max_num_patches": image_processor.max_num_patches}
    else:
        processor = SiglipProcessor(SiglipImageProcessorPil.from_pretrained(folder), tokenizer)
        kwargs = {"padding": "max_length", "max_length": 64, "truncation": True}
    images = [load_pil(path) for path in files]
    return processor(text=PROMPTS, images=images, return_tensors="pt", **kwargs)


def load_pil(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGBA").convert("RGB") if image.mode != "RGB" else image.copy()


class TestEndToEnd:
    def test_naflex(self, naflex_folder, naflex_classifier, image_files):
        """files -> our pipeline -> logits vs transformers' Siglip2Processor + Siglip2Model on the same files."""
        from transformers import Siglip2Model

        files = image_files[:5]  # RGB files (the transparent one is covered in TestInputs)
        reference_model = Siglip2Model.from_pretrained(naflex_folder).eval()
        reference_inputs = transformers_inputs(naflex_folder, files, naflex=True)
        classifier = naflex_classifier
        with torch.no_grad():
            packed = classifier.preprocessor([load_image(path) for path in files])
            padded = to_padded(packed, classifier.preprocessor.max_num_patches)
            input_ids = classifier.tokenizer(PROMPTS)
            ours = classifier.logits(files, DEMO_LABELS)
            reference = reference_model(**reference_inputs).logits_per_image
            # identical tensors into transformers' model: only the models differ
            same_inputs = reference_model(input_ids=input_ids, **padded._asdict()).logits_per_image
        torch.testing.assert_close(input_ids, reference_inputs["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(padded.spatial_shapes, reference_inputs["spatial_shapes"], rtol=0, atol=0)
        torch.testing.assert_close(padded.pixel_attention_mask, reference_inputs["pixel_attention_mask"])
        assert torch.equal(padded.pixel_values, reference_inputs["pixel_values"])
        torch.testing.assert_close(ours, same_inputs, rtol=0, atol=LOGIT_ATOL)
        # the acceptance: each pipeline with its own preprocessing, files to logits
        torch.testing.assert_close(ours, reference, rtol=0, atol=LOGIT_ATOL)

    def test_fixed_resolution(self, fixed_folder, image_files):
        """model_type 'siglip' (SigLIP 2 fixed resolution): bicubic resize, Gemma tokenizer, SiglipModel."""
        from transformers import SiglipModel

        files = image_files[:5]
        classifier = ZeroShotClassifier.from_pretrained(fixed_folder)
        assert isinstance(classifier.preprocessor, SigLipImagePreprocessor)
        assert classifier.tokenizer.family == "siglip2"
        reference_model = SiglipModel.from_pretrained(fixed_folder).eval()
        reference_inputs = transformers_inputs(fixed_folder, files, naflex=False)
        with torch.no_grad():
            pixel_values = classifier.preprocessor([load_image(path) for path in files])
            input_ids = classifier.tokenizer(PROMPTS)
            ours = classifier.logits(files, DEMO_LABELS)
            same_inputs = reference_model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
            reference = reference_model(**reference_inputs).logits_per_image
        torch.testing.assert_close(input_ids, reference_inputs["input_ids"], rtol=0, atol=0)
        assert torch.equal(pixel_values, reference_inputs["pixel_values"])
        torch.testing.assert_close(ours, same_inputs, rtol=0, atol=LOGIT_ATOL)
        torch.testing.assert_close(ours, reference, rtol=0, atol=LOGIT_ATOL)


class TestZeroShot:
    def test_smoke(self, naflex_classifier, image_files):
        probabilities = naflex_classifier(image_files, DEMO_LABELS)
        assert probabilities.shape == (len(image_files), len(DEMO_LABELS))
        assert ((probabilities > 0) & (probabilities < 1)).all()

    def test_sigmoid_not_softmax(self, naflex_classifier, image_files):
        logits = naflex_classifier.logits(image_files, DEMO_LABELS, template="{label}")
        probabilities = naflex_classifier(image_files, DEMO_LABELS, template="{label}")
        torch.testing.assert_close(probabilities, torch.sigmoid(logits))
        assert not torch.allclose(probabilities.sum(-1), torch.ones(len(image_files)))

    def test_template(self, naflex_classifier, image_files):
        with torch.no_grad():
            via_template = naflex_classifier.logits(image_files[:2], ["cat", "dog"], template="a {label} photo")
            image_embeds = naflex_classifier.image_features(image_files[:2])
            text_embeds = naflex_classifier.text_features(["a cat photo", "a dog photo"])
        torch.testing.assert_close(via_template, naflex_classifier.model.logits(image_embeds, text_embeds).t())

    def test_dtype(self, naflex_folder, device, dtype):
        classifier = ZeroShotClassifier.from_pretrained(naflex_folder, device=device, dtype=dtype)
        probabilities = classifier(torch.rand(2, 3, 40, 24, device=device), ["a", "b", "c"])
        assert probabilities.dtype == dtype and probabilities.device.type == device.type

    def test_gradient(self, naflex_classifier):
        """Tensor images stay differentiable through preprocessing, packing and both towers."""
        images = torch.rand(2, 3, 24, 40, requires_grad=True)
        naflex_classifier(images, ["a cat", "a dog"]).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0


class TestInputs:
    def test_forms_agree(self, naflex_classifier, image_files):
        """Paths, PIL images, uint8 and float tensors, one image or a list: the same embeddings."""
        path = image_files[1]
        pixels = load_image(path)
        with torch.no_grad():
            expected = naflex_classifier.image_features([path])
            for form in (path, str(path), load_pil(path), pixels, [pixels], pixels[None]):
                torch.testing.assert_close(naflex_classifier.image_features(form), expected, rtol=0, atol=1e-6)
            # float input takes the differentiable float resize, which uint8 input takes with pil_exact=False
            from_float = naflex_classifier.image_features(pixels.float() / 255)
            naflex_classifier.preprocessor.pil_exact = False
            try:
                float_path = naflex_classifier.image_features([path])
            finally:
                naflex_classifier.preprocessor.pil_exact = True
        torch.testing.assert_close(from_float, float_path, rtol=0, atol=1e-6)
        assert not torch.allclose(from_float, expected, rtol=0, atol=1e-6)  # Pillow's rounding does show

    def test_load_image(self, image_files):
        image = load_image(image_files[-1])  # RGBA palette file: composited on white
        assert image.shape == (3, 50, 30) and image.dtype == torch.uint8

    def test_mixed_sizes_batch_equals_one_by_one(self, naflex_classifier, image_files):
        with torch.no_grad():
            together = naflex_classifier.image_features(image_files)
            alone = torch.cat([naflex_classifier.image_features(path) for path in image_files])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


class TestRetrieval:
    def test_embed_images_batches(self, naflex_classifier, image_files, capsys):
        batched = naflex_classifier.embed_images(image_files, batch_size=2, progress=True)
        whole = naflex_classifier.embed_images(image_files, batch_size=len(image_files))
        assert batched.shape == (len(image_files), naflex_classifier.model.config.vision_config.hidden_size)
        torch.testing.assert_close(batched, whole, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(image_files)))
        assert not batched.requires_grad
        err = capsys.readouterr().err
        assert "embedding images" in err and f"{len(image_files)}/{len(image_files)}" in err

    def test_progress_auto(self, naflex_classifier, capsys):
        naflex_classifier.embed_images(torch.rand(3, 3, 16, 16), batch_size=4)  # one batch: no bar
        assert capsys.readouterr().err == ""
        naflex_classifier.embed_images(torch.rand(3, 3, 16, 16), batch_size=1)  # several batches: a bar
        assert "3/3" in capsys.readouterr().err

    def test_embed_texts(self, naflex_classifier):
        texts = [f"a photo of {count} cats" for count in range(7)]
        batched = naflex_classifier.embed_texts(texts, batch_size=3, progress=False)
        torch.testing.assert_close(batched, naflex_classifier.text_features(texts).detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.norm(dim=-1), torch.ones(7))
        assert naflex_classifier.embed_texts("one").shape == (1, batched.shape[1])


class TestFromPretrained:
    def test_derived_preprocessor(self, siglip2_checkpoint, siglip_checkpoint):
        """Checkpoints without preprocessor files: the preprocessor follows the model config."""
        naflex = ZeroShotClassifier.from_pretrained(siglip2_checkpoint, load_tokenizer=False)
        assert isinstance(naflex.preprocessor, NaFlexImagePreprocessor)
        assert (naflex.preprocessor.patch_size, naflex.preprocessor.max_num_patches) == (4, 16)
        assert naflex.tokenizer is None
        fixed = ZeroShotClassifier.from_pretrained(siglip_checkpoint, load_tokenizer=False)
        assert isinstance(fixed.preprocessor, SigLipImagePreprocessor) and fixed.preprocessor.image_size == (16, 16)

    def test_processor_config(self, siglip2_checkpoint, tmp_path):
        """transformers 5 saves processors as processor_config.json with the image processor nested."""
        folder = shutil.copytree(siglip2_checkpoint, tmp_path / "checkpoint")
        nested = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 4, "max_num_patches": 9}
        (folder / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
        classifier = ZeroShotClassifier.from_pretrained(folder, load_tokenizer=False)
        assert classifier.preprocessor.max_num_patches == 9
        overridden = ZeroShotClassifier.from_pretrained(folder, load_tokenizer=False, max_num_patches=12)
        assert overridden.preprocessor.max_num_patches == 12


class TestException:
    def test_labels_and_template(self, naflex_classifier):
        images = torch.rand(1, 3, 16, 16)
        for labels in ([], "cat", None, ["cat", 3]):
            with pytest.raises(ValueError, match="labels"):
                naflex_classifier(images, labels)
        with pytest.raises(ValueError, match="label"):
            naflex_classifier(images, ["cat"], template="a photo of {}")

    def test_images(self, naflex_classifier, tmp_path):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        with pytest.raises(ValueError, match="Cannot read image"):
            naflex_classifier(broken, ["cat"])
        with pytest.raises(FileNotFoundError, match="No image file"):
            naflex_classifier(tmp_path / "missing.png", ["cat"])
        with pytest.raises(ValueError, match="at least one"):
            naflex_classifier([], ["cat"])
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            naflex_classifier(torch.rand(1, 1, 3, 8, 8), ["cat"])
        with pytest.raises(ValueCheckError):
            naflex_classifier(torch.rand(2, 4, 8, 8), ["cat"])  # 4 channels

    def test_batch_size(self, naflex_classifier):
        with pytest.raises(ValueError, match="batch_size"):
            naflex_classifier.embed_images(torch.rand(2, 3, 8, 8), batch_size=0)
        with pytest.raises(ValueError, match="at least one"):
            naflex_classifier.embed_texts([])

    def test_no_tokenizer(self, siglip2_checkpoint):
        classifier = ZeroShotClassifier.from_pretrained(siglip2_checkpoint, load_tokenizer=False)
        assert classifier.embed_images(torch.rand(2, 3, 8, 8)).shape == (2, 32)
        with pytest.raises(ValueError, match="no tokenizer"):
            classifier(torch.rand(1, 3, 8, 8), ["cat"])
        with pytest.raises(FileNotFoundError, match="No tokenizer"):
            ZeroShotClassifier.from_pretrained(siglip2_checkpoint)

    def test_preprocessor_mismatch(self, naflex_classifier):
        with pytest.raises(ValueError, match="NaFlexImagePreprocessor"):
            ZeroShotClassifier(naflex_classifier.model, SigLipImagePreprocessor(16))

    def test_unknown_model(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            ZeroShotClassifier.from_pretrained(tmp_path / "no_such_model", local_files_only=True)


def test_attention_mask_as_transformers_pipeline(naflex_folder, image_files, tmp_path):
    """A checkpoint whose tokenizer returns an attention mask: scores equal transformers' zero-shot pipeline's."""
    from transformers import pipeline

    folder = tmp_path / "masked"
    shutil.copytree(naflex_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("model_input_names", None)  # Siglip2Tokenizer's default: input_ids and attention_mask
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    labels = ["red circle", "blue square", "a dog"]
    scores = pipeline("zero-shot-image-classification", model=str(folder))(str(image_files[0]), candidate_labels=labels)
    expected = torch.tensor([[next(s["score"] for s in scores if s["label"] == label) for label in labels]])
    classifier = ZeroShotClassifier.from_pretrained(folder)
    assert classifier.tokenizer.returns_attention_mask
    assert set(classifier.tokenizer.encode(["a dog"])) == {"input_ids", "attention_mask"}
    torch.testing.assert_close(classifier(image_files[0], labels), expected, rtol=0, atol=1e-5)
    # the mask matters here: without it the scores move
    prompts = [DEFAULT_TEMPLATE.format(label=label) for label in labels]
    with torch.no_grad():
        text_embeds = classifier.model.encode_text(classifier.tokenizer(prompts), normalize=True)
        unmasked = torch.sigmoid(classifier.model.logits(classifier.image_features(image_files[0]), text_embeds).t())
    assert (unmasked - expected).abs().max() > 1e-3
