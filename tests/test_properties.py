"""Property tests (hypothesis): invariants over random grids, boundaries, images and checkpoints (issue 14).

The default run draws a few examples per property (profile ``default`` in conftest.py); ``make test-all`` sets
``HYPOTHESIS_PROFILE=deep`` for many more. Every property compares against an independent computation: the
inverse function, one-image-at-a-time runs, another backend, transformers' function, or the saved tensors.
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kornia_siglip2.attention import varlen_attention  # noqa: E402
from kornia_siglip2.packing import (  # noqa: E402
    packed_to_padded,
    padded_to_packed,
    patchify,
    unpatchify,
)

CPU_BACKENDS = ("dense", "grouped", "loop", "eager")
EVERY_BACKEND = (*CPU_BACKENDS, "flash", "auto")

seeds = st.integers(0, 2**31 - 1)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 3]),
    patch=st.integers(1, 4),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    seed=seeds,
)
def test_patchify_unpatchify_round_trip(batch, channels, patch, grid, seed):
    images = _randn(seed, batch, channels, grid[0] * patch, grid[1] * patch)
    patches, grid_thw = patchify(images, patch)
    assert patches.shape == (batch * grid[0] * grid[1], patch * patch * channels)
    assert grid_thw.tolist() == [[1, grid[0], grid[1]]] * batch
    assert torch.equal(torch.cat(unpatchify(patches, grid_thw, patch)), images)
    # patch (i, j) of image b is the pixel block it names, in (py, px, c) order
    b, i, j = batch - 1, grid[0] - 1, grid[1] // 2
    block = images[b, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].permute(1, 2, 0).flatten()
    assert torch.equal(patches[(b * grid[0] + i) * grid[1] + j], block)


grids = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4)


@given(shapes=grids, seed=seeds, extra=st.integers(0, 3))
def test_padded_packed_round_trip(shapes, seed, extra):
    lengths = [h * w for h, w in shapes]
    tokens = _randn(seed, sum(lengths), 6)
    seqlens = torch.tensor(lengths)
    padded, mask = packed_to_padded(tokens, seqlens, max(lengths) + extra)
    assert padded.shape == (len(lengths), max(lengths) + extra, 6)
    assert mask.sum(-1).tolist() == lengths and not padded[~mask].any()
    spatial_shapes = torch.tensor(shapes)
    packed, grid_thw = padded_to_packed(padded, mask, spatial_shapes)
    assert torch.equal(packed, tokens)
    assert grid_thw.tolist() == [[1, h, w] for h, w in shapes]


@given(
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
    patch=st.sampled_from([14, 16]),
    budget=st.sampled_from([16, 64, 256, 576, 1024]),
)
def test_naflex_target_size_is_transformers_and_within_budget(height, width, patch, budget):
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    from kornia_siglip2.preprocess import naflex_target_size

    size = naflex_target_size(height, width, patch, budget)
    assert size == tuple(get_image_size_for_max_num_patches(height, width, patch, budget))
    assert size[0] % patch == 0 and size[1] % patch == 0 and min(size) >= patch
    assert (size[0] // patch) * (size[1] // patch) <= budget


@st.composite
def boundaries(draw, max_sequences: int = 4, max_length: int = 6):
    lengths = draw(st.lists(st.integers(1, max_length), min_size=1, max_size=max_sequences))
    keys = draw(
        st.one_of(st.none(), st.lists(st.integers(1, max_length), min_size=len(lengths), max_size=len(lengths)))
    )
    return lengths, keys


def _cumsum(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@given(layout=boundaries(), seed=seeds)
def test_backends_equal_for_random_cu_seqlens(layout, seed):
    """Every CPU backend equals the loop over sequences, self- and cross-attention (float64)."""
    lengths, keys = layout
    key_lengths = lengths if keys is None else keys
    query = _randn(seed, sum(lengths), 2, 4)
    key, value = _randn(seed + 1, sum(key_lengths), 2, 4), _randn(seed + 2, sum(key_lengths), 2, 5)
    cu_k = None if keys is None else _cumsum(keys)
    expected = []
    for i in range(len(lengths)):
        q0, q1 = sum(lengths[:i]), sum(lengths[: i + 1])
        k0, k1 = sum(key_lengths[:i]), sum(key_lengths[: i + 1])
        weights = torch.softmax(query[q0:q1].transpose(0, 1) @ key[k0:k1].permute(1, 2, 0) / 2.0, dim=-1)
        expected.append((weights @ value[k0:k1].transpose(0, 1)).transpose(0, 1))  # written from the formula
    expected = torch.cat(expected)
    for backend in CPU_BACKENDS:
        out = varlen_attention(query, key, value, _cumsum(lengths), cu_seqlens_k=cu_k, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12, msg=backend)


@st.composite
def invalid_boundaries(draw):
    lengths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    kind = draw(st.sampled_from(["start", "decrease", "end", "float", "bool", "list", "2d", "single"]))
    if kind == "start":
        cu[0] = draw(st.integers(1, 3))
    elif kind == "decrease" and len(cu) > 2:
        index = draw(st.integers(1, len(cu) - 2))
        cu[index] = cu[index + 1] + draw(st.integers(0, 2))  # equal or above the next boundary
    elif kind in ("decrease", "end"):
        cu[-1] += draw(st.sampled_from([-1, 1, 2])) if cu[-1] > 1 else 1
    total = sum(lengths)
    if kind == "float":
        return torch.tensor(cu, dtype=torch.float32), total
    if kind == "bool":
        return torch.tensor(cu).bool(), total
    if kind == "list":
        return cu, total
    if kind == "2d":
        return torch.tensor(cu)[None], total
    if kind == "single":
        return torch.tensor([0]), total
    return torch.tensor(cu), total


@given(case=invalid_boundaries(), backend=st.sampled_from(EVERY_BACKEND))
def test_invalid_cu_seqlens_rejected_by_every_backend(case, backend):
    cu_seqlens, total = case
    query = _randn(0, total, 2, 4)
    with pytest.raises((ValueError, TypeError), match="cu_seqlens"):
        varlen_attention(query, query, query, cu_seqlens, backend=backend)


@pytest.fixture(scope="module")
def tower(siglip2_checkpoint):
    from kornia_siglip2 import load_vision_tower

    return load_vision_tower(siglip2_checkpoint, dtype=torch.float64)


def _set_backend(module: torch.nn.Module, backend: str) -> None:
    from kornia_siglip2.attention import Attention

    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.backend = backend


@given(shapes=grids, seed=seeds, backend=st.sampled_from(CPU_BACKENDS))
def test_packed_equals_one_by_one(tower, shapes, seed, backend):
    """A packed batch of random NaFlex grids gives each image's own embedding (float64, every CPU backend)."""
    grid_thw = torch.tensor([[1, h, w] for h, w in shapes])
    patches = _randn(seed, int(grid_thw.prod(-1).sum()), 48)
    try:
        with torch.no_grad():
            _set_backend(tower, backend)
            packed = tower(patches, grid_thw).pooler_output
            _set_backend(tower, "loop")
            alone = [
                tower(chunk, grid[None]).pooler_output
                for chunk, grid in zip(patches.split(grid_thw.prod(-1).tolist()), grid_thw, strict=True)
            ]
    finally:
        _set_backend(tower, "auto")
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-10, rtol=1e-10)


@given(seed=seeds, shard=st.one_of(st.none(), st.integers(2_000, 60_000)), data=st.data())
def test_save_load_round_trip(siglip2_checkpoint, tmp_path_factory, seed, shard, data):
    """Random weights survive save (single file or random shard sizes) and load bit for bit."""
    from kornia_siglip2 import SigLip2

    model = SigLip2.from_pretrained(siglip2_checkpoint)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("roundtrip")
    if data.draw(st.booleans(), label="save twice"):  # a second save over the first must replace it
        model.save_pretrained(folder, max_shard_size=data.draw(st.integers(2_000, 60_000), label="first shard"))
    model.save_pretrained(folder, max_shard_size=shard)
    reloaded = SigLip2.from_pretrained(folder)
    for (key, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
