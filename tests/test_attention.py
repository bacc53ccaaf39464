import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance

from kornia_siglip2.attention import VarlenLayout, varlen_attention, varlen_attention_weights
from kornia_siglip2.errors import TypeCheckError, ValueCheckError

MIXED = [5, 9, 5, 3, 9, 5]  # repeated lengths that are not adjacent: exercises the gather path


def _qkv(num_tokens, device, dtype, heads=2, head_dim=4, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = torch.randn(3, num_tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _per_sequence_reference(q, k, v, lengths_q, lengths_k, causal=None):
    """Each sequence alone through a hand-written softmax(q k^T / sqrt(d)) v: block-diagonal attention by definition."""
    outs = []
    causal = causal or [False] * len(lengths_q)
    for qs, ks, vs, is_causal in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k), causal, strict=True):
        scores = torch.einsum("qhd,khd->hqk", qs.double(), ks.double()) / qs.shape[-1] ** 0.5
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("hqk,khd->qhd", weights, vs.double()).to(qs.dtype))
    return torch.cat(outs)


class TestVarlenLayout:
    def test_groups(self):
        layout = VarlenLayout.from_seqlens(MIXED)
        assert layout.groups == ((3, 5, 5, False), (2, 9, 9, False), (1, 3, 3, False))
        assert layout.gather_q is not None
        # gather then scatter restores the order
        order = torch.arange(sum(MIXED))
        assert torch.equal(order[layout.gather_q][layout.scatter_q], order)

    def test_equal_lengths_need_no_gather(self):
        layout = VarlenLayout.from_seqlens([16] * 4)
        assert layout.groups == ((4, 16, 16, False),) and layout.gather_q is None and layout.scatter_q is None

    def test_causal_flags_split_groups(self):
        layout = VarlenLayout.from_seqlens([4, 4, 4], causal=[True, False, True])
        assert layout.groups == ((2, 4, 4, True), (1, 4, 4, False))

    def test_key_padding_mask(self):
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
        layout = VarlenLayout.from_key_padding_mask(mask)
        assert layout.seqlens_q == (4, 4, 4) and layout.seqlens_k == (2, 4, 2)
        assert layout.key_index.tolist() == [0, 1, 4, 5, 6, 7, 9, 10]

    def test_exception(self):
        with pytest.raises(ValueError, match="positive"):
            VarlenLayout.from_seqlens([3, 0])
        with pytest.raises(ValueCheckError, match="have 2, 1 and 2 sequences"):
            VarlenLayout.from_seqlens([3, 2], [4])
        with pytest.raises(ValueCheckError, match="start at 0"):
            VarlenLayout.from_cu_seqlens(torch.tensor([1, 3]))
        with pytest.raises(TypeCheckError, match="must hold integers"):
            VarlenLayout.from_cu_seqlens(torch.tensor([0.0, 3.0]))
        with pytest.raises(ValueCheckError, match="rows must keep a token"):
            VarlenLayout.from_key_padding_mask(torch.tensor([[1, 0], [0, 0]]))


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

    @pytest.mark.parametrize("backend", ["grouped", "dense", "loop", "eager"])
    def test_causal_per_sequence(self, backend, device):
        """Causal and full blocks in one packed batch (LocCa mixes teacher forcing and parallel prediction)."""
        lengths, causal = [4, 6, 4, 6], [True, False, False, True]
        q, k, v = _qkv(sum(lengths), device, torch.float64)
        layout = VarlenLayout.from_seqlens(lengths, device=device, causal=causal)
        out = varlen_attention(q, k, v, layout=layout, backend=backend)
        expected = _per_sequence_reference(q, k, v, lengths, lengths, causal)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    @pytest.mark.parametrize("backend", ["grouped", "dense", "loop", "eager"])
    def test_key_padding_mask_equals_dropping_the_keys(self, backend, device):
        """A (B, L) key mask == each sequence attending to its kept keys only (transformers' text mask)."""
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool, device=device)
        q, k, v = _qkv(mask.numel(), device, torch.float64)
        out = varlen_attention(q, k, v, layout=VarlenLayout.from_key_padding_mask(mask), backend=backend)
        kept = mask.flatten()
        expected = _per_sequence_reference(q, k[kept], v[kept], [5, 5, 5], mask.sum(-1).tolist())
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    def test_eager_weights_are_the_softmax(self, device):
        lengths = [3, 5]
        q, k, v = _qkv(sum(lengths), device, torch.float64)
        out, weights = varlen_attention_weights(q, k, v, VarlenLayout.from_seqlens(lengths, device=device))
        assert [tuple(w.shape) for w in weights] == [(2, 3, 3), (2, 5, 5)]
        for w, qs, ks in zip(weights, q.split(lengths), k.split(lengths), strict=True):
            expected = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) / 2.0, -1)  # head_dim 4: scale 1/2
            torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out, _per_sequence_reference(q, k, v, lengths, lengths), atol=1e-12, rtol=1e-12)

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
        with pytest.raises(ValueCheckError, match="Unknown attention backend"):
            varlen_attention(q, k, v, _cu([10], "cpu"), backend="magic")
        with pytest.raises(ValueCheckError, match="ends at 9 but there are 10 tokens"):
            varlen_attention(q, k, v, _cu([4, 5], "cpu"))
        with pytest.raises(ValueCheckError, match=r"\(tokens, heads, head_dim\)"):
            varlen_attention(q[:, 0], k, v, _cu([10], "cpu"))
        with pytest.raises(ValueCheckError, match="needs cu_seqlens"):
            varlen_attention(q, k, v)

    @pytest.mark.parametrize("backend", ["grouped", "dense"])
    def test_gradcheck(self, backend, device):
        q, k, v = _qkv(7, device, torch.float64, heads=1, head_dim=2, requires_grad=True)
        cu_seqlens = _cu([3, 4], device)
        assert torch.autograd.gradcheck(lambda *x: varlen_attention(*x, cu_seqlens, backend=backend), (q, k, v))

    def test_dynamo_dense_fullgraph(self, device, dtype):
        q, k, v = _qkv(sum(MIXED), device, dtype)
        cu_seqlens = _cu(MIXED, device)
        compiled = torch.compile(
            lambda *x: varlen_attention(*x, cu_seqlens, backend="dense"), fullgraph=True, backend="aot_eager"
        )
        torch.testing.assert_close(compiled(q, k, v), varlen_attention(q, k, v, cu_seqlens), **tolerance(dtype))

    def test_dynamo_grouped_fullgraph_with_layout(self, device, dtype):
        q, k, v = _qkv(sum(MIXED), device, dtype)
        layout = VarlenLayout.from_seqlens(MIXED, device=device)
        compiled = torch.compile(lambda *x: varlen_attention(*x, layout=layout), fullgraph=True, backend="aot_eager")
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


class TestBlocksBackend:
    """The tensor-only ``"blocks"`` backend (padded blocks + key mask): the per-sequence reference, values and grads."""

    def _layout(self, seqlens, device):
        from kornia_siglip2.packing import ImageLayout

        # one frame of 1 x L patches per sequence: the image layout carries the BlockLayout
        return ImageLayout.from_grid_thw(torch.tensor([[1, 1, length] for length in seqlens]), device).attention

    def test_matches_reference(self, device, dtype):
        q, k, v = _qkv(sum(MIXED), device, dtype)
        layout = self._layout(MIXED, device)
        out = varlen_attention(q, k, v, layout=layout, backend="blocks")
        torch.testing.assert_close(out, _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(dtype))

    def test_gradcheck(self, device):
        q, k, v = _qkv(7, device, torch.float64, heads=1, head_dim=2, requires_grad=True)
        layout = self._layout([3, 4], device)
        assert torch.autograd.gradcheck(lambda *x: varlen_attention(*x, layout=layout, backend="blocks"), (q, k, v))

    def test_picked_inside_compile(self, device):
        """``"auto"`` runs it inside torch.compile (one graph whatever the lengths), ``"grouped"`` in eager."""
        q, k, v = _qkv(sum(MIXED), device, torch.float32)
        layout = self._layout(MIXED, device)
        compiled = torch.compile(lambda *x: varlen_attention(*x, layout=layout), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            compiled(q, k, v), _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(torch.float32)
        )

    def test_exception(self, device):
        q, k, v = _qkv(7, device, torch.float32)
        with pytest.raises(ValueCheckError, match="BlockLayout"):
            varlen_attention(q, k, v, _cu([3, 4], device), backend="blocks")
        with pytest.raises(ValueCheckError, match="BlockLayout"):
            varlen_attention(q, k, v, layout=VarlenLayout.from_seqlens([3, 4]), backend="blocks")


def _captured_graph(function, *args):
    """Compile ``function`` fullgraph and return its value and the FX graph dynamo hands to the backend."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    value = torch.compile(function, fullgraph=True, backend=capture)(*args)
    torch._dynamo.reset()
    (graph,) = graphs
    return value, {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


class TestCompiledCpuInference:
    """Inside ``torch.compile`` on CPU without gradients, packed attention is one opaque varlen operator."""

    def _layout(self, seqlens):
        from kornia_siglip2.packing import ImageLayout

        return ImageLayout.from_grid_thw(torch.tensor([[1, 1, length] for length in seqlens])).attention

    def test_inference_graph_calls_the_varlen_operator(self):
        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32)
        layout = self._layout(MIXED)
        with torch.no_grad():
            out, targets = _captured_graph(lambda *x: varlen_attention(*x, layout=layout), q, k, v)
        assert "kornia_siglip2.cpu_varlen_attention.default" in targets
        assert not any("scaled_dot_product_attention" in target for target in targets)
        torch.testing.assert_close(out, _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(torch.float32))

    def test_training_graph_keeps_the_blocks(self):
        """With gradients the graph holds the differentiable padded blocks (the operator has no backward)."""
        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32, requires_grad=True)
        layout = self._layout(MIXED)
        out, targets = _captured_graph(lambda *x: varlen_attention(*x, layout=layout), q, k, v)
        assert "kornia_siglip2.cpu_varlen_attention.default" not in targets
        torch.testing.assert_close(out, _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(torch.float32))

    def test_export_keeps_the_blocks(self):
        """``torch.export`` never sees the operator: exported graphs run where this package is not installed."""
        from kornia_siglip2.packing import BlockLayout

        layout = self._layout(MIXED)

        class Attend(torch.nn.Module):
            def forward(self, q, k, v, cu_seqlens, query_index, key_mask):
                blocks = BlockLayout(query_index, query_index, key_mask)
                return varlen_attention(q, k, v, layout=VarlenLayout.from_blocks(blocks, cu_seqlens, cu_seqlens))

        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32)
        args = (q, k, v, layout.cu_seqlens_q, layout.blocks.query_index, layout.blocks.key_mask)
        with torch.no_grad():
            program = torch.export.export(Attend(), args)
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert not any(target.startswith("kornia_siglip2") for target in targets)
        torch.testing.assert_close(
            program.module()(*args), _per_sequence_reference(q, k, v, MIXED, MIXED), **tolerance(torch.float32)
        )

    def test_opcheck(self):
        """Schema, fake (meta) kernel and dispatch of both operators (torch.library.opcheck)."""
        from kornia_siglip2.attention import _cpu_varlen_attention, _onednn_linear, _onednn_supports

        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32)
        cu = _cu(MIXED, "cpu")
        torch.library.opcheck(_cpu_varlen_attention, (q, k, v, cu, cu, None))
        if _onednn_supports(torch.float32):
            x, w, b, r = torch.rand(5, 8), torch.rand(16, 8), torch.rand(16), torch.rand(5, 16)
            torch.library.opcheck(_onednn_linear, (x, w, b, "gelu", "tanh", None))
            torch.library.opcheck(_onednn_linear, (x, w, b, "none", "", r))


class TestMatmulAttention:
    """bfloat16 CPU inference attention as baddbmm + softmax + bmm (where it beats SDPA's fused kernel)."""

    @pytest.fixture
    def spy_sdpa(self, monkeypatch):
        import kornia_siglip2.attention as attention

        calls = []
        original = F.scaled_dot_product_attention

        def spy(*args, **kwargs):
            calls.append(args[0].shape)
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        monkeypatch.setattr(attention, "_MATMUL_ATTENTION_CPU", True)  # the path, also on CPUs that do not take it
        return calls

    @pytest.mark.parametrize("chunk_bytes", [8 << 20, 1], ids=["one-chunk", "one-sequence-per-chunk"])
    def test_matches_reference(self, spy_sdpa, monkeypatch, chunk_bytes):
        import kornia_siglip2.attention as attention

        monkeypatch.setattr(attention, "_MATMUL_ATTENTION_CHUNK_BYTES", chunk_bytes)
        q, k, v = _qkv(sum(MIXED), "cpu", torch.bfloat16, heads=3, head_dim=8)
        with torch.no_grad():
            out = varlen_attention(q, k, v, _cu(MIXED, "cpu"))
        assert spy_sdpa == []
        reference = _per_sequence_reference(q.double(), k.double(), v.double(), MIXED, MIXED)
        torch.testing.assert_close(out.double(), reference, **tolerance(torch.bfloat16))

    def test_sdpa_when_too_large_or_differentiable(self, spy_sdpa, monkeypatch):
        import kornia_siglip2.attention as attention

        q, k, v = _qkv(sum(MIXED), "cpu", torch.bfloat16, requires_grad=True)
        varlen_attention(q, k, v, _cu(MIXED, "cpu"))  # gradients needed: the fused kernel (memory linear in L)
        assert len(spy_sdpa) == 3  # one call per group of equal lengths
        monkeypatch.setattr(attention, "_MATMUL_ATTENTION_MAX_BYTES", 1)
        with torch.no_grad():
            varlen_attention(q, k, v, _cu(MIXED, "cpu"))
        assert len(spy_sdpa) == 6

    def test_float32_keeps_sdpa(self, spy_sdpa):
        q, k, v = _qkv(sum(MIXED), "cpu", torch.float32)
        with torch.no_grad():
            varlen_attention(q, k, v, _cu(MIXED, "cpu"))
        assert len(spy_sdpa) == 3

    def test_autocast_keeps_sdpa(self, spy_sdpa):
        """Under autocast (the training recipe's no-grad pass) the softmax would run in float32: SDPA runs."""
        q, k, v = _qkv(sum(MIXED), "cpu", torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = varlen_attention(q, k, v, _cu(MIXED, "cpu"))
        assert len(spy_sdpa) == 3
        reference = _per_sequence_reference(q.double(), k.double(), v.double(), MIXED, MIXED)
        torch.testing.assert_close(out.double(), reference, **tolerance(torch.bfloat16))
