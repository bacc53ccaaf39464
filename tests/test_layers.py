import pytest
import torch
from conftest import tolerance

from kornia_siglip2.attention import VarlenLayout
from kornia_siglip2.layers import MLP, Encoder, EncoderBlock, SelfAttention, activation


class TestActivation:
    def test_gelu_tanh(self):
        x = torch.linspace(-3, 3, 13)
        torch.testing.assert_close(activation("gelu_pytorch_tanh")(x), torch.nn.functional.gelu(x, approximate="tanh"))

    def test_exception(self):
        with pytest.raises(ValueError, match="Unknown activation 'swish'"):
            activation("swish")


class TestSelfAttention:
    def test_matches_multihead_attention(self, device, dtype):
        """Fused qkv + varlen SDPA == torch's MultiheadAttention applied to each sequence alone."""
        torch.manual_seed(0)
        attention = SelfAttention(16, num_heads=4).to(device, dtype)
        reference = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(device, dtype)
        with torch.no_grad():
            reference.in_proj_weight.copy_(attention.qkv.weight)
            reference.in_proj_bias.copy_(attention.qkv.bias)
            reference.out_proj.load_state_dict(attention.out_proj.state_dict())
        tokens = torch.randn(9, 16, device=device, dtype=dtype)
        out = attention(tokens, VarlenLayout.from_seqlens([4, 5], device=device))
        expected = torch.cat([reference(x[None], x[None], x[None])[0][0] for x in tokens.split([4, 5])])
        torch.testing.assert_close(out, expected, **tolerance(dtype))

    def test_exception(self):
        with pytest.raises(ValueError, match="divisible by num_heads"):
            SelfAttention(10, num_heads=4)


class TestEncoder:
    def test_cardinality(self, device, dtype):
        encoder = Encoder(3, width=8, num_heads=2, hidden_width=16).to(device, dtype)
        tokens, states = encoder(torch.rand(7, 8, device=device, dtype=dtype), VarlenLayout.from_seqlens([3, 4]), True)
        assert tokens.shape == (7, 8) and len(states) == 4 and torch.equal(states[-1], tokens)

    def test_block_is_pre_ln(self):
        torch.manual_seed(0)
        block = EncoderBlock(8, 2, 16).double()
        x = torch.randn(5, 8, dtype=torch.float64)
        layout = VarlenLayout.from_seqlens([5])
        h = x + block.self_attn(block.layer_norm1(x), layout)
        torch.testing.assert_close(block(x, layout), h + block.mlp(block.layer_norm2(h)))

    def test_gradcheck(self):
        torch.manual_seed(0)
        block = EncoderBlock(4, 2, 8).double()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: block(t, VarlenLayout.from_seqlens([2, 3])), (x,))

    def test_dynamo(self, device, dtype):
        torch.manual_seed(0)
        mlp = MLP(8, 16).to(device, dtype)
        x = torch.rand(4, 8, device=device, dtype=dtype)
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x), **tolerance(dtype))
