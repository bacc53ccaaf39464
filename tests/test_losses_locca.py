import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance

from kornia_siglip2 import SigLip2Config, TextConfig, VisionConfig, VisionTransformer, patchify
from kornia_siglip2.decoders import (
    TASKS,
    LocCaDecoder,
    LocCaTargets,
    LocCaVocabulary,
    generate,
    generate_boxes,
    generate_captions,
    generate_region_captions,
    shift_right,
)
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses.locca import LocCaLoss, chunked_cross_entropy, sequence_cross_entropy
from kornia_siglip2.packing import ImageLayout

IMAGE_TOKENS = [6, 11, 4]  # three images of different sizes, packed
IMAGE_WIDTH = 24  # differs from the decoder width: keys/values are projected from it
LENGTH = 8


def _cu(lengths, device=None):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _vocabulary(text_vocab_size=30, num_bins=10):
    return LocCaVocabulary(text_vocab_size=text_vocab_size, num_bins=num_bins, pad_token_id=0, eos_token_id=1)


def _decoder(device="cpu", dtype=torch.float32, vocab_size=40, width=16, num_layers=2, perturb=True, seed=0):
    """A tiny decoder; ``perturb`` moves the zero-init head off zero so that logits depend on the input."""
    torch.manual_seed(seed)
    decoder = LocCaDecoder(vocab_size, width, 2, 2 * width, num_layers, LENGTH, image_width=IMAGE_WIDTH)
    if perturb:
        with torch.no_grad():
            decoder.head.weight.normal_(std=width**-0.5)
            decoder.head.bias.normal_(std=0.1)
    return decoder.to(device=device, dtype=dtype)


def _image_tokens(device, dtype, lengths=IMAGE_TOKENS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(sum(lengths), IMAGE_WIDTH, generator=generator, dtype=torch.float64)
    return tokens.to(device=device, dtype=dtype), _cu(lengths, device)


def _targets(vocabulary, batch=3, device=None, seed=0, parallel_probability=0.5):
    generator = torch.Generator().manual_seed(seed)
    high = vocabulary.text_vocab_size
    lengths = torch.randint(1, 9, (2, batch), generator=generator).tolist()
    captions = [torch.randint(2, high, (n,), generator=generator).tolist() for n in lengths[0]]
    regions = [torch.randint(2, high, (min(n, 3),), generator=generator).tolist() for n in lengths[1]]
    corners = torch.rand(batch, 2, 2, generator=generator).sort(dim=1).values  # [B, (min, max), (x, y)]
    return LocCaTargets.build(
        captions,
        regions,
        corners.flatten(1),
        vocabulary,
        LENGTH,
        parallel_probability=parallel_probability,
        generator=generator,
        device=device,
    )


@pytest.fixture
def inline_compile():
    # inductor's pool of compile workers costs more than it saves on two shared cores
    from torch._inductor import config

    with config.patch(compile_threads=1):
        yield


@contextmanager
def _single_thread():
    # tiny ops run faster on one thread than on two cores shared with other jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TestLocCaVocabulary:
    def test_smoke(self):
        vocabulary = LocCaVocabulary(text_vocab_size=32000)
        assert vocabulary.vocab_size == 33000
        assert vocabulary.mask_token_id == 33000
        assert vocabulary.box_token_offset == 32000
        assert vocabulary.start_token_id == vocabulary.pad_token_id == 0
        assert LocCaVocabulary(32000, bos_token_id=2).start_token_id == 2

    def test_from_config(self):
        vocabulary = LocCaVocabulary.from_config(TextConfig(vocab_size=256000, pad_token_id=0), num_bins=1024)
        assert (vocabulary.vocab_size, vocabulary.pad_token_id, vocabulary.eos_token_id) == (257024, 0, 1)

    def test_round_trip_within_one_bin(self, device, dtype):
        vocabulary = LocCaVocabulary(text_vocab_size=100, num_bins=1000)
        boxes = torch.rand(500, 4, generator=torch.Generator().manual_seed(0))
        boxes[:4] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0005, 0.001, 0.999, 0.9995]] * 2)
        boxes = boxes.to(device=device, dtype=dtype)
        tokens = vocabulary.boxes_to_tokens(boxes)
        assert tokens.dtype == torch.long and tokens.shape == boxes.shape
        assert bool(((tokens >= 100) & (tokens < 1100)).all())
        decoded = vocabulary.tokens_to_boxes(tokens)
        error = (decoded - boxes.float()).abs().max().item()
        # the bin centre is at most half a bin away (bf16 inputs are themselves rounded to ~1/256)
        assert error <= 0.5 / 1000 + (4e-3 if dtype == torch.bfloat16 else 1e-6)
        torch.testing.assert_close(vocabulary.boxes_to_tokens(decoded), tokens, rtol=0, atol=0)

    def test_cardinality(self):
        vocabulary = _vocabulary()
        assert vocabulary.boxes_to_tokens(torch.rand(2, 5, 4)).shape == (2, 5, 4)
        assert vocabulary.tokens_to_boxes(torch.full((7, 4), 30)).shape == (7, 4)

    def test_exception(self):
        vocabulary = _vocabulary()
        with pytest.raises(ValueCheckError, match=r"normalized to \[0, 1\]"):
            vocabulary.boxes_to_tokens(torch.tensor([[0.0, 0.0, 1.5, 1.0]]))
        with pytest.raises(ValueError):
            vocabulary.boxes_to_tokens(torch.rand(2, 3))
        with pytest.raises(ValueCheckError, match="box tokens must lie"):
            vocabulary.tokens_to_boxes(torch.tensor([[5, 30, 31, 32]]))
        with pytest.raises(ValueError, match="eos_token_id"):
            LocCaVocabulary(text_vocab_size=10, eos_token_id=10)
        with pytest.raises(ValueError, match="positive"):
            LocCaVocabulary(text_vocab_size=10, num_bins=0)


class TestLocCaTargets:
    def test_smoke(self):
        vocabulary = _vocabulary()
        targets = LocCaTargets.build(
            [[5, 6, 7]], [[8, 9]], torch.tensor([[0.0, 0.25, 0.5, 0.95]]), vocabulary, 10, parallel_probability=0.0
        )
        box = [30, 32, 35, 39]
        assert targets.labels[0].tolist() == [
            [5, 6, 7, 1, 0, 0, 0, 0, 0, 0],
            [8, 9, 1, *box, 0, 0, 0],
            [*box, 8, 9, 1, 0, 0, 0],
        ]
        assert targets.loss_mask[0].int().tolist() == [
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        ]
        assert torch.equal(targets.input_ids, shift_right(targets.labels, vocabulary.start_token_id))
        assert bool(targets.causal.all())

    def test_cardinality(self, device):
        targets = _targets(_vocabulary(), batch=5, device=device)
        for tensor in (targets.input_ids, targets.labels, targets.loss_mask):
            assert tensor.shape == (5, len(TASKS), LENGTH) and tensor.device.type == device.type
        assert targets.causal.shape == (5, 3) and targets.parallel.shape == (5,)
        assert targets.input_ids.dtype == targets.labels.dtype == torch.long
        assert targets.loss_mask.dtype == targets.causal.dtype == torch.bool

    def test_parallel_prediction_inputs(self):
        vocabulary = _vocabulary()
        targets = _targets(vocabulary, batch=64)
        parallel = targets.parallel
        assert 0 < int(parallel.sum()) < 64
        assert bool((targets.input_ids[parallel, 0] == vocabulary.mask_token_id).all())
        teacher = shift_right(targets.labels, vocabulary.start_token_id)
        assert torch.equal(targets.input_ids[~parallel, 0], teacher[~parallel, 0])
        # only captioning is ever parallel; the other tasks are always teacher-forced
        assert torch.equal(targets.input_ids[:, 1:], teacher[:, 1:])
        assert bool(targets.causal[:, 1:].all())
        assert not bool((targets.input_ids[:, 1:] == vocabulary.mask_token_id).any())

    def test_parallel_fraction(self):
        generator = torch.Generator().manual_seed(123)
        vocabulary = _vocabulary()
        draws = [
            LocCaTargets.build(
                [[5]] * 100, [[6]] * 100, torch.rand(100, 4), vocabulary, 6, generator=generator
            ).parallel
            for _ in range(100)
        ]
        fraction = torch.cat(draws).float().mean().item()
        assert abs(fraction - 0.5) < 0.02, fraction

    def test_seeded(self):
        vocabulary = _vocabulary()
        first = _targets(vocabulary, batch=32, seed=7)
        second = _targets(vocabulary, batch=32, seed=7)
        assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.causal, second.causal)
        assert not torch.equal(first.causal, _targets(vocabulary, batch=32, seed=8).causal)

    def test_truncation_keeps_eos(self):
        vocabulary = _vocabulary()
        long = list(range(2, 20))
        targets = LocCaTargets.build([long], [long], torch.tensor([[0.1, 0.1, 0.2, 0.2]]), vocabulary, LENGTH)
        captioning, referring, grounded = targets.labels[0].tolist()
        assert captioning == [*long[: LENGTH - 1], 1]
        assert referring[: LENGTH - 4] == [*long[: LENGTH - 5], 1] and referring[-4:] == [31, 31, 32, 32]
        assert grounded == [31, 31, 32, 32, *long[: LENGTH - 5], 1]

    def test_exception(self):
        vocabulary = _vocabulary()
        boxes = torch.rand(2, 4)
        with pytest.raises(ValueCheckError, match="Expected 2 captions"):
            LocCaTargets.build([[5]], [[5], [6]], boxes, vocabulary, LENGTH)
        with pytest.raises(ValueCheckError, match="max_length must be at least 6"):
            LocCaTargets.build([[5]] * 2, [[5]] * 2, boxes, vocabulary, 5)
        with pytest.raises(ValueCheckError, match="text ids"):
            LocCaTargets.build([[5], [30]], [[5]] * 2, boxes, vocabulary, LENGTH)
        with pytest.raises(ValueCheckError, match="parallel_probability"):
            LocCaTargets.build([[5]] * 2, [[5]] * 2, boxes, vocabulary, LENGTH, parallel_probability=1.5)
        with pytest.raises(ValueError):
            LocCaTargets.build([[5]] * 2, [[5]] * 2, boxes[:, :3], vocabulary, LENGTH)


class TestLocCaDecoder:
    def test_smoke(self, device, dtype):
        decoder = _decoder(device, dtype, perturb=False)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        logits = decoder(torch.randint(0, 41, (3, 2, LENGTH), device=device), tokens, cu_seqlens)
        # zero-init logits layer: every logit is 0, the softmax uniform
        assert logits.shape == (3, 2, LENGTH, 40) and bool((logits == 0).all())
        assert decoder.token_embedding.num_embeddings == 41 and decoder.mask_token_id == 40

    def test_cardinality(self, device, dtype):
        decoder = _decoder(device, dtype)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        input_ids = torch.randint(0, 41, (3, LENGTH - 2), device=device)
        assert decoder.forward_features(input_ids, tokens, cu_seqlens).shape == (3, LENGTH - 2, 16)
        assert decoder(input_ids, tokens, cu_seqlens).shape == (3, LENGTH - 2, 40)

    @pytest.mark.parametrize(("text_layers", "width", "heads", "mlp", "expected"), [
        (12, 768, 12, 3072, 6),  # B
        (24, 1024, 16, 4096, 12),  # L
        (27, 1152, 16, 4304, 13),  # So400m: half of 27, rounded down
    ])  # fmt: skip
    def test_from_config(self, text_layers, width, heads, mlp, expected):
        text = TextConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=mlp,
                          num_hidden_layers=text_layers, vocab_size=256000, pad_token_id=0)  # fmt: skip
        config = SigLip2Config(text_config=text, vision_config=VisionConfig(hidden_size=1152, num_attention_heads=16))
        with torch.device("meta"):  # sizes only: no memory for a 300M-parameter decoder
            decoder = LocCaDecoder.from_config(config)
        assert len(decoder.layers) == expected
        assert decoder.vocab_size == 257000 and decoder.token_embedding.weight.shape == (257001, width)
        assert decoder.layers[0].mlp.fc1.out_features == mlp and decoder.layers[0].self_attn.num_heads == heads
        assert decoder.layers[0].cross_attn.k_proj.in_features == 1152
        assert decoder.max_length == 64

    def test_causal(self, device, dtype):
        decoder = _decoder(device, dtype)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        input_ids = torch.randint(0, 41, (3, LENGTH), device=device)
        changed = input_ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 7) % 41
        before, after = decoder(input_ids, tokens, cu_seqlens), decoder(changed, tokens, cu_seqlens)
        torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
        assert (before[:, 5:] - after[:, 5:]).abs().amax(-1).min() > 0
        # full attention (parallel prediction) lets earlier positions see later tokens
        full = torch.zeros(3, dtype=torch.bool, device=device)
        before, after = decoder(input_ids, tokens, cu_seqlens, full), decoder(changed, tokens, cu_seqlens, full)
        assert (before[:, :5] - after[:, :5]).abs().amax((1, 2)).min() > 0

    def test_parallel_logits_ignore_targets(self, device, dtype):
        vocabulary = _vocabulary()
        decoder = _decoder(device, dtype, vocab_size=vocabulary.vocab_size)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        first = _targets(vocabulary, seed=0, parallel_probability=1.0, device=device)
        second = _targets(vocabulary, seed=1, parallel_probability=1.0, device=device)
        assert not torch.equal(first.labels[:, 0], second.labels[:, 0])
        logits = [decoder(t.input_ids, tokens, cu_seqlens, t.causal)[:, 0] for t in (first, second)]
        torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
        # teacher forcing does depend on them
        first, second = (_targets(vocabulary, seed=s, parallel_probability=0.0, device=device) for s in (0, 1))
        logits = [decoder(t.input_ids, tokens, cu_seqlens, t.causal)[:, 0] for t in (first, second)]
        assert not torch.allclose(logits[0], logits[1])

    def test_packed_equals_per_image(self, device, dtype):
        decoder = _decoder(device, dtype)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        input_ids = torch.randint(0, 41, (3, 2, LENGTH), device=device)
        causal = torch.tensor([[True, False], [False, True], [True, True]], device=device)
        packed = decoder(input_ids, tokens, cu_seqlens, causal)
        for index, image in enumerate(tokens.split(IMAGE_TOKENS)):
            alone = decoder(input_ids[index : index + 1], image, _cu([len(image)], device), causal[index : index + 1])
            torch.testing.assert_close(packed[index : index + 1], alone, **tolerance(dtype))
        # each caption sees only its own image
        other = tokens.clone()
        other[:6] += 1.0
        changed = decoder(input_ids, other, cu_seqlens, causal)
        torch.testing.assert_close(changed[1:], packed[1:], **tolerance(dtype))
        assert not torch.allclose(changed[0], packed[0])

    def test_exception(self):
        decoder = _decoder()
        tokens, cu_seqlens = _image_tokens("cpu", torch.float32)
        input_ids = torch.randint(0, 41, (3, LENGTH))
        with pytest.raises(ValueCheckError, match=r"image_tokens must be \(N, 24\)"):
            decoder(input_ids, tokens[:, :16], cu_seqlens)
        with pytest.raises(ValueCheckError, match="exceeds max_length"):
            decoder(torch.randint(0, 41, (3, LENGTH + 1)), tokens, cu_seqlens)
        with pytest.raises(ValueCheckError, match="causal must have shape"):
            decoder(input_ids, tokens, cu_seqlens, torch.ones(3, 2, dtype=torch.bool))
        with pytest.raises(ValueCheckError, match="2 images but the vision tokens 3"):
            decoder(input_ids[:2], tokens, cu_seqlens)
        with pytest.raises(ValueCheckError, match="input_ids must be"):
            decoder(input_ids[0], tokens, cu_seqlens)
        with pytest.raises(ValueCheckError, match="needs cu_seqlens or a layout"):
            decoder(input_ids, tokens)
        with pytest.raises(ValueError, match="divisible"):
            LocCaDecoder(10, width=10, num_heads=3, mlp_width=8, num_layers=1, max_length=4)

    def test_gradcheck(self, device):
        decoder = _decoder(device, torch.float64, vocab_size=7, width=4, num_layers=1)
        tokens, cu_seqlens = _image_tokens(device, torch.float64, lengths=[2, 3])
        tokens.requires_grad_(True)
        input_ids = torch.randint(0, 8, (2, 3), device=device)
        causal = torch.tensor([True, False], device=device)
        assert torch.autograd.gradcheck(lambda x: decoder(input_ids, x, cu_seqlens, causal), (tokens,), fast_mode=True)

    def test_dynamo(self, device, dtype, inline_compile):
        decoder = _decoder(device, dtype, num_layers=1)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        input_ids = torch.randint(0, 41, (3, 2, LENGTH), device=device)
        causal = torch.tensor([[True, False]] * 3, device=device)
        layout = decoder.cross_attention_layout(cu_seqlens, 2 * LENGTH, device=device)
        compiled = torch.compile(lambda *x: decoder(*x, layout=layout), fullgraph=True, backend="aot_eager")
        with torch.no_grad():  # an inference graph: compiling the backward too would double the test's time
            expected = decoder(input_ids, tokens, cu_seqlens, causal)
            torch.testing.assert_close(compiled(input_ids, tokens, None, causal), expected, **tolerance(dtype))


class TestChunkedCrossEntropy:
    @pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_matches_full(self, chunk_size, with_bias, device):
        generator = torch.Generator().manual_seed(0)
        hidden, weight = torch.randn(11, 6, generator=generator), torch.randn(37, 6, generator=generator)
        bias = torch.randn(37, generator=generator) if with_bias else None
        labels = torch.randint(0, 37, (11,), generator=generator).to(device)
        inputs = [t.to(device, torch.float64).requires_grad_() for t in (hidden, weight, bias) if t is not None]
        upstream = torch.rand(11, generator=generator, dtype=torch.float64).to(device)

        chunked = chunked_cross_entropy(inputs[0], inputs[1], inputs[2] if with_bias else None, labels, chunk_size)
        full = F.cross_entropy(F.linear(*inputs), labels, reduction="none")
        torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
        chunked_grads = torch.autograd.grad(chunked, inputs, upstream)
        full_grads = torch.autograd.grad(full, inputs, upstream)
        for got, want in zip(chunked_grads, full_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    def test_cardinality(self, device, dtype):
        hidden, weight = torch.randn(5, 4, device=device, dtype=dtype), torch.randn(9, 4, device=device, dtype=dtype)
        nll = chunked_cross_entropy(hidden, weight, None, torch.zeros(5, dtype=torch.long, device=device), 4)
        assert nll.shape == (5,) and nll.dtype == torch.promote_types(dtype, torch.float32)
        empty = chunked_cross_entropy(hidden[:0], weight, None, torch.zeros(0, dtype=torch.long, device=device), 4)
        assert empty.shape == (0,)

    def test_gradcheck(self, device):
        generator = torch.Generator().manual_seed(0)
        hidden, weight, bias = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in
                                ((4, 3), (10, 3), (10,)))  # fmt: skip
        inputs = tuple(t.to(device).requires_grad_() for t in (hidden, weight, bias))
        labels = torch.tensor([0, 9, 3, 3], device=device)
        assert torch.autograd.gradcheck(lambda h, w, b: chunked_cross_entropy(h, w, b, labels, 3), inputs)

    def test_exception(self):
        hidden, weight, labels = torch.randn(5, 4), torch.randn(9, 4), torch.zeros(5, dtype=torch.long)
        with pytest.raises(ValueCheckError, match="disagree"):
            chunked_cross_entropy(hidden[:, :3], weight, None, labels)
        with pytest.raises(ValueCheckError, match="bias must be"):
            chunked_cross_entropy(hidden, weight, torch.zeros(8), labels)
        with pytest.raises(ValueCheckError, match="chunk_size must be positive"):
            chunked_cross_entropy(hidden, weight, None, labels, 0)
        with pytest.raises(ValueError):
            chunked_cross_entropy(hidden[None], weight, None, labels)

    def test_dynamo(self, device, dtype, inline_compile):
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(6, 4, generator=generator).to(device, dtype).requires_grad_()
        weight = torch.randn(20, 4, generator=generator).to(device, dtype)
        labels = torch.randint(0, 20, (6,), generator=generator).to(device)
        compiled = torch.compile(chunked_cross_entropy, backend="aot_eager")
        value = compiled(hidden, weight, None, labels, 8)
        (grad,) = torch.autograd.grad(value.sum(), hidden)
        reference = chunked_cross_entropy(hidden, weight, None, labels, 8)
        (expected,) = torch.autograd.grad(reference.sum(), hidden)
        torch.testing.assert_close(value, reference, **tolerance(dtype))
        torch.testing.assert_close(grad, expected, **tolerance(dtype))


class TestSequenceCrossEntropy:
    def test_per_sequence_mean_and_pad_gradient(self, device):
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(3, 2, 7, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_()
        weight = torch.randn(13, 5, generator=generator, dtype=torch.float64).to(device)
        labels = torch.randint(0, 13, (3, 2, 7), generator=generator).to(device)
        loss_mask = (torch.rand(3, 2, 7, generator=generator) > 0.4).to(device)
        loss_mask[0, 0] = False  # a sequence with nothing scored contributes 0
        losses = sequence_cross_entropy(hidden, weight, None, labels, loss_mask, chunk_size=4)
        full = F.cross_entropy((hidden @ weight.T).flatten(0, 2), labels.flatten(), reduction="none").view(3, 2, 7)
        expected = (full * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1)
        torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
        assert losses[0, 0] == 0
        (grad,) = torch.autograd.grad(losses.sum(), hidden)
        assert bool((grad[~loss_mask] == 0).all())
        assert bool((grad[loss_mask].abs().sum(-1) > 0).all())


class TestLocCaLoss:
    def test_initial_loss_is_log_vocab_size(self, device, dtype):
        vocabulary = LocCaVocabulary(text_vocab_size=31000, num_bins=1000)  # V = 32000
        decoder = _decoder(device, dtype, vocab_size=vocabulary.vocab_size, width=8, num_layers=1, perturb=False)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        output = LocCaLoss(decoder)(tokens, cu_seqlens, _targets(vocabulary, device=device))
        assert math.log(32000) == pytest.approx(10.373491, abs=1e-6)
        atol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(output.task_losses, torch.full_like(output.task_losses, math.log(32000)),
                                   rtol=0, atol=atol)  # fmt: skip
        torch.testing.assert_close(output.loss, torch.tensor(3 * math.log(32000), dtype=output.loss.dtype,
                                                             device=device), rtol=0, atol=3 * atol)  # fmt: skip

    def test_smoke(self, device, dtype):
        vocabulary = _vocabulary()
        decoder = _decoder(device, dtype, vocab_size=vocabulary.vocab_size)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        output = LocCaLoss(decoder, task_weights=(1.0, 0.0, 2.0))(
            tokens, cu_seqlens, _targets(vocabulary, device=device)
        )
        assert output.loss.shape == () and output.task_losses.shape == (3,)
        torch.testing.assert_close(output.loss, output.task_losses[0] + 2 * output.task_losses[2])
        assert list(output.as_dict()) == ["loss", *TASKS]

    def test_matches_full_logits(self, device):
        vocabulary = _vocabulary()
        decoder = _decoder(device, torch.float64, vocab_size=vocabulary.vocab_size)
        tokens, cu_seqlens = _image_tokens(device, torch.float64)
        targets = _targets(vocabulary, device=device)
        loss = LocCaLoss(decoder, chunk_size=7)(tokens, cu_seqlens, targets).loss
        chunked_grads = torch.autograd.grad(loss, list(decoder.parameters()))

        logits = decoder(targets.input_ids, tokens, cu_seqlens, targets.causal)  # [B, 3, L, V]
        nll = F.cross_entropy(logits.flatten(0, 2), targets.labels.flatten(), reduction="none").view(3, 3, LENGTH)
        mask = targets.loss_mask
        full = ((nll * mask).sum(-1) / mask.sum(-1)).mean(0).sum()
        full_grads = torch.autograd.grad(full, list(decoder.parameters()))
        torch.testing.assert_close(loss, full, rtol=0, atol=1e-12)
        for got, want in zip(chunked_grads, full_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    def test_logits_never_materialized(self):
        vocabulary = LocCaVocabulary(text_vocab_size=31000, num_bins=1000)
        decoder = _decoder(vocab_size=vocabulary.vocab_size, width=8, num_layers=1)
        tokens, cu_seqlens = _image_tokens("cpu", torch.float32)
        targets = _targets(vocabulary)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            LocCaLoss(decoder, chunk_size=1024)(tokens, cu_seqlens, targets).loss.backward()
        # the largest tensor kept for backward is the head weight itself, (V, D), not (B * 3 * L, V) logits
        assert max(saved) == 32000 * 8 < targets.labels.numel() * 32000

    def test_gradcheck(self, device):
        vocabulary = _vocabulary(text_vocab_size=5, num_bins=4)
        decoder = _decoder(device, torch.float64, vocab_size=vocabulary.vocab_size, width=4, num_layers=1)
        tokens, cu_seqlens = _image_tokens(device, torch.float64, lengths=[2, 3])
        targets = LocCaTargets.build([[2, 3], [4]], [[3], [2]], torch.tensor([[0.1, 0.2, 0.6, 0.9]] * 2), vocabulary,
                                     6, generator=torch.Generator().manual_seed(0), device=device)  # fmt: skip
        loss = LocCaLoss(decoder, chunk_size=3)
        tokens.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: loss(x, cu_seqlens, targets).loss, (tokens,), fast_mode=True)

    def test_dynamo(self, device, dtype, inline_compile):
        vocabulary = _vocabulary()
        decoder = _decoder(device, dtype, vocab_size=vocabulary.vocab_size, num_layers=1)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        targets = _targets(vocabulary, device=device)
        loss = LocCaLoss(decoder, chunk_size=16)
        layout = decoder.cross_attention_layout(cu_seqlens, 3 * LENGTH, device=device)
        # under compile every token goes through the projection, weighted by its mask (static shapes)
        compiled = torch.compile(
            lambda x: loss(x, None, targets, layout=layout).loss, fullgraph=True, backend="aot_eager"
        )
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens), loss(tokens, cu_seqlens, targets).loss, **tolerance(dtype))

    def test_exception(self):
        decoder = _decoder()
        with pytest.raises(ValueCheckError, match="task_weights needs 3"):
            LocCaLoss(decoder, task_weights=(1.0, 1.0))
        tokens, cu_seqlens = _image_tokens("cpu", torch.float32)
        targets = _targets(_vocabulary(text_vocab_size=30, num_bins=10))
        targets.input_ids = targets.input_ids[:, :2]
        with pytest.raises(ValueCheckError, match=r"targets must be \(B, 3, L\)"):
            LocCaLoss(decoder)(tokens, cu_seqlens, targets)


class TestGenerate:
    def test_smoke(self, device, dtype):
        vocabulary = _vocabulary()
        decoder = _decoder(device, dtype, vocab_size=vocabulary.vocab_size)
        tokens, cu_seqlens = _image_tokens(device, dtype)
        captions = generate_captions(decoder, vocabulary, tokens, cu_seqlens)
        assert len(captions) == 3 and all(len(c) < LENGTH and all(0 <= t < 30 for t in c) for c in captions)
        parallel = generate_captions(decoder, vocabulary, tokens, cu_seqlens, parallel=True)
        assert len(parallel) == 3 and all(1 not in c for c in parallel)
        boxes = generate_boxes(decoder, vocabulary, tokens, cu_seqlens, [[5, 6], [7], [8, 9, 10]])
        assert boxes.shape == (3, 4) and bool(((boxes > 0) & (boxes < 1)).all())
        regions = generate_region_captions(decoder, vocabulary, tokens, cu_seqlens, torch.rand(3, 4))
        assert len(regions) == 3 and all(len(r) <= LENGTH - 5 for r in regions)

    def test_greedy_is_a_teacher_forcing_fixed_point(self, device):
        # feeding the generated caption back with teacher forcing predicts it again, position by position
        vocabulary = _vocabulary()
        decoder = _decoder(device, vocab_size=vocabulary.vocab_size)
        tokens, cu_seqlens = _image_tokens(device, torch.float32)
        generated = generate(decoder, tokens, cu_seqlens, [[4, 5], [], [6]], 4, start_token_id=0)
        assert [len(g) for g in generated] == [4, 4, 4]
        sequences = torch.tensor([[4, 5, *generated[0]], [*generated[1], 0, 0], [6, *generated[2], 0]], device=device)
        logits = decoder(shift_right(sequences, 0), tokens, cu_seqlens)
        predicted = logits.argmax(-1).tolist()
        assert predicted[0][2:6] == generated[0] and predicted[1][:4] == generated[1]
        assert predicted[2][1:5] == generated[2]

    def test_exception(self):
        decoder = _decoder()
        tokens, cu_seqlens = _image_tokens("cpu", torch.float32)
        with pytest.raises(ValueCheckError, match="shorter than max_length"):
            generate(decoder, tokens, cu_seqlens, [[2] * LENGTH, [], []], 2, start_token_id=0)
        with pytest.raises(ValueCheckError, match="Expected 3 cu_seqlens"):
            generate(decoder, tokens, cu_seqlens, [[], []], 2, start_token_id=0)


# Overfit: a tiny ViT + decoder memorize images of two coloured shapes with their captions and boxes.
WORDS = ["<pad>", "<eos>", "and", "red", "green", "blue", "yellow", "square", "circle"]
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}


def _shapes_dataset(num_examples, seed=0):
    """Images of two coloured squares/circles; caption "<colour> <shape> and <colour> <shape>", one box each."""
    generator = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    images, captions, regions, boxes = [], [], [], []
    for index in range(num_examples):
        height, width = ((24, 24), (24, 32))[index % 2]  # two sizes: the batch is packed
        image = torch.full((3, height, width), 0.2)
        ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        shapes = []
        for colour in torch.randperm(len(COLOURS), generator=generator)[:2].tolist():
            name, shape, side = list(COLOURS)[colour], ("square", "circle")[randint(0, 2)], randint(6, 11)
            left, top = randint(0, width - side + 1), randint(0, height - side + 1)
            if shape == "square":
                inside = (xs >= left) & (xs < left + side) & (ys >= top) & (ys < top + side)
            else:
                inside = (xs - left - side / 2) ** 2 + (ys - top - side / 2) ** 2 <= (side / 2) ** 2
            image[:, inside] = torch.tensor(COLOURS[name])[:, None]
            box = [left / width, top / height, (left + side) / width, (top + side) / height]
            shapes.append(([WORDS.index(name), WORDS.index(shape)], box))
        images.append(image)
        captions.append([*shapes[0][0], WORDS.index("and"), *shapes[1][0]])
        region, box = shapes[index % 2]  # the later-drawn shape may hide part of the first: ask for both
        regions.append(region)
        boxes.append(box)
    return images, captions, regions, torch.tensor(boxes)


class TestOverfit:
    def test_memorizes_captions_and_boxes(self):
        with _single_thread():
            torch.manual_seed(0)
            images, captions, regions, boxes = _shapes_dataset(24)
            vocabulary = LocCaVocabulary(text_vocab_size=len(WORDS), num_bins=32)
            vision = VisionTransformer(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, patch_size=4, num_patches=64,
                                                    vision_use_head=False))  # fmt: skip
            decoder = LocCaDecoder(vocabulary.vocab_size, 32, 4, 64, num_layers=2, max_length=LENGTH, image_width=32)
            loss_fn = LocCaLoss(decoder)
            optimizer = torch.optim.AdamW([*vision.parameters(), *decoder.parameters()], lr=3e-3, weight_decay=0.0)
            patches, grid_thw = zip(*(patchify(image[None], 4) for image in images), strict=True)
            patches, packed = torch.cat(patches), ImageLayout.from_grid_thw(torch.cat(grid_thw), torch.device("cpu"))
            layout = decoder.cross_attention_layout(packed.attention.cu_seqlens_q, 3 * LENGTH)
            generator = torch.Generator().manual_seed(0)
            for step in range(800):  # noqa: B007
                targets = LocCaTargets.build(captions, regions, boxes, vocabulary, LENGTH, generator=generator)
                output = loss_fn(vision(patches, packed).last_hidden_state, None, targets, layout=layout)
                optimizer.zero_grad()
                output.loss.backward()
                optimizer.step()
                # memorized well below the loss at which greedy decoding could still flip a token: machines
                # whose float rounding differs (AVX-512 vs AMX kernels) take other trajectories to it
                if output.loss.item() < 0.005:
                    break
            assert output.loss.item() < 0.005, (step, output.as_dict())

            with torch.no_grad():
                encoded = vision(patches, packed)
            image_tokens, cu_seqlens = encoded.last_hidden_state, encoded.cu_seqlens
            assert generate_captions(decoder, vocabulary, image_tokens, cu_seqlens) == captions
            assert generate_captions(decoder, vocabulary, image_tokens, cu_seqlens, parallel=True) == captions
            predicted = generate_boxes(decoder, vocabulary, image_tokens, cu_seqlens, regions)
            assert (predicted - boxes).abs().max() <= 1 / vocabulary.num_bins
            assert generate_region_captions(decoder, vocabulary, image_tokens, cu_seqlens, boxes) == regions
