"""SigLipTokenizer against transformers' SiglipProcessor / Siglip2Processor on tiny tokenizers built here."""

import shutil

import pytest
import torch

from kornia_siglip2.demo import build_siglip2_tokenizer, build_siglip_tokenizer
from kornia_siglip2.tokenizer import SigLipTokenizer, tokenizer_family

# upper case, punctuation, repeated whitespace, accents, an empty string and texts longer than 64 tokens
TEXTS = [
    "This is a photo of a RED Circle.",
    "Hello, World!!! What's up? (a cat; a dog)",
    "  Multiple   spaces\tand\nnewlines  ",
    "Ärger über café crème",
    "",
    "a " * 80 + "dog",
    "The quick brown fox jumps over the lazy dog. " * 10,
]


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """SigLIP v1 tokenizer (SentencePiece) next to the tiny SiglipModel's config.json."""
    return build_siglip_tokenizer(tmp_path_factory.mktemp("siglip_tokenizer"))


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    """SigLIP 2 tokenizer as the NaFlex hub checkpoints load in transformers 5 (Siglip2Tokenizer)."""
    return build_siglip2_tokenizer(tmp_path_factory.mktemp("siglip2_tokenizer"))


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, siglip_checkpoint):
    """SigLIP 2 fixed resolution: model_type 'siglip' with a plain Gemma tokenizer (transformers' defaults)."""
    folder = build_siglip2_tokenizer(tmp_path_factory.mktemp("gemma_tokenizer"), tokenizer_class="GemmaTokenizer")
    shutil.copy(siglip_checkpoint / "config.json", folder / "config.json")
    return folder


def siglip_processor_ids(folder, texts):
    from transformers import SiglipProcessor, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(), tokenizer=SiglipTokenizer.from_pretrained(folder)
    )
    # the settings of the SigLIP model cards
    return processor(text=texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids


def siglip2_processor_ids(tokenizer, texts):
    from transformers import Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    processor = Siglip2Processor(image_processor=Siglip2ImageProcessorPil(), tokenizer=tokenizer)
    # Siglip2Processor's defaults are the documented ones: padding="max_length", truncation, max_length=64
    return processor(text=texts, return_tensors="pt").input_ids


class TestSigLip:
    def test_smoke(self, siglip_folder):
        tokenizer = SigLipTokenizer.from_pretrained(siglip_folder)
        assert tokenizer.family == "siglip"
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1  # pad = </s>
        assert repr(tokenizer) == "SigLipTokenizer(family='siglip', class=SiglipTokenizer, max_length=64)"

    def test_matches_processor(self, siglip_folder):
        ours = SigLipTokenizer.from_pretrained(siglip_folder)(TEXTS)
        torch.testing.assert_close(ours, siglip_processor_ids(siglip_folder, TEXTS), rtol=0, atol=0)

    def test_rules(self, siglip_folder):
        tokenizer = SigLipTokenizer.from_pretrained(siglip_folder)
        # lowercase and punctuation stripped: the same ids whatever the case and punctuation
        torch.testing.assert_close(tokenizer("A RED, circle!"), tokenizer("a red circle"), rtol=0, atol=0)
        ids = tokenizer(["a red circle", "a " * 80])
        length = int((ids[0] != tokenizer.eos_token_id).sum())
        assert ids[0, length] == tokenizer.eos_token_id  # </s> appended, then </s> padding
        assert ids[1, -1] == tokenizer.eos_token_id  # truncated texts keep their </s>
        assert (ids[1, :-1] != tokenizer.eos_token_id).all()


class TestSigLip2:
    def test_smoke(self, siglip2_folder):
        tokenizer = SigLipTokenizer.from_pretrained(siglip2_folder)
        assert tokenizer.family == "siglip2"
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
        assert tokenizer.vocab_size == 99

    def test_matches_processor(self, siglip2_folder):
        from transformers import AutoTokenizer

        ours = SigLipTokenizer.from_pretrained(siglip2_folder)(TEXTS)
        expected = siglip2_processor_ids(AutoTokenizer.from_pretrained(siglip2_folder), TEXTS)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)

    def test_rules(self, siglip2_folder):
        tokenizer = SigLipTokenizer.from_pretrained(siglip2_folder)
        torch.testing.assert_close(tokenizer("A RED Circle"), tokenizer("a red circle"), rtol=0, atol=0)
        ids = tokenizer(["a red circle", "a " * 80])
        content = int((ids[0] != tokenizer.pad_token_id).sum())
        assert ids[0, content - 1] == tokenizer.eos_token_id  # EOS, then <pad> on the right
        assert (ids[0, content:] == tokenizer.pad_token_id).all()
        assert tokenizer.tokenizer.bos_token_id not in ids  # no BOS
        assert ids[1, -1] == tokenizer.eos_token_id  # truncated texts keep their EOS

    def test_plain_gemma_tokenizer_gets_the_rules(self, gemma_folder):
        """model_type 'siglip' + GemmaTokenizer: the family comes from the class, the rules are enforced."""
        from transformers import AutoTokenizer, Siglip2Tokenizer

        plain = AutoTokenizer.from_pretrained(gemma_folder)
        assert type(plain).__name__ == "GemmaTokenizer"
        tokenizer = SigLipTokenizer.from_pretrained(gemma_folder)
        assert tokenizer.family == "siglip2"
        reference = Siglip2Tokenizer.from_pretrained(
            gemma_folder, add_bos_token=False, add_eos_token=True, padding_side="right"
        )
        expected = siglip2_processor_ids(reference, TEXTS)
        torch.testing.assert_close(tokenizer(TEXTS), expected, rtol=0, atol=0)
        # without the rules (no lowercase, no EOS, left padding) the ids differ
        assert not torch.equal(siglip2_processor_ids(plain, TEXTS), expected)


class TestCardinality:
    @pytest.mark.parametrize("max_length", [8, 64])
    def test_shape(self, siglip_folder, siglip2_folder, max_length):
        for folder in (siglip_folder, siglip2_folder):
            tokenizer = SigLipTokenizer.from_pretrained(folder, max_length=max_length)
            ids = tokenizer(TEXTS)
            assert ids.shape == (len(TEXTS), max_length)
            assert ids.dtype == torch.int64
            assert tokenizer("one text").shape == (1, max_length)
            assert int(ids.max()) < tokenizer.vocab_size <= 99  # fits the tiny model's vocabulary

    def test_max_length_from_config(self, gemma_folder):
        # the tiny checkpoint's text tower has max_position_embeddings = 64
        assert SigLipTokenizer.from_pretrained(gemma_folder).max_length == 64


class TestException:
    def test_no_tokenizer_files(self, siglip2_checkpoint):
        with pytest.raises(FileNotFoundError, match="No tokenizer"):
            SigLipTokenizer.from_pretrained(siglip2_checkpoint)

    def test_unsupported_class(self):
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import PreTrainedTokenizerFast

        other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
        with pytest.raises(ValueError, match="Unsupported tokenizer class"):
            tokenizer_family(other)
        with pytest.raises(ValueError, match="Unsupported tokenizer class"):
            SigLipTokenizer(other)

    def test_bad_texts(self, siglip2_folder):
        tokenizer = SigLipTokenizer.from_pretrained(siglip2_folder)
        with pytest.raises(TypeError, match="list of strings"):
            tokenizer(["a", 3])
        with pytest.raises(TypeError, match="list of strings"):
            tokenizer(None)
        with pytest.raises(ValueError, match="at least one"):
            tokenizer([])

    def test_bad_max_length(self, siglip2_folder):
        from transformers import AutoTokenizer

        with pytest.raises(ValueError, match="max_length"):
            SigLipTokenizer(AutoTokenizer.from_pretrained(siglip2_folder), max_length=0)

    def test_unknown_path(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            SigLipTokenizer.from_pretrained(tmp_path / "missing", local_files_only=True)
