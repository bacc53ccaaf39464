"""Tiny offline assets for the demo and the tests: tokenizer files, a random checkpoint, images of shapes.

Nothing here downloads anything. The tokenizers are trained in well under a second on :data:`TINY_CORPUS`
with the same pipelines as the real ones (SentencePiece for SigLIP, Gemma-style byte-fallback BPE for SigLIP 2),
so ``transformers`` loads them with its own SigLIP / SigLIP 2 classes. Needs the ``dev`` (or ``text``)
extra: ``transformers``, ``sentencepiece``, ``tokenizers``, and ``pillow`` for the images.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEMO_LABELS",
    "DEMO_SHAPES",
    "TINY_CORPUS",
    "build_siglip2_tokenizer",
    "build_siglip_tokenizer",
    "build_tiny_checkpoint",
    "write_shape_images",
]

#: Lower-case, punctuation-free sentences the tiny tokenizers are trained on.
TINY_CORPUS = (
    "this is a photo of a red circle",
    "this is a photo of a blue square",
    "this is a photo of a green triangle",
    "this is a photo of a yellow ring",
    "a blue square on a white background",
    "a photo of two cats and a dog",
    "the quick brown fox jumps over the lazy dog",
    "zero one two three four five six seven eight nine",
)

#: ``(file stem, label, height, width)`` of the demo images: square, landscape, very wide and tall.
DEMO_SHAPES = (
    ("red_circle", "red circle", 224, 224),
    ("blue_square", "blue square", 480, 640),
    ("green_triangle", "green triangle", 120, 720),
    ("yellow_ring", "yellow ring", 600, 200),
)

#: Labels the demo scores every image against.
DEMO_LABELS = tuple(label for _, label, _, _ in DEMO_SHAPES)

_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (240, 210, 20)}


def build_siglip_tokenizer(folder: str | Path, vocab_size: int = 99) -> Path:
    """Write a tiny SigLIP (v1) tokenizer: a SentencePiece unigram model saved by ``SiglipTokenizer``.

    Special pieces as in the real ``spiece.model``: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no BOS.

    Args:
        folder: where ``spiece.model`` and ``tokenizer_config.json`` are written (created if needed).
        vocab_size: upper bound of the vocabulary (the corpus gives ~50 pieces; ids stay below it).

    Returns:
        ``folder``.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> folder = build_siglip_tokenizer(tempfile.mkdtemp())
        >>> type(AutoTokenizer.from_pretrained(folder)).__name__
        'SiglipTokenizer'
    """
    import sentencepiece
    from transformers import SiglipTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,  # the corpus is too small to fill the requested vocabulary
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    spiece = folder / "spiece.model"
    spiece.write_bytes(model.getvalue())
    SiglipTokenizer(vocab_file=str(spiece)).save_pretrained(folder)
    return folder


def build_siglip2_tokenizer(
    folder: str | Path, vocab_size: int = 99, tokenizer_class: str = "Siglip2Tokenizer"
) -> Path:
    """Write a tiny SigLIP 2 tokenizer: Gemma-style BPE with byte fallback, trained on :data:`TINY_CORPUS`.

    Special tokens as Gemma: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3, ``<mask>`` = 4.

    Args:
        folder: where ``tokenizer.json`` and ``tokenizer_config.json`` are written (created if needed).
        vocab_size: vocabulary size including the special tokens.
        tokenizer_class: ``"Siglip2Tokenizer"`` saves it as the SigLIP 2 hub checkpoints load in transformers 5
            (lowercase, EOS appended, no BOS, right padding, no attention mask, as transformers' conversion
            script sets them);
            ``"GemmaTokenizer"`` saves a plain Gemma tokenizer with transformers' defaults (no lowercase, no
            EOS, left padding), the case :class:`~kornia_siglip2.tokenizer.SigLipTokenizer` has to fix.

    Returns:
        ``folder``.

    Raises:
        ValueError: an unknown ``tokenizer_class``.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> folder = build_siglip2_tokenizer(tempfile.mkdtemp())
        >>> tokenizer = AutoTokenizer.from_pretrained(folder)
        >>> type(tokenizer).__name__, tokenizer("A Red circle").input_ids[-1] == tokenizer.eos_token_id
        ('Siglip2Tokenizer', True)
    """
    from tokenizers import Tokenizer, normalizers, trainers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer, Siglip2Tokenizer

    if tokenizer_class not in ("Siglip2Tokenizer", "GemmaTokenizer"):
        raise ValueError(f"tokenizer_class must be 'Siglip2Tokenizer' or 'GemmaTokenizer', got {tokenizer_class!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # train with Gemma's normalization (spaces become "▁", no pre-tokenizer split) so the merges fit its pipeline
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    special_tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    trainer_tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    state = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in state["merges"]]
    if tokenizer_class == "Siglip2Tokenizer":
        # transformers' convert_siglip2_to_hf.py settings; no attention_mask: SigLIP never uses one
        tokenizer: Any = Siglip2Tokenizer(
            vocab=state["vocab"],
            merges=merges,
            add_bos_token=False,
            add_eos_token=True,
            padding_side="right",
            model_input_names=["input_ids"],
        )
    else:
        tokenizer = GemmaTokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.save_pretrained(folder)
    return folder


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value (zero biases, unit norms), so parity checks see all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        # scale ~10 and a bias near 0 spread the sigmoid probabilities of random embeddings
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(0.0)


def build_tiny_checkpoint(
    folder: str | Path,
    *,
    naflex: bool = True,
    seed: int = 0,
    patch_size: int = 16,
    max_num_patches: int = 256,
    image_size: int = 64,
) -> Path:
    """Write a complete tiny random SigLIP 2 checkpoint with transformers: weights, tokenizer, preprocessor.

    Args:
        folder: output folder (created if needed).
        naflex: ``Siglip2Model`` (NaFlex, ``Siglip2ImageProcessor``) or ``SiglipModel`` (fixed resolution,
            ``SiglipImageProcessor``; the SigLIP 2 fixed-resolution layout, with the Gemma tokenizer).
        seed: weight seed.
        patch_size: patch side :math:`p`.
        max_num_patches: NaFlex patch budget; also the size of the position table (a perfect square).
        image_size: fixed-resolution side (``naflex=False``).

    Returns:
        ``folder``, holding ``config.json``, ``model.safetensors``, ``preprocessor_config.json``,
        ``tokenizer.json`` and ``tokenizer_config.json``.

    Example:
        >>> import tempfile
        >>> folder = build_tiny_checkpoint(tempfile.mkdtemp())
        >>> sorted(path.name for path in folder.iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['config.json', 'model.safetensors', 'preprocessor_config.json', 'tokenizer.json',
         'tokenizer_config.json']
    """
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    folder = Path(folder)
    build_siglip2_tokenizer(folder, tokenizer_class="Siglip2Tokenizer" if naflex else "GemmaTokenizer")
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    width = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text = dict(width, vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    if naflex:
        vision = dict(width, patch_size=patch_size, num_patches=max_num_patches)
        model: Any = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        processor: Any = Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=max_num_patches)
    else:
        vision = dict(width, patch_size=patch_size, image_size=image_size)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    _perturb(model.eval(), seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def write_shape_images(folder: str | Path) -> list[Path]:
    """Draw one coloured shape per :data:`DEMO_SHAPES` entry on a white background and save it as PNG.

    Args:
        folder: output folder (created if needed).

    Returns:
        the PNG paths, in :data:`DEMO_SHAPES` order; sizes 224x224, 480x640, 120x720 and 600x200 (H x W).

    Example:
        >>> import tempfile
        >>> [path.name for path in write_shape_images(tempfile.mkdtemp())]
        ['red_circle.png', 'blue_square.png', 'green_triangle.png', 'yellow_ring.png']
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, label, height, width in DEMO_SHAPES:
        colour_name, shape = label.split()
        colour = _COLOURS[colour_name]
        image = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        side = 0.8 * min(height, width)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(left, top + side), (left + side, top + side), (left + side / 2, top)], fill=colour)
        else:  # ring
            draw.ellipse(box, outline=colour, width=max(2, round(side / 8)))
        path = folder / f"{stem}.png"
        image.save(path)
        paths.append(path)
    return paths
