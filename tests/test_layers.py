import pytest
import torch
from conftest import tolerance

from kornia_siglip2.attention import Attention
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.layers import Encoder, EncoderBlock, activation, lecun_normal_
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
        compiled = torch.compile(lambda t: block(t, layout)[0], fullgraph=True)
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
