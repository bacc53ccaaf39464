import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance

from kornia_siglip2.attention import VarlenLayout, varlen_attention

MIXED = [5, 9, 5, 3, 9, 5]  # repeated lengths that are not adjacent: exercises the gather path


def _qkv(num_tokens, device, dtype, heads=2, head_dim=4, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = torch.randn(3, num_tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _per_sequence_reference(q, k, v, lengths_q, lengths_k):
    """Each sequence alone through plain SDPA, the definition of block-diagonal attention."""
    outs = []
    for qs, ks, vs in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k), strict=True):
        out = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


class TestVarlenLayout:
    def test_groups(self):
        layout = VarlenLayout.from_seqlens(MIXED)
        assert layout.groups == ((3, 5, 5), (2, 9, 9), (1, 3, 3))
        assert layout.gather_q is not None
        # gather then scatter restores the order
        order = torch.arange(sum(MIXED))
        assert torch.equal(order[layout.gather_q][layout.scatter_q], order)

    def test_equal_lengths_need_no_gather(self):
        layout = VarlenLayout.from_seqlens([16] * 4)
        assert layout.groups == ((4, 16, 16),) and layout.gather_q is None and layout.scatter_q is None

    def test_exception(self):
        with pytest.raises(ValueError, match="positive"):
            VarlenLayout.from_seqlens([3, 0])
        with pytest.raises(ValueError, match="2 and 1 sequences"):
            VarlenLayout.from_seqlens([3, 2], [4])
        with pytest.raises(ValueError, match="start at 0"):
            VarlenLayout.from_cu_seqlens(torch.tensor([1, 3]))
        with pytest.raises(ValueError, match="1-D integer"):
            VarlenLayout.from_cu_seqlens(torch.tensor([0.0, 3.0]))


class TestVarlenAttention:
    @pytest.mark.parametrize("backend", ["grouped", "dense", "loop", "auto"])
    @pytest.mark.parametrize("lengths", [MIXED, [7, 7, 7], [11]])
    def test_matches_per_sequence(self, backend, lengths, device, dtype):
        q, k, v = _qkv(sum(lengths), device, dtype)
        out = varlen_attention(q, k, v, _cu(lengths, device), max(lengths), backend=backend)
        expected = _per_sequence_reference(q, k, v, lengths, lengths)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out, expected, **tolerance(dtype))

    @pytest.mark.parametrize("backend", ["grouped", "dense", "loop"])
    def test_cross_attention(self, backend, device, dtype):
        """One query per sequence over keys of different lengths: the MAP-head pattern."""
        lengths_k = [6, 3, 6, 10]
        q, _, _ = _qkv(4, device, dtype, seed=1)
        _, k, v = _qkv(sum(lengths_k), device, dtype, seed=2)
        out = varlen_attention(q, k, v, _cu([1] * 4, device), cu_seqlens_k=_cu(lengths_k, device), backend=backend)
        torch.testing.assert_close(out, _per_sequence_reference(q, k, v, [1] * 4, lengths_k), **tolerance(dtype))

    @pytest.mark.parametrize("backend", ["grouped", "dense"])
    def test_gradients_match_per_sequence(self, backend, device):
        q, k, v = _qkv(sum(MIXED), device, torch.float64, requires_grad=True)
        weights = torch.randn(sum(MIXED), 2, 4, dtype=torch.float64, device=device)
        grads = torch.autograd.grad(
            (varlen_attention(q, k, v, _cu(MIXED, device), backend=backend) * weights).sum(), (q, k, v)
        )
        expected = torch.autograd.grad((_per_sequence_reference(q, k, v, MIXED, MIXED) * weights).sum(), (q, k, v))
        for grad, reference in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, reference, atol=1e-12, rtol=1e-12)

    def test_no_leak_between_sequences(self, device):
        q, k, v = _qkv(12, device, torch.float64)
        cu_seqlens = _cu([4, 8], device)
        before = varlen_attention(q, k, v, cu_seqlens)
        v2 = v.clone()
        v2[4:] += 100.0
        after = varlen_attention(q, k, v2, cu_seqlens)
        assert torch.equal(before[:4], after[:4]) and not torch.allclose(before[4:], after[4:])

    def test_equal_lengths_use_one_unmasked_sdpa(self, monkeypatch):
        """64 images x 256 tokens: one batched SDPA call, no mask; nothing of size 16384^2."""
        calls = []
        original = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            calls.append((tuple(query.shape), tuple(key.shape), attn_mask))
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        q, k, v = _qkv(64 * 256, "cpu", torch.float32, heads=1, head_dim=8)
        out = varlen_attention(q, k, v, _cu([256] * 64, "cpu"), 256)
        assert out.shape == q.shape
        assert calls == [((64, 1, 256, 8), (64, 1, 256, 8), None)]

    def test_mixed_lengths_memory_grows_with_sum_of_squares(self, monkeypatch):
        calls = []
        original = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            calls.append(query.shape[0] * query.shape[-2] * key.shape[-2])
            assert attn_mask is None
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32)
        varlen_attention(q, k, v, _cu(MIXED, "cpu"))
        assert sum(calls) == sum(length**2 for length in MIXED)

    def test_exception(self):
        q, k, v = _qkv(10, "cpu", torch.float32)
        with pytest.raises(ValueError, match="Unknown attention backend"):
            varlen_attention(q, k, v, _cu([10], "cpu"), backend="magic")
        with pytest.raises(Exception, match="describe 9 query"):
            varlen_attention(q, k, v, _cu([4, 5], "cpu"))
        with pytest.raises(Exception, match=r"\(tokens, heads, head_dim\)"):
            varlen_attention(q[:, 0], k, v, _cu([10], "cpu"))
        with pytest.raises(Exception, match="needs cu_seqlens"):
            varlen_attention(q, k, v)

    @pytest.mark.parametrize("backend", ["grouped", "dense"])
    def test_gradcheck(self, backend, device):
        q, k, v = _qkv(7, device, torch.float64, heads=1, head_dim=2, requires_grad=True)
        cu_seqlens = _cu([3, 4], device)
        assert torch.autograd.gradcheck(lambda *x: varlen_attention(*x, cu_seqlens, backend=backend), (q, k, v))

    def test_dynamo_dense_fullgraph(self, device, dtype):
        q, k, v = _qkv(sum(MIXED), device, dtype)
        cu_seqlens = _cu(MIXED, device)
        compiled = torch.compile(lambda *x: varlen_attention(*x, cu_seqlens, backend="dense"), fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), varlen_attention(q, k, v, cu_seqlens), **tolerance(dtype))

    def test_dynamo_grouped_fullgraph_with_layout(self, device, dtype):
        q, k, v = _qkv(sum(MIXED), device, dtype)
        layout = VarlenLayout.from_seqlens(MIXED, device=device)
        compiled = torch.compile(lambda *x: varlen_attention(*x, layout=layout), fullgraph=True)
        torch.testing.assert_close(
            compiled(q, k, v), _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(dtype)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash backend runs on CUDA only")
class TestFlashBackend:
    """CUDA only: never run on this project's CPU CI; run with a GPU (`pytest tests/test_attention.py`)."""

    @pytest.mark.parametrize("half_dtype", [torch.float16, torch.bfloat16])
    def test_matches_per_sequence(self, half_dtype):
        device = torch.device("cuda")
        lengths = [*MIXED, 130]  # one sequence longer than a flash tile
        q, k, v = _qkv(sum(lengths), device, torch.float32, heads=2, head_dim=64, requires_grad=True)
        reference = _per_sequence_reference(q, k, v, lengths, lengths)
        low = [t.detach().to(half_dtype).requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*low, _cu(lengths, device), max(lengths), backend="flash")
        assert out.dtype == half_dtype
        torch.testing.assert_close(out.float(), reference, **tolerance(half_dtype))
        # "auto" picks flash for half-precision CUDA tensors
        assert torch.equal(varlen_attention(*low, _cu(lengths, device), backend="auto"), out)
        weights = torch.randn_like(reference)
        grads = torch.autograd.grad((out.float() * weights).sum(), low)
        expected = torch.autograd.grad((reference * weights).sum(), (q, k, v))
        for grad, grad_reference in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad.float(), grad_reference, atol=5e-2, rtol=5e-2)
