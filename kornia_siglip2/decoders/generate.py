"""Greedy decoding with the LocCa decoder: captions, boxes from referring expressions, grounded captions.

Decoding follows training: the sequence ``y`` grows from a condition (prefix) one argmax at a time, with
``shift_right(y)`` as input and a causal mask. There is no key/value cache: each step reruns the decoder
over the :math:`L` positions (:math:`L \\leq 64`), and only the next position's logits are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kornia_siglip2.decoders.locca import LocCaDecoder
from kornia_siglip2.decoders.targets import grounded_prefix, referring_prefix, shift_right
from kornia_siglip2.decoders.vocabulary import LocCaVocabulary
from kornia_siglip2.errors import check, check_shape

__all__ = ["generate", "generate_boxes", "generate_captions", "generate_region_captions"]


@torch.no_grad()
def generate(
    decoder: LocCaDecoder,
    image_tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefixes: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    start_token_id: int,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    token_range: tuple[int, int] | None = None,
) -> list[list[int]]:
    """Greedily extend one prefix per image.

    Args:
        decoder: the LocCa decoder.
        image_tokens: :math:`(N, D_v)` packed vision tokens of :math:`n` images.
        cu_seqlens: int :math:`(n + 1,)` image boundaries.
        prefixes: :math:`n` lists of ids, the known start of each ``y`` (may be empty).
        max_new_tokens: tokens to generate per image (fewer when ``max_length`` is reached or at EOS).
        start_token_id: the BOS input of training.
        pad_token_id: id written after the known tokens (masked by causality, never read).
        eos_token_id: stop a sequence at this id (kept out of its output); ``None`` never stops early.
        token_range: ``(low, high)`` only ids in ``[low, high)`` may be generated (EOS always may).

    Returns:
        :math:`n` lists of generated ids, without the prefix and without EOS.

    Raises:
        ValueCheckError: the number of prefixes does not match the images, or a prefix fills ``max_length``.

    Example:
        >>> decoder = LocCaDecoder(vocab_size=20, width=8, num_heads=2, mlp_width=16, num_layers=1, max_length=6)
        >>> generate(decoder, torch.randn(7, 8), torch.tensor([0, 3, 7]), [[4], []], 3, start_token_id=0)
        [[0, 0, 0], [0, 0, 0]]
    """
    num_images, length = len(prefixes), decoder.max_length
    check(
        cu_seqlens.shape == (num_images + 1,),
        lambda: f"Expected {num_images + 1} cu_seqlens for {num_images} prefixes, got {tuple(cu_seqlens.shape)}.",
    )
    check(
        all(len(prefix) < length for prefix in prefixes),
        lambda: f"Every prefix must be shorter than max_length {length}, got {[len(p) for p in prefixes]}.",
    )
    device = image_tokens.device
    layout = decoder.cross_attention_layout(cu_seqlens, length, device=device)
    sequences = torch.full((num_images, length), pad_token_id, dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        sequences[row, : len(prefix)] = torch.tensor(list(prefix), dtype=torch.long)
    sequences = sequences.to(device)
    positions = [len(prefix) for prefix in prefixes]
    outputs: list[list[int]] = [[] for _ in prefixes]
    active = [True] * num_images
    blocked = None
    if token_range is not None:
        ids = torch.arange(decoder.vocab_size, device=device)
        blocked = (ids < token_range[0]) | (ids >= token_range[1])
        if eos_token_id is not None:
            blocked[eos_token_id] = False
    rows = torch.arange(num_images, device=device)
    for _ in range(max_new_tokens):
        if not any(active):
            break
        hidden = decoder.forward_features(shift_right(sequences, start_token_id), image_tokens, layout=layout)
        # y[p] is predicted at position p, whose input is y[p - 1]
        logits = decoder.head(hidden[rows, torch.tensor(positions, device=device).clamp(max=length - 1)])
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        tokens = logits.argmax(-1).tolist()
        for row, token in enumerate(tokens):
            if not active[row]:
                continue
            if token == eos_token_id:
                active[row] = False
                continue
            outputs[row].append(token)
            sequences[row, positions[row]] = token
            positions[row] += 1
            active[row] = positions[row] < length
    return outputs


@torch.no_grad()
def generate_captions(
    decoder: LocCaDecoder,
    vocabulary: LocCaVocabulary,
    image_tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_new_tokens: int | None = None,
    parallel: bool = False,
) -> list[list[int]]:
    """Caption each image: greedy autoregressive decoding, or one parallel-prediction pass.

    Args:
        decoder: the LocCa decoder.
        vocabulary: the id layout (text range, special tokens).
        image_tokens: :math:`(N, D_v)` packed vision tokens of :math:`n` images.
        cu_seqlens: int :math:`(n + 1,)` image boundaries.
        max_new_tokens: longest caption; defaults to ``max_length - 1`` (room for EOS, as in training).
        parallel: decode all positions at once from mask tokens with full attention (CapPa's parallel
            decoding), the caption ending at the first EOS.

    Returns:
        :math:`n` lists of text ids, without EOS.

    Example:
        >>> vocabulary = LocCaVocabulary(text_vocab_size=16, num_bins=4)
        >>> decoder = LocCaDecoder(vocabulary.vocab_size, width=8, num_heads=2, mlp_width=16, num_layers=1,
        ...                        max_length=6)
        >>> generate_captions(decoder, vocabulary, torch.randn(7, 8), torch.tensor([0, 3, 7]), parallel=True)
        [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    """
    length = decoder.max_length
    max_new_tokens = length - 1 if max_new_tokens is None else max_new_tokens
    text_range = (0, vocabulary.text_vocab_size)
    if not parallel:
        prefixes = [[] for _ in range(cu_seqlens.shape[0] - 1)]
        return generate(
            decoder,
            image_tokens,
            cu_seqlens,
            prefixes,
            max_new_tokens,
            start_token_id=vocabulary.start_token_id,
            pad_token_id=vocabulary.pad_token_id,
            eos_token_id=vocabulary.eos_token_id,
            token_range=text_range,
        )
    num_images = cu_seqlens.shape[0] - 1
    inputs = torch.full((num_images, length), vocabulary.mask_token_id, dtype=torch.long, device=image_tokens.device)
    causal = torch.zeros(num_images, dtype=torch.bool, device=image_tokens.device)
    hidden = decoder.forward_features(inputs, image_tokens, cu_seqlens, causal)
    # logits of the text classes only, (n, L, text_vocab_size): the box bins are never computed
    text_logits = F.linear(hidden, decoder.head.weight[: text_range[1]], decoder.head.bias[: text_range[1]])
    captions = []
    for row in text_logits.argmax(-1).tolist():
        end = row.index(vocabulary.eos_token_id) if vocabulary.eos_token_id in row else len(row)
        captions.append(row[: min(end, max_new_tokens)])
    return captions


@torch.no_grad()
def generate_boxes(
    decoder: LocCaDecoder,
    vocabulary: LocCaVocabulary,
    image_tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    region_captions: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Referring expression: the box each region caption describes.

    Args:
        decoder: the LocCa decoder.
        vocabulary: the id layout.
        image_tokens: :math:`(N, D_v)` packed vision tokens of :math:`n` images.
        cu_seqlens: int :math:`(n + 1,)` image boundaries.
        region_captions: :math:`n` lists of text ids.

    Returns:
        :math:`(n, 4)` normalized ``xyxy`` boxes (bin centres).

    Example:
        >>> vocabulary = LocCaVocabulary(text_vocab_size=16, num_bins=4)
        >>> decoder = LocCaDecoder(vocabulary.vocab_size, width=8, num_heads=2, mlp_width=16, num_layers=1,
        ...                        max_length=8)
        >>> boxes = generate_boxes(decoder, vocabulary, torch.randn(7, 8), torch.tensor([0, 3, 7]), [[5, 6], [7]])
        >>> boxes.shape, boxes.tolist()[0]  # zero-init head: bin 0 everywhere, its centre 1/8 (exact in binary)
        (torch.Size([2, 4]), [0.125, 0.125, 0.125, 0.125])
    """
    prefixes = [referring_prefix(region, vocabulary, decoder.max_length) for region in region_captions]
    tokens = generate(
        decoder,
        image_tokens,
        cu_seqlens,
        prefixes,
        4,
        start_token_id=vocabulary.start_token_id,
        pad_token_id=vocabulary.pad_token_id,
        token_range=(vocabulary.box_token_offset, vocabulary.vocab_size),
    )
    return vocabulary.tokens_to_boxes(torch.tensor(tokens, dtype=torch.long).view(-1, 4)).to(image_tokens.device)


@torch.no_grad()
def generate_region_captions(
    decoder: LocCaDecoder,
    vocabulary: LocCaVocabulary,
    image_tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    boxes: torch.Tensor,
    max_new_tokens: int | None = None,
) -> list[list[int]]:
    """Grounded captioning: describe the region in each box.

    Args:
        decoder: the LocCa decoder.
        vocabulary: the id layout.
        image_tokens: :math:`(N, D_v)` packed vision tokens of :math:`n` images.
        cu_seqlens: int :math:`(n + 1,)` image boundaries.
        boxes: :math:`(n, 4)` normalized ``xyxy`` boxes.
        max_new_tokens: longest region caption; defaults to what training allows (``max_length - 5``).

    Returns:
        :math:`n` lists of text ids, without EOS.

    Example:
        >>> vocabulary = LocCaVocabulary(text_vocab_size=16, num_bins=4)
        >>> decoder = LocCaDecoder(vocabulary.vocab_size, width=8, num_heads=2, mlp_width=16, num_layers=1,
        ...                        max_length=8)
        >>> boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.3, 0.4, 0.5]])
        >>> generate_region_captions(decoder, vocabulary, torch.randn(7, 8), torch.tensor([0, 3, 7]), boxes)
        [[0, 0, 0], [0, 0, 0]]
    """
    check_shape(boxes, ["B", "4"], "boxes must be (n, 4) normalized xyxy coordinates.")
    prefixes = [grounded_prefix(tokens) for tokens in vocabulary.boxes_to_tokens(boxes.detach().cpu())]
    return generate(
        decoder,
        image_tokens,
        cu_seqlens,
        prefixes,
        decoder.max_length - 5 if max_new_tokens is None else max_new_tokens,
        start_token_id=vocabulary.start_token_id,
        pad_token_id=vocabulary.pad_token_id,
        eos_token_id=vocabulary.eos_token_id,
        token_range=(0, vocabulary.text_vocab_size),
    )
