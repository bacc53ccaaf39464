"""Text side: transformers' tokenizer of a checkpoint, with the SigLIP / SigLIP 2 rules applied.

The rules are those of transformers' ``SiglipProcessor`` / ``Siglip2Processor``.

The family is decided by the tokenizer class found in the checkpoint, not by ``model_type``: SigLIP 2
fixed-resolution checkpoints are ``model_type: siglip`` but ship the Gemma tokenizer.

- SigLIP (``SiglipTokenizer``, SentencePiece): lowercase, punctuation stripped, ``</s>`` appended,
  padded with ``</s>``.
- SigLIP 2 (``GemmaTokenizer`` / ``Siglip2Tokenizer``, byte-fallback BPE): lowercase normalizer, EOS appended,
  no BOS, padded with ``<pad>`` on the right.

Both: ``padding="max_length"`` to the text tower's ``max_position_embeddings`` (64), truncation, which is
what transformers' ``Siglip2Processor`` does by default and the model cards ask of ``SiglipProcessor``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from kornia_siglip2.hub import read_config, resolve_checkpoint

__all__ = ["TOKENIZER_FILES", "SigLipTokenizer", "quiet_transformers", "tokenizer_family"]

#: Files of which at least one must be in a checkpoint for its tokenizer to load (transformers would otherwise
#: build an empty default tokenizer for ``model_type: siglip2``).
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")

_SIGLIP_CLASSES = ("SiglipTokenizer",)
_SIGLIP2_CLASSES = ("GemmaTokenizer", "Siglip2Tokenizer")
_DEFAULT_MAX_LENGTH = 64  # transformers' Siglip2Processor and the SigLIP model cards


def tokenizer_family(tokenizer: Any) -> Literal["siglip", "siglip2"]:
    """SigLIP family of a transformers tokenizer, from its class.

    Args:
        tokenizer: a transformers tokenizer instance.

    Returns:
        ``"siglip"`` for ``SiglipTokenizer``, ``"siglip2"`` for ``GemmaTokenizer`` / ``Siglip2Tokenizer``.

    Raises:
        ValueError: any other class.
    """
    names = {cls.__name__.removesuffix("Fast") for cls in type(tokenizer).__mro__}
    if names.intersection(_SIGLIP_CLASSES):
        return "siglip"
    if names.intersection(_SIGLIP2_CLASSES):
        return "siglip2"
    raise ValueError(
        f"Unsupported tokenizer class {type(tokenizer).__name__}: expected SiglipTokenizer (SigLIP) or "
        "GemmaTokenizer / Siglip2Tokenizer (SigLIP 2)."
    )


class SigLipTokenizer:
    """Tokenize text for SigLIP / SigLIP 2 exactly as transformers' processor with the documented settings.

    Wraps a transformers tokenizer and enforces the family's rules on it (see the module docstring), so a
    checkpoint whose tokenizer config misses one of them (a plain Gemma tokenizer: no lowercase, BOS or no
    EOS, left padding) still gives the ids the model was trained on.

    Args:
        tokenizer: a transformers ``SiglipTokenizer``, ``GemmaTokenizer`` or ``Siglip2Tokenizer``; it is modified
            in place (special tokens, padding side, lowercase).
        max_length: padded and truncated length :math:`L` (the text tower's ``max_position_embeddings``).

    Raises:
        ValueError: an unsupported tokenizer class or a non-positive ``max_length``.

    Example:
        >>> import tempfile
        >>> from kornia_siglip2.demo import build_siglip2_tokenizer
        >>> tokenizer = SigLipTokenizer.from_pretrained(build_siglip2_tokenizer(tempfile.mkdtemp()))
        >>> tokenizer
        SigLipTokenizer(family='siglip2', class=Siglip2Tokenizer, max_length=64)
        >>> input_ids = tokenizer(["This is a photo of a RED circle.", "a dog"])
        >>> input_ids.shape, input_ids.dtype
        (torch.Size([2, 64]), torch.int64)
        >>> bool((input_ids == tokenizer(["this is a photo of a red circle.", "A DOG"])).all())
        True
    """

    def __init__(self, tokenizer: Any, max_length: int = _DEFAULT_MAX_LENGTH) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.family = tokenizer_family(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        if self.family == "siglip":
            _apply_siglip_rules(tokenizer)
        else:
            _apply_siglip2_rules(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        max_length: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> SigLipTokenizer:
        """Load the tokenizer of a checkpoint folder or hub id with transformers' ``AutoTokenizer``.

        Remote code is never run (``trust_remote_code=False``).

        Args:
            name_or_path: checkpoint folder or hub id (resolved by
                :func:`kornia_siglip2.hub.resolve_checkpoint`).
            max_length: padded length; by default ``text_config.max_position_embeddings`` of ``config.json``,
                else 64.
            revision: hub revision.
            cache_dir: Hugging Face cache folder.
            local_files_only: never reach the network.

        Returns:
            the wrapper.

        Raises:
            FileNotFoundError: no checkpoint, or no tokenizer files (``tokenizer.json``, ``spiece.model``) in it;
                the message says how to add them.
            ImportError: transformers (or sentencepiece for SigLIP) is not installed.
            ValueError: an unsupported tokenizer class.
        """
        folder = resolve_checkpoint(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"No tokenizer in {name_or_path} (looked for {', '.join(TOKENIZER_FILES)} in {folder}). A "
                "transformers save_pretrained(model) folder holds no tokenizer: save the checkpoint's tokenizer "
                "there too (AutoTokenizer.from_pretrained(SOURCE).save_pretrained(FOLDER)), or load with "
                "load_tokenizer=False to embed images only."
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError("Tokenization needs transformers: pip install 'kornia_siglip2[text]'.") from error
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        if max_length is None:
            max_length = _max_position_embeddings(folder)
        return cls(tokenizer, max_length)

    @property
    def pad_token_id(self) -> int:
        """Id used for padding (``</s>`` for SigLIP, ``<pad>`` for SigLIP 2)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        """Id appended to every text."""
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can return (all ids are below it)."""
        return len(self.tokenizer)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, class={type(self.tokenizer).__name__}, "
            f"max_length={self.max_length})"
        )

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize, pad and truncate.

        Args:
            texts: one string or a list of :math:`B` strings.

        Returns:
            ``input_ids`` :math:`(B, L)` int64, :math:`L` = ``max_length``; over-long texts keep their first
            :math:`L - 1` tokens and the EOS.

        Raises:
            TypeError: ``texts`` is not a string or a list of strings.
            ValueError: an empty list.
        """
        return self.encode(texts)["input_ids"]

    @property
    def returns_attention_mask(self) -> bool:
        """Whether the checkpoint's tokenizer returns an ``attention_mask`` (its ``model_input_names`` name it).

        transformers' processors and pipelines then pass it to the model, which changes the pooled text feature;
        :meth:`encode` returns it too, so the same ids and mask reach the model.
        """
        return "attention_mask" in getattr(self.tokenizer, "model_input_names", ())

    def encode(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize, pad and truncate into the model's text inputs, as transformers' processor returns them.

        Args:
            texts: one string or a list of :math:`B` strings.

        Returns:
            ``{"input_ids": (B, L) int64}``, plus ``"attention_mask"`` :math:`(B, L)` int64 (1 on tokens, 0 on padding)
            when the checkpoint's tokenizer returns one (:attr:`returns_attention_mask`).

        Raises:
            TypeError: ``texts`` is not a string or a list of strings.
            ValueError: an empty list.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
        if len(texts) == 0:
            raise ValueError("texts must hold at least one string.")
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=self.returns_attention_mask,
            return_tensors="pt",
        )
        return {key: encoded[key].to(torch.int64) for key in ("input_ids", "attention_mask") if key in encoded}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' warnings inside the block only; the logging state before it is restored after it.

    Loading a SigLIP tokenizer makes transformers warn about token ids it checks against a default config (for
    example ``bos_token_id must be None or an integer within the vocabulary``); they say nothing about the
    checkpoint. Nothing is hidden when the user asked for transformers' messages: ``TRANSFORMERS_VERBOSITY`` is
    set, or transformers' verbosity is already more detailed than its default (``WARNING``).

    Example:
        >>> from transformers import logging as hf_logging
        >>> before = hf_logging.get_verbosity()
        >>> with quiet_transformers():
        ...     hf_logging.get_verbosity() == hf_logging.ERROR or "TRANSFORMERS_VERBOSITY" in os.environ
        True
        >>> hf_logging.get_verbosity() == before
        True
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    if "TRANSFORMERS_VERBOSITY" in os.environ or previous < logging.WARNING:
        yield  # the user asked for transformers' messages
        return
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def _apply_siglip_rules(tokenizer: Any) -> None:
    """SigLIP v1: lowercase (punctuation stripping and ``</s>`` are built into ``SiglipTokenizer``), pad = ``</s>``."""
    tokenizer.do_lower_case = True
    if tokenizer.pad_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"


def _apply_siglip2_rules(tokenizer: Any) -> None:
    """SigLIP 2: lowercase normalizer, EOS and no BOS, right padding (transformers' conversion script settings)."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    # test the behaviour, not the config: a hub tokenizer.json may or may not carry a Lowercase step
    if backend.normalizer is None:
        backend.normalizer = normalizers.Lowercase()
    elif backend.normalizer.normalize_str("AZ") != "az":
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), backend.normalizer])
    # always rebuild the post-processor through the setters: the flags read from tokenizer_config.json need not
    # describe the post-processor stored in tokenizer.json (a Gemma tokenizer.json may prepend <bos>)
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = True
    if "Siglip2Tokenizer" not in {cls.__name__.removesuffix("Fast") for cls in type(tokenizer).__mro__}:
        # a plain Gemma tokenizer: no attention mask, as transformers' conversion script saves SigLIP 2's tokenizer
        tokenizer.model_input_names = ["input_ids"]
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"


def _max_position_embeddings(folder: Path) -> int:
    """``text_config.max_position_embeddings`` of the checkpoint's ``config.json``, else 64."""
    if not (folder / "config.json").is_file():
        return _DEFAULT_MAX_LENGTH
    config = read_config(folder)
    return int((config.get("text_config") or {}).get("max_position_embeddings", _DEFAULT_MAX_LENGTH))
