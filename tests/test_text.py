import pytest
import torch
from conftest import TEXT, tolerance

from kornia_siglip2.config import TextConfig
from kornia_siglip2.text import TextTransformer

CONFIG = {key: value for key, value in TEXT.items() if key not in ("bos_token_id", "eos_token_id")}


@pytest.fixture
def tower(device, dtype):
    torch.manual_seed(0)
    return TextTransformer(TextConfig(**CONFIG)).to(device, dtype).eval()


class TestTextTransformer:
    def test_smoke(self, tower, device):
        out = tower(torch.randint(0, 99, (2, 64), device=device))
        assert out.hidden_states is None

    def test_cardinality(self, tower, device):
        out = tower(torch.randint(0, 99, (3, 10), device=device), output_hidden_states=True)
        assert out.last_hidden_state.shape == (3, 10, 48) and out.pooler_output.shape == (3, 32)
        assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 10, 48)

    def test_pools_last_position(self, tower, device, dtype):
        out = tower(torch.randint(0, 99, (2, 12), device=device))
        torch.testing.assert_close(out.pooler_output, tower.head(out.last_hidden_state[:, -1]), **tolerance(dtype))

    def test_sequences_are_independent(self, tower, device):
        ids = torch.randint(0, 99, (3, 12), device=device)
        batched = tower(ids).pooler_output
        alone = torch.cat([tower(row[None]).pooler_output for row in ids])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)

    def test_exception(self, tower):
        with pytest.raises(ValueError, match=r"shape \(B, L\)"):
            tower(torch.zeros(12, dtype=torch.long))
        with pytest.raises(ValueError, match="attention_mask must match"):
            tower(torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 11))

    def test_gradcheck(self):
        torch.manual_seed(0)
        config = TextConfig(
            vocab_size=11,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=4,
            projection_size=3,
        )
        tower = TextTransformer(config).double()
        weight = tower.embeddings.token_embedding.weight
        ids = torch.tensor([[1, 2, 3], [4, 5, 6]])

        def pooled(table):
            return torch.func.functional_call(tower, {"embeddings.token_embedding.weight": table}, (ids,)).pooler_output

        assert torch.autograd.gradcheck(pooled, (weight.detach().clone().requires_grad_(True),))

    def test_dynamo(self, tower, device, dtype):
        ids = torch.randint(0, 99, (2, 16), device=device)
        torch._dynamo.reset()
        compiled = torch.compile(tower, fullgraph=True)  # inductor, one graph
        torch.testing.assert_close(compiled(ids).pooler_output, tower(ids).pooler_output, **tolerance(dtype))
