import pytest
import torch
from conftest import tolerance

from kornia_siglip2.attention import Attention, fused_linear, fused_linear_available
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.layers import (
    Encoder,
    EncoderBlock,
    activation,
    compile_blocks,
    lecun_normal_,
    uncompile_blocks,
)
from kornia_siglip2.packing import VarlenLayout


class TestActivation:
    def test_gelu_tanh(self):
        x = torch.linspace(-3, 3, 13)
        torch.testing.assert_close(activation("gelu_pytorch_tanh")(x), torch.nn.functional.gelu(x, approximate="tanh"))

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="Unknown activation 'swish'"):
            activation("swish")


class TestAttention:
    def test_matches_multihead_attention(self, device, dtype):
        """q/k/v projections + varlen SDPA == torch's MultiheadAttention applied to each sequence alone."""
        torch.manual_seed(0)
        attention = Attention(16, num_heads=4).to(device, dtype)
        reference = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(device, dtype)
        with torch.no_grad():
            reference.in_proj_weight.copy_(
                torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            )
            reference.in_proj_bias.copy_(
                torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
            )
            reference.out_proj.load_state_dict(attention.out_proj.state_dict())
        tokens = torch.randn(9, 16, device=device, dtype=dtype)
        out, _ = attention(tokens, VarlenLayout.from_seqlens([4, 5], device=device))
        expected = torch.cat([reference(x[None], x[None], x[None])[0][0] for x in tokens.split([4, 5])])
        torch.testing.assert_close(out, expected, **tolerance(dtype))

    def test_cross_attention_of_another_width(self):
        torch.manual_seed(0)
        attention = Attention(8, num_heads=2, key_width=12).double()
        queries, keys = torch.randn(2, 8, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
        out, _ = attention(queries, VarlenLayout.from_seqlens([1, 1], [3, 4]), keys)
        alone = torch.cat(
            [
                attention(q[None], VarlenLayout.from_seqlens([1], [len(k)]), k)[0]
                for q, k in zip(queries, keys.split([3, 4]), strict=True)
            ]
        )
        torch.testing.assert_close(out, alone, atol=1e-12, rtol=1e-12)

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="divisible by num_heads"):
            Attention(10, num_heads=4)
        with pytest.raises(ValueCheckError, match="Unknown attention backend"):
            Attention(8, num_heads=2, backend="magic")


class TestEncoderBlock:
    def test_matches_transformers_layer(self):
        """Our block == transformers' SiglipEncoderLayer on the same weights, each sequence run alone there."""
        transformers = pytest.importorskip("transformers")
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        config = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4)
        # sdpa: float64 end to end (the eager path takes its softmax in float32, bounding agreement at ~1e-7)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        reference = SiglipEncoderLayer(config).double().eval()
        block = EncoderBlock(16, 4, 24).double().eval()
        missing = block.load_state_dict(reference.state_dict(), strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys
        tokens = torch.randn(9, 16, dtype=torch.float64)
        out, _ = block(tokens, VarlenLayout.from_seqlens([4, 5]))
        expected = torch.cat([reference(x[None], attention_mask=None)[0] for x in tokens.split([4, 5])])
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)

    def test_gradcheck(self):
        torch.manual_seed(0)
        block = EncoderBlock(4, 2, 8).double()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: block(t, VarlenLayout.from_seqlens([2, 3]))[0], (x,))

    def test_dynamo(self, device, dtype):
        torch.manual_seed(0)
        block = EncoderBlock(8, 2, 16).to(device, dtype)
        layout = VarlenLayout.from_seqlens([3, 4, 3], device=device)
        x = torch.rand(10, 8, device=device, dtype=dtype)
        compiled = torch.compile(lambda t: block(t, layout)[0], fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), block(x, layout)[0], **tolerance(dtype))


class TestEncoder:
    def test_cardinality(self, device, dtype):
        encoder = Encoder(3, width=8, num_heads=2, hidden_width=16).to(device, dtype)
        layout = VarlenLayout.from_seqlens([3, 4], device=device)
        tokens, states, weights = encoder(torch.rand(7, 8, device=device, dtype=dtype), layout, True, True)
        assert tokens.shape == (7, 8) and len(states) == 4 and torch.equal(states[-1], tokens)
        assert len(weights) == 3 and [tuple(w.shape) for w in weights[0]] == [(2, 3, 3), (2, 4, 4)]

    def test_gradient_checkpointing_same_gradients(self):
        torch.manual_seed(0)
        encoder = Encoder(2, width=8, num_heads=2, hidden_width=16).double().train()
        x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
        layout = VarlenLayout.from_seqlens([3, 4])
        plain = torch.autograd.grad(encoder(x, layout)[0].square().sum(), (x, *encoder.parameters()))
        encoder.set_grad_checkpointing(True)
        checkpointed = torch.autograd.grad(encoder(x, layout)[0].square().sum(), (x, *encoder.parameters()))
        for a, b in zip(plain, checkpointed, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_lecun_normal_statistics():
    torch.manual_seed(0)
    weight = lecun_normal_(torch.empty(512, 3, 16, 16))
    fan_in = 3 * 16 * 16
    assert abs(weight.std().item() - fan_in**-0.5) < 0.02 * fan_in**-0.5
    assert weight.abs().max().item() <= 2 * fan_in**-0.5 / 0.87962566103423978 + 1e-7


def _block_reference(block: EncoderBlock, tokens: torch.Tensor, seqlens: tuple[int, ...]) -> torch.Tensor:
    """The pre-LN block written out in float64 with plain ``torch.nn.functional`` calls, sequence by sequence."""
    F = torch.nn.functional
    p = {name: value.detach().double() for name, value in block.state_dict().items()}
    x = tokens.double()
    width, heads = x.shape[-1], block.self_attn.num_heads
    h = F.layer_norm(x, (width,), p["layer_norm1.weight"], p["layer_norm1.bias"], block.layer_norm1.eps)
    outputs = []
    for part in h.split(list(seqlens)):
        q, k, v = (
            F.linear(part, p[f"self_attn.{n}_proj.weight"], p[f"self_attn.{n}_proj.bias"]).view(len(part), heads, -1)
            for n in "qkv"
        )
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(part), width))
    x = x + F.linear(torch.cat(outputs), p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"])
    h = F.layer_norm(x, (width,), p["layer_norm2.weight"], p["layer_norm2.bias"], block.layer_norm2.eps)
    h = F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]), approximate="tanh")
    return x + F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


class TestInferencePath:
    """The CPU inference path (oneDNN fused linears, one q/k/v matmul) against the block written out."""

    seqlens = (5, 7, 7)

    def _block(self, device, dtype):
        torch.manual_seed(0)
        block = EncoderBlock(16, num_heads=4, hidden_width=32).to(device, dtype)
        with torch.no_grad():  # biases and norms off their init, so that a dropped one would show
            for parameter in block.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        return block, torch.randn(sum(self.seqlens), 16, device=device, dtype=dtype)

    @pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
    def test_matches_formula(self, device, dtype, mode):
        block, tokens = self._block(device, dtype)
        layout = VarlenLayout.from_seqlens(list(self.seqlens), device=device)
        context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
        with context() if context else torch.enable_grad():
            out, _ = block(tokens, layout)
        expected = _block_reference(block, tokens, self.seqlens).to(dtype)
        torch.testing.assert_close(out.detach(), expected, **tolerance(dtype))

    def test_float16(self):
        """float16 (oneDNN runs it on CPUs with AVX-512 FP16, the plain path elsewhere) matches too."""
        block, tokens = self._block("cpu", torch.float16)
        with torch.no_grad():
            out, _ = block(tokens, VarlenLayout.from_seqlens(list(self.seqlens)))
        expected = _block_reference(block, tokens, self.seqlens).to(torch.float16)
        torch.testing.assert_close(out, expected, **tolerance(torch.float16))

    def test_fast_path_is_taken_on_cpu(self, dtype):
        """Where oneDNN runs the dtype, the no-grad path of the test above is the fused one."""
        from kornia_siglip2.attention import _onednn_supports

        block, tokens = self._block("cpu", dtype)
        with torch.no_grad():
            taken = fused_linear_available(tokens, block.mlp.fc1.weight)
        assert taken == _onednn_supports(dtype)
        assert not fused_linear_available(tokens, block.mlp.fc1.weight)  # grad enabled, weight needs grad

    def test_fast_path_follows_the_parameters(self, device, dtype):
        """In-place updates, load_state_dict and dtype conversion all reach the fast path (nothing cached)."""
        block, tokens = self._block(device, dtype)
        layout = VarlenLayout.from_seqlens(list(self.seqlens), device=device)
        with torch.no_grad():
            block(tokens, layout)
            block.self_attn.k_proj.weight.mul_(-2.0)  # an optimizer step would do this in place
            block.self_attn.v_proj.bias.add_(1.0)
            out, _ = block(tokens, layout)
        torch.testing.assert_close(out, _block_reference(block, tokens, self.seqlens).to(dtype), **tolerance(dtype))
        state = {name: value.clone() for name, value in block.state_dict().items()}
        state["self_attn.q_proj.weight"].mul_(0.5)
        block.load_state_dict(state)
        with torch.no_grad():
            out, _ = block(tokens, layout)
        torch.testing.assert_close(out, _block_reference(block, tokens, self.seqlens).to(dtype), **tolerance(dtype))
        block.double()
        with torch.no_grad():
            out, _ = block(tokens.double(), layout)
        torch.testing.assert_close(out, _block_reference(block, tokens, self.seqlens), **tolerance(torch.float64))

    def test_gradients_flow_to_the_projections(self, device, dtype):
        """Training takes the plain path: every projection gets a gradient, also after a no-grad forward."""
        block, tokens = self._block(device, dtype)
        layout = VarlenLayout.from_seqlens(list(self.seqlens), device=device)
        with torch.no_grad():
            block(tokens, layout)  # the fast path first
        block(tokens, layout)[0].square().sum().backward()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            grad = getattr(block.self_attn, name).weight.grad
            assert grad is not None and bool(grad.abs().sum() > 0), name

    def test_bias_only_training(self, device, dtype):
        """Only the attention biases train (BitFit-style): the q/k/v biases still get their gradients."""
        block, tokens = self._block(device, dtype)
        for name, parameter in block.named_parameters():
            parameter.requires_grad_(name.startswith("self_attn.") and name.endswith("bias"))
        block(tokens, VarlenLayout.from_seqlens(list(self.seqlens), device=device))[0].square().sum().backward()
        for name in ("q_proj", "k_proj", "v_proj"):
            grad = getattr(block.self_attn, name).bias.grad
            assert grad is not None and bool(grad.abs().sum() > 0), name

    def test_hooks_and_switch_keep_the_plain_path(self, device, dtype, monkeypatch):
        """A forward hook on a projection still fires; FUSED_CPU_KERNELS=False gives the same tokens."""
        import kornia_siglip2.attention as attention_module

        block, tokens = self._block(device, dtype)
        layout = VarlenLayout.from_seqlens(list(self.seqlens), device=device)
        seen = []
        handle = block.self_attn.q_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        with torch.no_grad():
            hooked, _ = block(tokens, layout)
        handle.remove()
        assert seen == [torch.Size([sum(self.seqlens), 16])]
        monkeypatch.setattr(attention_module, "FUSED_CPU_KERNELS", False)
        with torch.no_grad():
            plain, _ = block(tokens, layout)
        monkeypatch.setattr(attention_module, "FUSED_CPU_KERNELS", True)
        with torch.no_grad():
            fused, _ = block(tokens, layout)
        expected = _block_reference(block, tokens, self.seqlens).to(dtype)
        for out in (hooked, plain, fused):
            torch.testing.assert_close(out, expected, **tolerance(dtype))


class TestFusedLinear:
    @pytest.mark.parametrize("activation_name", ["none", "gelu_tanh", "gelu"])
    def test_matches_functional(self, device, dtype, activation_name):
        F = torch.nn.functional
        torch.manual_seed(0)
        x, w, b = torch.randn(6, 8, device=device, dtype=dtype), torch.randn(12, 8), torch.randn(12)
        w, b = w.to(device, dtype), b.to(device, dtype)
        reference = F.linear(x.double(), w.double(), b.double())
        if activation_name == "gelu_tanh":
            reference = F.gelu(reference, approximate="tanh")
        elif activation_name == "gelu":
            reference = F.gelu(reference)
        with torch.no_grad():
            out = fused_linear(x, w, b, activation_name)
        torch.testing.assert_close(out, reference.to(dtype), **tolerance(dtype))
        residual = torch.randn(6, 12, device=device, dtype=dtype)
        if activation_name == "none":
            with torch.no_grad():
                out = fused_linear(x, w, b, residual=residual)
            torch.testing.assert_close(out, (residual.double() + reference).to(dtype), **tolerance(dtype))

    def test_exception(self):
        x, w = torch.rand(2, 4), torch.rand(3, 4)
        with pytest.raises(ValueCheckError, match="Unknown activation 'relu'"):
            fused_linear(x, w, None, "relu")
        with pytest.raises(ValueCheckError, match="residual only without an activation"):
            fused_linear(x, w, None, "gelu", residual=torch.rand(2, 3))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after (the compiled regions are shared process-wide)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


class TestCompileBlocks:
    """Regional compilation: the per-token halves of every block compiled once, attention eager in between."""

    layouts = ((5, 7, 7), (16,), (3, 1, 9, 2, 4), (11, 11))

    def _encoder(self, dtype=torch.float32):
        torch.manual_seed(0)
        encoder = Encoder(3, width=16, num_heads=4, hidden_width=32).to(dtype)
        with torch.no_grad():  # biases and norms off their init, so that a dropped one would show
            for parameter in encoder.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        return encoder

    def _reference(self, encoder, tokens, seqlens):
        for block in encoder.layers:
            tokens = _block_reference(block, tokens, seqlens)
        return tokens

    def test_no_recompilation_across_layouts(self, fresh_dynamo):
        """Batches of other sizes, sequence counts and lengths reuse the two graphs of the first batch."""
        encoder = compile_blocks(self._encoder(), backend="aot_eager")
        with torch.no_grad():
            for index, seqlens in enumerate(self.layouts):
                tokens = torch.randn(sum(seqlens), 16)
                out, _, _ = encoder(tokens, VarlenLayout.from_seqlens(list(seqlens)))
                torch.testing.assert_close(
                    out.double(), self._reference(encoder, tokens, seqlens), **tolerance(torch.float32)
                )
                if index == 0:
                    first = dict(fresh_dynamo["stats"])
        # two graphs (before / after attention) for three blocks and four layouts
        assert first["unique_graphs"] == 2
        assert fresh_dynamo["stats"]["unique_graphs"] == 2

    def test_inductor_matches_formula(self, fresh_dynamo, dtype):
        """The inductor-generated kernels against the blocks written out in float64, on two layouts."""
        from torch._inductor import config

        encoder = compile_blocks(self._encoder(dtype))
        with config.patch(compile_threads=1), torch.inference_mode():
            for seqlens in self.layouts[:2]:
                tokens = torch.randn(sum(seqlens), 16, dtype=dtype)
                out, _, _ = encoder(tokens, VarlenLayout.from_seqlens(list(seqlens)))
                torch.testing.assert_close(out.double(), self._reference(encoder, tokens, seqlens), **tolerance(dtype))
        assert fresh_dynamo["stats"]["unique_graphs"] == 2

    def test_gradients_match_eager(self, fresh_dynamo):
        encoder, eager = compile_blocks(self._encoder(), backend="aot_eager"), self._encoder()
        gradients = []
        for module in (encoder, eager):
            tokens = torch.randn(19, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
            out, _, _ = module(tokens, VarlenLayout.from_seqlens([5, 7, 7]))
            out.square().sum().backward()
            gradients.append([tokens.grad] + [p.grad for p in module.parameters()])
        for actual, expected in zip(*gradients, strict=True):
            torch.testing.assert_close(actual, expected, **tolerance(torch.float32))

    def test_attention_weights_and_uncompile(self, fresh_dynamo):
        encoder = compile_blocks(self._encoder(), backend="aot_eager")
        layout = VarlenLayout.from_seqlens([4, 3])
        tokens = torch.randn(7, 16)
        _, _, weights = encoder(tokens, layout, output_attentions=True)
        assert [tuple(w.shape) for w in weights[0]] == [(4, 4, 4), (4, 3, 3)]
        assert uncompile_blocks(encoder) is encoder
        assert all(block.compile_options is None for block in encoder.layers)
        assert set(encoder.state_dict()) == set(self._encoder().state_dict())  # compiling adds no state

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="Linear holds no EncoderBlock"):
            compile_blocks(torch.nn.Linear(2, 2))
        with pytest.raises(TypeError, match="unhashable"):
            compile_blocks(self._encoder(), options={"max_autotune": True})
