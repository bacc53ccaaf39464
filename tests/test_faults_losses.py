"""Loss numerics in half precision (issue 14): the sums are accumulated in float32.

Main summed the n x n sigmoid loss terms in the embeddings' dtype: at n = 8192 in float16 the sum overflowed
to inf (dense and chunked) before the division by n.
"""

import pytest
import torch
import torch.nn.functional as F

from kornia_siglip2.losses import sigmoid_loss


def _reference(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, rows: int = 1024) -> float:
    """float64 -sum(logsigmoid(labels * logits)) / n, by row blocks (written from the formula)."""
    image, text = image.double(), text.double()
    total = 0.0
    for start in range(0, image.shape[0], rows):
        logits = image[start : start + rows] @ text.T * torch.tensor(scale, dtype=torch.float64).exp() + bias
        labels = -torch.ones_like(logits)
        labels.diagonal(start).fill_(1.0)
        total -= float(F.logsigmoid(labels * logits).sum())
    return total / image.shape[0]


def _embeddings(n: int, dim: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(n, dim, generator=generator), dim=-1)
    return image.to(dtype), text.to(dtype)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 2048])
def test_large_half_precision_batch_is_finite_and_accurate(half, chunk_size):
    """n = 8192 at SigLIP's init (t' = log 10, b = -10): main gave inf in float16."""
    image, text = _embeddings(8192, 8, half)
    loss = sigmoid_loss(image, text, torch.tensor(2.302585), torch.tensor(-10.0), chunk_size=chunk_size)
    assert loss.dtype == half and torch.isfinite(loss)
    expected = _reference(image, text, 2.302585, -10.0)  # the same half-precision embeddings, in float64
    # the only remaining error is the half-precision result (and the half-precision dot products)
    assert abs(float(loss) - expected) <= 2 * torch.finfo(half).eps * expected


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_half_precision_gradients_match_float64(chunk_size):
    image, text = _embeddings(256, 8, torch.float16)
    scale = torch.tensor(2.3, dtype=torch.float16, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float16, requires_grad=True)
    image.requires_grad_(True)
    sigmoid_loss(image, text, scale, bias, chunk_size=chunk_size).backward()
    reference_image = image.detach().double().requires_grad_(True)
    ref_scale = torch.tensor(float(scale.detach()), dtype=torch.float64, requires_grad=True)
    ref_bias = torch.tensor(float(bias.detach()), dtype=torch.float64, requires_grad=True)
    sigmoid_loss(reference_image, text.double(), ref_scale, ref_bias).backward()
    assert image.grad.dtype == torch.float16 and scale.grad.dtype == torch.float16
    torch.testing.assert_close(image.grad.double(), reference_image.grad, atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(scale.grad.double(), ref_scale.grad, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(bias.grad.double(), ref_bias.grad, atol=1e-3, rtol=1e-2)


def test_distillation_center_sum_is_float32():
    """Main summed the teacher logits for the DINO center in their dtype: inf for a large float16 batch."""
    from kornia_siglip2.losses.distill.loss import SelfDistillationLoss

    center = torch.zeros(4)
    logits = torch.full((8192, 4), 30.0, dtype=torch.float16)  # the float16 sum is 245760 > 65504
    stub = type("Stub", (), {"center_momentum": 0.0})()
    SelfDistillationLoss._update_center(stub, center, logits)
    torch.testing.assert_close(center, torch.full((4,), 30.0))
