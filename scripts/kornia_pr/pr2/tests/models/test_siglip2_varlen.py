# LICENSE HEADER MANAGED BY add-license-header
#
# Copyright 2018 Kornia Team
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#

"""Packed variable-length attention of the SigLip2 vision tower for (B, N) patch masks.

The expected values are transformers 5.24.0 ``Siglip2Model.vision_model`` outputs in float64 on the seeded NaFlex
weights of ``test_siglip2_parity._hf_state_dict``, for two 8 x 20 images whose second one has its last 4 of 10 patches
masked, printed by this generation snippet (``scripts/kornia_pr/generate_pr2_values.py`` in kornia_siglip2)::

    patches = images.reshape(2, 3, 2, 4, 5, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 10, 48)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model.vision_model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[2, 5]] * 2))
    print(out.pooler_output[:, :4], out.last_hidden_state[1, :6, 0])
"""

import pytest
import torch

from kornia.models.siglip2.attention import SigLip2Attention, _varlen_attention

from testing.base import BaseTester

from tests.models.test_siglip2_parity import _inputs, _loaded_model

# transformers 5.24.0, torch 2.13.0, float64
PADDED_POOLED = [
    [3.370542867745, -0.068949660168, -1.886936262206, -1.26108455167],
    [2.342161183248, 0.116034012014, -1.180404274968, -2.242133310445],
]
PADDED_HIDDEN_IMAGE1_CHANNEL0 = [
    1.860485339539,
    1.641253937262,
    1.525299749414,
    2.245727535013,
    1.226452062601,
    1.95660537337,
]


def _mask(device: torch.device) -> torch.Tensor:
    mask = torch.ones(2, 10, dtype=torch.long, device=device)
    mask[1, 6:] = 0
    return mask


class TestSigLip2PackedAttention(BaseTester):
    def test_smoke(self, device, dtype):
        query = torch.rand(7, 2, 4, device=device, dtype=dtype)
        assert _varlen_attention(query, query, query, [0, 3, 7]).shape == (7, 2, 4)

    def test_exception(self, device, dtype):
        vision = _loaded_model(True, device, dtype).vision_model
        images, _ = _inputs(8, 20, device, dtype)
        with pytest.raises(Exception, match="patch mask"):
            vision(images, attention_mask=torch.ones(2, 9, device=device))

    @pytest.mark.parametrize("lengths", [[1], [3, 3], [2, 5, 1]])
    def test_cardinality(self, device, dtype, lengths):
        cu_seqlens = [0]
        for length in lengths:
            cu_seqlens.append(cu_seqlens[-1] + length)
        query = torch.rand(cu_seqlens[-1], 2, 4, device=device, dtype=dtype)
        out = _varlen_attention(query, query, query, cu_seqlens)
        assert out.shape == query.shape

    @pytest.mark.parametrize("cu_seqlens", [[0, 4, 9], [0, 3, 6, 9], [0, 2, 7, 9]])
    def test_block_diagonal(self, device, dtype, cu_seqlens):
        # each segment attends to itself only: softmax(q k^T / sqrt(head_dim)) v per segment, per head
        query, key, value = torch.rand(3, 9, 2, 4, device=device, dtype=dtype)
        out = _varlen_attention(query, key, value, cu_seqlens)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [H, L, Dh]
            expected = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v  # sqrt(head_dim = 4) = 2
            self.assert_close(out[start:end], expected.transpose(0, 1))

    def test_matches_transformers(self, device, dtype):
        vision = _loaded_model(True, device, dtype).vision_model
        images, _ = _inputs(8, 20, device, dtype)
        with torch.no_grad():
            pooled, hidden = vision(images, attention_mask=_mask(device))
        self.assert_close(pooled[:, :4], torch.tensor(PADDED_POOLED, device=device, dtype=dtype))
        self.assert_close(hidden[1, :6, 0], torch.tensor(PADDED_HIDDEN_IMAGE1_CHANNEL0, device=device, dtype=dtype))
        # the padded patches are not computed: zero before the final layer norm, its bias after it
        self.assert_close(hidden[1, 6:], vision.post_layernorm.bias.expand(4, -1))

    def test_same_as_padded_batch(self, device, dtype):
        # a (B, 1, N, N) mask takes the padded-batch path of Kornia 0.9.0: same valid outputs and pooling
        vision = _loaded_model(True, device, dtype).vision_model
        images, _ = _inputs(8, 20, device, dtype)
        mask = _mask(device)
        with torch.no_grad():
            pooled, hidden = vision(images, attention_mask=mask)
            dense_pooled, dense_hidden = vision(images, attention_mask=mask[:, None, None, :].expand(2, 1, 10, 10))
        self.assert_close(pooled, dense_pooled)
        self.assert_close(hidden[mask.bool()], dense_hidden[mask.bool()])

    def test_gradcheck(self, device):
        layer = SigLip2Attention(hidden_size=4, num_heads=2).to(device, torch.float64)
        hidden = torch.rand(5, 4, device=device, dtype=torch.float64)
        self.gradcheck(lambda x: layer._forward_packed(x, [0, 2, 5]), (hidden,))

    def test_dynamo(self, device, dtype, torch_optimizer):
        query, key, value = torch.rand(3, 9, 2, 4, device=device, dtype=dtype)
        compiled = torch_optimizer(_varlen_attention)
        self.assert_close(compiled(query, key, value, [0, 4, 9]), _varlen_attention(query, key, value, [0, 4, 9]))
