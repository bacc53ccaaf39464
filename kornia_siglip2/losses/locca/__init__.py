"""LocCa loss of SigLIP 2: captioning, referring expressions and grounded captioning.

- :mod:`.cross_entropy`: softmax cross-entropy fused with the output projection, chunked over the vocabulary.
- :mod:`.loss`: :class:`LocCaLoss`, the three tasks in one decoder pass.

The decoder, its vocabulary, targets and generation live in :mod:`kornia_siglip2.decoders` (a layer below).

Example:
    >>> import math
    >>> from kornia_siglip2.decoders import LocCaDecoder, LocCaTargets, LocCaVocabulary
    >>> from kornia_siglip2 import VisionConfig, VisionTransformer, patchify
    >>> vision = VisionTransformer(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                         num_attention_heads=4, patch_size=4, num_patches=16))
    >>> vocabulary = LocCaVocabulary(text_vocab_size=100, num_bins=28)
    >>> decoder = LocCaDecoder(vocabulary.vocab_size, width=16, num_heads=2, mlp_width=32, num_layers=1,
    ...                        max_length=10, image_width=32)
    >>> out = vision(*patchify(torch.rand(2, 3, 16, 16), patch_size=4))
    >>> targets = LocCaTargets.build([[5, 6, 7], [8]], [[6], [9, 9]], torch.tensor([[0.1, 0.1, 0.6, 0.9]] * 2),
    ...                              vocabulary, max_length=10, generator=torch.Generator().manual_seed(0))
    >>> loss = LocCaLoss(decoder)(out.last_hidden_state, out.cu_seqlens, targets).loss
    >>> round(loss.item(), 4), round(3 * math.log(128), 4)  # 3 log(128) at init: zero-init logits
    (14.5561, 14.5561)
"""

import torch  # noqa: F401  (doctest namespace)

from kornia_siglip2.losses.locca.cross_entropy import ChunkedCrossEntropy, chunked_cross_entropy, sequence_cross_entropy
from kornia_siglip2.losses.locca.loss import LocCaLoss, LocCaLossOutput

__all__ = [
    "ChunkedCrossEntropy",
    "LocCaLoss",
    "LocCaLossOutput",
    "chunked_cross_entropy",
    "sequence_cross_entropy",
]
