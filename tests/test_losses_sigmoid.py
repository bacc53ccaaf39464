"""Tests of kornia_siglip2.losses.sigmoid: closed forms, dense == chunked == distributed (gloo)."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tolerance
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses import DISTRIBUTED_MODES, SigmoidLoss, sigmoid_loss

LOG_TEN = math.log(10.0)
CHUNK_SIZES = (1, 3, 4, 7, 10, 16)  # n = 10: divisible, not divisible, one chunk, larger than n


def _embeds(n: int, dim: int, seed: int, device=None, dtype=torch.float64, requires_grad=False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeds = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    return embeds.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def _inputs(n=10, dim=6, device=None, dtype=torch.float64, scale=1.7, bias=-2.3, seed=0):
    """Random unit embeddings and (t', b) as leaves: t' = 1.7 puts positives and negatives both in play."""
    image = _embeds(n, dim, seed, device, dtype, requires_grad=True)
    text = _embeds(n, dim, seed + 1, device, dtype, requires_grad=True)
    logit_scale = torch.tensor(scale, device=device, dtype=dtype, requires_grad=True)
    logit_bias = torch.tensor(bias, device=device, dtype=dtype, requires_grad=True)
    return image, text, logit_scale, logit_bias


def _loss_and_grads(inputs, **options):
    loss = sigmoid_loss(*inputs, **options)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads


def _orthogonal_pairs(n: int, device, dtype):
    """Every image orthogonal to every text: all logits equal b, the closed form of the SigLIP loss."""
    basis = torch.eye(2 * n, device=device, dtype=dtype)
    return basis[:n], basis[n:]


class TestSigmoidLoss:
    def test_smoke(self, device, dtype):
        image, text, logit_scale, logit_bias = _inputs(device=device, dtype=dtype)
        loss = sigmoid_loss(image, text, logit_scale, logit_bias)
        assert loss.dtype == dtype and loss.device.type == device.type
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(x.grad).all() for x in (image, text, logit_scale, logit_bias))

    @pytest.mark.parametrize("n", [1, 2, 5])
    def test_cardinality(self, n, device, dtype):
        image, text, logit_scale, logit_bias = _inputs(n=n, device=device, dtype=dtype)
        assert sigmoid_loss(image, text, logit_scale, logit_bias).shape == ()
        # HF stores the scalars as shape (1,); plain floats work too
        assert sigmoid_loss(image, text, logit_scale.reshape(1), logit_bias.reshape(1)).shape == ()
        assert sigmoid_loss(image, text, 1.7, -2.3).shape == ()

    @pytest.mark.parametrize(("n", "expected"), [(4, 10.000182), (64, 10.002906)])
    def test_closed_form_orthogonal(self, n, expected, device, dtype):
        image, text = _orthogonal_pairs(n, device, dtype)
        logit_scale = torch.tensor(LOG_TEN, device=device, dtype=dtype)
        logit_bias = torch.tensor(-10.0, device=device, dtype=dtype)
        # softplus(10) + (n - 1) * softplus(-10): the positive and n - 1 negatives of a row
        closed_form = F.softplus(torch.tensor(10.0, dtype=torch.float64)) + (n - 1) * F.softplus(
            torch.tensor(-10.0, dtype=torch.float64)
        )
        assert closed_form.item() == pytest.approx(expected, abs=5e-7)
        tol = {"atol": 1e-6, "rtol": 0.0} if dtype == torch.float64 else tolerance(dtype)
        for chunk_size in (None, 3):
            loss = sigmoid_loss(image, text, logit_scale, logit_bias, chunk_size=chunk_size)
            torch.testing.assert_close(loss, torch.tensor(expected, device=device, dtype=dtype), **tol)

    def test_closed_form_bias_gradient(self, device):
        image, text = _orthogonal_pairs(4, device, torch.float64)
        for chunk_size in (None, 3):
            logit_bias = torch.tensor(-10.0, device=device, dtype=torch.float64, requires_grad=True)
            sigmoid_loss(image, text, LOG_TEN, logit_bias, chunk_size=chunk_size).backward()
            # sigmoid(-10) - 1 for the positive, (n - 1) * sigmoid(-10) for the negatives of a row
            assert logit_bias.grad.item() == pytest.approx(-0.99981841, abs=1e-8)

    def test_negatives_matter(self, device):
        """Raising every logit together must raise the loss when negatives dominate (a positives-only loss falls)."""
        image, text, logit_scale, _ = _inputs(n=16, device=device, scale=LOG_TEN)
        image, text = image.detach(), text.detach()
        for chunk_size in (None, 5):
            losses = [sigmoid_loss(image, text, logit_scale, bias, chunk_size=chunk_size) for bias in (-1.0, 0.0)]
            assert losses[1] > losses[0]
            logits = image @ text.T * logit_scale.exp()
            positives_only = [-F.logsigmoid(logits.diagonal() + bias).sum() / 16 for bias in (-1.0, 0.0)]
            assert positives_only[1] < positives_only[0]

    def test_matches_transformers(self, hf_siglip):
        """SiglipModel(return_loss=True) computes the same number from its own embeddings."""
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(3, 3, 16, 16, generator=generator)
        input_ids = torch.randint(1, 99, (3, 7), generator=generator)
        with torch.no_grad():
            outputs = hf_siglip(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
            loss = sigmoid_loss(outputs.image_embeds, outputs.text_embeds, hf_siglip.logit_scale, hf_siglip.logit_bias)
        torch.testing.assert_close(loss, outputs.loss.reshape(()), atol=1e-6, rtol=1e-6)

    def test_exception(self, device, dtype):
        image, text, logit_scale, logit_bias = _inputs(device=device, dtype=dtype)
        with pytest.raises(ValueCheckError, match="image_embeds must be"):
            sigmoid_loss(image[None], text, logit_scale, logit_bias)
        with pytest.raises(ValueCheckError, match="text_embeds must be"):
            sigmoid_loss(image, text[0], logit_scale, logit_bias)
        with pytest.raises(ValueCheckError, match="text_embeds must have the shape of image_embeds"):
            sigmoid_loss(image, text[:-1], logit_scale, logit_bias)
        with pytest.raises(ValueCheckError, match="text_embeds must have the shape of image_embeds"):
            sigmoid_loss(image, text[:, :-1], logit_scale, logit_bias)
        with pytest.raises(ValueCheckError, match="at least one"):
            sigmoid_loss(image[:0], text[:0], logit_scale, logit_bias)
        with pytest.raises(ValueCheckError, match="logit_scale must be a scalar"):
            sigmoid_loss(image, text, torch.zeros(2), logit_bias)
        with pytest.raises(ValueCheckError, match="logit_bias must be a scalar"):
            sigmoid_loss(image, text, logit_scale, torch.zeros(1, 2))
        with pytest.raises(ValueCheckError, match="chunk_size must be a positive int"):
            sigmoid_loss(image, text, logit_scale, logit_bias, chunk_size=0)
        with pytest.raises(ValueCheckError, match="distributed must be None or one of"):
            sigmoid_loss(image, text, logit_scale, logit_bias, distributed="ring_allreduce")
        if not dist.is_initialized():
            with pytest.raises(ValueCheckError, match=r"initialized torch\.distributed process group"):
                sigmoid_loss(image, text, logit_scale, logit_bias, distributed="ring")

    @pytest.mark.parametrize("chunk_size", [None, 3])
    def test_gradcheck(self, chunk_size, device):
        inputs = _inputs(n=5, dim=3, device=device)
        assert torch.autograd.gradcheck(lambda *x: sigmoid_loss(*x, chunk_size=chunk_size), inputs)

    def test_gradgradcheck_dense(self, device):
        inputs = _inputs(n=4, dim=3, device=device)
        assert torch.autograd.gradgradcheck(sigmoid_loss, inputs)

    @pytest.mark.parametrize("chunk_size", [None, 3])
    def test_dynamo(self, chunk_size, device, dtype):
        inputs = _inputs(n=8, device=device, dtype=dtype)
        compiled = torch.compile(
            lambda *x: sigmoid_loss(*x, chunk_size=chunk_size), fullgraph=True, backend="aot_eager"
        )
        loss, grads = _loss_and_grads(inputs, chunk_size=chunk_size)
        compiled_loss = compiled(*inputs)
        torch.testing.assert_close(compiled_loss, loss, **tolerance(dtype))
        for compiled_grad, grad in zip(torch.autograd.grad(compiled_loss, inputs), grads, strict=True):
            torch.testing.assert_close(compiled_grad, grad, **tolerance(dtype))


class TestChunkedSigmoidLoss:
    def test_smoke(self, device, dtype):
        inputs = _inputs(device=device, dtype=dtype)
        loss = sigmoid_loss(*inputs, chunk_size=4)
        assert loss.shape == () and loss.dtype == dtype and torch.isfinite(loss)

    @pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
    def test_matches_dense(self, chunk_size, device):
        inputs = _inputs(device=device)
        dense_loss, dense_grads = _loss_and_grads(inputs)
        loss, grads = _loss_and_grads(inputs, chunk_size=chunk_size)
        torch.testing.assert_close(loss, dense_loss, atol=1e-12, rtol=0)
        for grad, dense_grad in zip(grads, dense_grads, strict=True):
            torch.testing.assert_close(grad, dense_grad, atol=1e-12, rtol=0)

    def test_matches_dense_partial_requires_grad(self, device):
        """Only the inputs that need a gradient get one, and those still match dense."""
        image, text, logit_scale, logit_bias = _inputs(device=device)
        text, logit_bias = text.detach(), logit_bias.detach()
        expected = torch.autograd.grad(sigmoid_loss(image, text, logit_scale, logit_bias), (image, logit_scale))
        loss = sigmoid_loss(image, text, logit_scale, logit_bias, chunk_size=3)
        for grad, dense_grad in zip(torch.autograd.grad(loss, (image, logit_scale)), expected, strict=True):
            torch.testing.assert_close(grad, dense_grad, atol=1e-12, rtol=0)

    def test_never_materializes_n_by_n(self, device):
        """No tensor of forward or backward is larger than chunk x n (dense makes n x n ones)."""
        n, dim, chunk_size = 64, 4, 8
        inputs = _inputs(n=n, dim=dim, device=device)
        for options, bound in (({"chunk_size": chunk_size}, chunk_size * n), ({}, n * n)):
            with _LargestTensor() as largest:
                torch.autograd.grad(sigmoid_loss(*inputs, **options), inputs)
            assert largest.numel == bound

    def test_module(self, device, dtype):
        loss_fn = SigmoidLoss(chunk_size=3).to(device=device, dtype=dtype)
        assert "chunk_size=3" in repr(loss_fn)
        image, text, _, _ = _inputs(device=device, dtype=dtype)
        torch.testing.assert_close(loss_fn(image, text), SigmoidLoss().to(device, dtype)(image, text))

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="chunk_size must be a positive int"):
            SigmoidLoss(chunk_size=-2)
        with pytest.raises(ValueCheckError, match="chunk_size must be a positive int"):
            sigmoid_loss(*_inputs(), chunk_size=2.5)

    @pytest.mark.parametrize("n", [1, 7])
    def test_cardinality(self, n, device, dtype):
        assert sigmoid_loss(*_inputs(n=n, device=device, dtype=dtype), chunk_size=3).shape == ()


class TestSigmoidLossModule:
    def test_smoke(self, device, dtype):
        loss_fn = SigmoidLoss().to(device=device, dtype=dtype)
        image, text, _, _ = _inputs(device=device, dtype=dtype)
        loss_fn(image, text).backward()
        assert loss_fn.logit_scale.grad is not None and loss_fn.logit_bias.grad is not None

    def test_init_values(self):
        loss_fn = SigmoidLoss()
        assert loss_fn.logit_scale.item() == pytest.approx(LOG_TEN)
        assert loss_fn.logit_bias.item() == -10.0
        assert {name for name, _ in loss_fn.named_parameters()} == {"logit_scale", "logit_bias"}
        assert list(SigmoidLoss(None, None).parameters()) == []

    def test_uses_passed_parameters(self, device):
        image, text, logit_scale, logit_bias = _inputs(device=device)
        loss_fn = SigmoidLoss().to(device=device, dtype=torch.float64)
        expected = sigmoid_loss(image, text, logit_scale, logit_bias)
        torch.testing.assert_close(loss_fn(image, text, logit_scale, logit_bias), expected)
        torch.testing.assert_close(SigmoidLoss(None, None)(image, text, logit_scale, logit_bias), expected)
        with torch.no_grad():
            loss_fn.logit_scale.copy_(logit_scale)
            loss_fn.logit_bias.copy_(logit_bias)
        torch.testing.assert_close(loss_fn(image, text), expected)

    def test_cardinality(self, device, dtype):
        image, text, _, _ = _inputs(n=3, device=device, dtype=dtype)
        assert SigmoidLoss().to(device, dtype)(image, text).shape == ()

    def test_exception(self):
        image, text, logit_scale, _ = _inputs()
        with pytest.raises(ValueCheckError, match="logit_scale is required"):
            SigmoidLoss(None, -10.0)(image, text)
        with pytest.raises(ValueCheckError, match="logit_bias is required"):
            SigmoidLoss(LOG_TEN, None)(image, text, logit_scale)
        with pytest.raises(ValueCheckError, match="distributed must be None or one of"):
            SigmoidLoss(distributed="ALL_GATHER")

    def test_gradcheck(self, device):
        image, text, logit_scale, logit_bias = _inputs(n=4, dim=3, device=device)
        loss_fn = SigmoidLoss(None, None, chunk_size=3)
        assert torch.autograd.gradcheck(loss_fn, (image, text, logit_scale, logit_bias))

    def test_dynamo(self, device, dtype):
        loss_fn = SigmoidLoss().to(device, dtype)
        image, text, _, _ = _inputs(n=6, device=device, dtype=dtype)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(image, text), loss_fn(image, text), **tolerance(dtype))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


# ---------------------------------------------------------------- distributed (gloo, spawned processes)
# One spawn of 4 processes serves world sizes 2, 3 and 4 through process groups: spawning is the slow part,
# and groups whose ranks are not 0..W-1 also check the group-rank / global-rank bookkeeping.

NUM_PROCESSES = 4
GROUPS = {2: [0, 2], 3: [1, 2, 3], 4: [0, 1, 2, 3]}  # world size -> global ranks of its group
DIST_DIM = 6
DIST_SCALE, DIST_BIAS = 1.7, -2.3
EVEN_ROWS = 3
UNEVEN_ROWS = (2, 4, 1, 3)
DIST_CASES = [(mode, chunk_size) for mode in DISTRIBUTED_MODES for chunk_size in (None, 2)]
DDP_CASES = [("ring", None), ("all_gather", 2)]
SPAWN_TIMEOUT_S = 150  # a hung collective fails the test (the process group itself times out at 60 s)


def _layouts(world_size: int) -> dict[str, list[int]]:
    return {"even": [EVEN_ROWS] * world_size, "uneven": list(UNEVEN_ROWS[:world_size])}


def _global_inputs(rows: list[int]):
    """Embeddings of the concatenated batch, identical in the test and in every rank."""
    return _inputs(n=sum(rows), dim=DIST_DIM, scale=DIST_SCALE, bias=DIST_BIAS, seed=11)


def _rank_slice(rows: list[int], rank: int) -> slice:
    return slice(sum(rows[:rank]), sum(rows[: rank + 1]))


class _TwoTower(nn.Module):
    """A tiny model whose embeddings feed the loss; DDP averages the gradients of all its parameters."""

    def __init__(self, distributed=None, chunk_size=None, group=None) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.image_proj = nn.Linear(7, DIST_DIM)
        self.text_proj = nn.Linear(5, DIST_DIM)
        self.loss = SigmoidLoss(chunk_size=chunk_size, distributed=distributed, group=group)
        self.double()

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image_embeds = F.normalize(self.image_proj(images), dim=-1)
        text_embeds = F.normalize(self.text_proj(texts), dim=-1)
        return self.loss(image_embeds, text_embeds)


def _two_tower_batch(n: int):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(n, 7, generator=generator, dtype=torch.float64)
    return images, torch.randn(n, 5, generator=generator, dtype=torch.float64)


def _sgd_step(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(images, texts).backward()
    optimizer.step()
    return {name.removeprefix("module."): p.detach().clone() for name, p in model.named_parameters()}


def _error_message(function) -> str:
    try:
        function()
    except ValueCheckError as error:
        return str(error)
    return "no error"


def _group_checks(group: dist.ProcessGroup) -> dict:
    """This rank's losses and gradients for every case, a DDP step, and the errors every rank must raise."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    results = {}
    for layout, rows in _layouts(world_size).items():
        # with uneven blocks, DDP's plain average needs each rank's loss weighted by W * n_local / n
        weight = world_size * rows[rank] / sum(rows)
        for mode, chunk_size in DIST_CASES:
            image, text, logit_scale, logit_bias = (x.detach() for x in _global_inputs(rows))
            local = _rank_slice(rows, rank)
            inputs = [x.clone().requires_grad_() for x in (image[local], text[local], logit_scale, logit_bias)]
            loss = weight * sigmoid_loss(*inputs, chunk_size=chunk_size, distributed=mode, group=group)
            results[(layout, mode, chunk_size)] = (loss.detach(), *torch.autograd.grad(loss, inputs))
    images, texts = _two_tower_batch(EVEN_ROWS * world_size)
    local = _rank_slice([EVEN_ROWS] * world_size, rank)
    for mode, chunk_size in DDP_CASES:
        model = _TwoTower(distributed=mode, chunk_size=chunk_size, group=group)
        ddp_model = DistributedDataParallel(model, process_group=group)
        results[("ddp", mode, chunk_size)] = _sgd_step(ddp_model, images[local], texts[local])
    # errors found from the exchanged sizes are raised on every rank, so no rank is left waiting
    image, text, logit_scale, logit_bias = _inputs(n=3, dim=4 if rank == 0 else 3)
    results["error_width"] = _error_message(
        lambda: sigmoid_loss(image, text, logit_scale, logit_bias, distributed="ring", group=group)
    )
    image, text, logit_scale, logit_bias = _inputs(n=0 if rank == world_size - 1 else 3, dim=3)
    results["error_empty"] = _error_message(
        lambda: sigmoid_loss(image, text, logit_scale, logit_bias, distributed="all_gather", group=group)
    )
    return results


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    """One process: the checks of every group it belongs to, saved for the test to compare with dense."""
    torch.set_num_threads(1)  # NUM_PROCESSES processes share the cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=NUM_PROCESSES,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for world_size, ranks in GROUPS.items():
            group = dist.new_group(ranks)  # every process takes part in creating every group
            if rank in ranks:
                results[world_size] = _group_checks(group)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """Results of every group, by world size, as a list indexed by group rank."""
    out_dir = tmp_path_factory.mktemp("sigmoid_distributed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # the children unpickle _distributed_worker by this module's name: make sure its root is importable
        monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[__name__.count(".")]))
        context = mp.start_processes(
            _distributed_worker, args=(_free_port(), str(out_dir)), nprocs=NUM_PROCESSES, join=False
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {NUM_PROCESSES} spawned gloo processes hung for {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    by_rank = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    # new_group orders a group's ranks by global rank
    return {size: [by_rank[rank][size] for rank in sorted(ranks)] for size, ranks in GROUPS.items()}


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("world_size", list(GROUPS))
class TestDistributedSigmoidLoss:
    """Ring and all-gather over gloo, even and uneven blocks, plain and chunked, against the dense loss."""

    @pytest.mark.parametrize(("mode", "chunk_size"), DIST_CASES)
    @pytest.mark.parametrize("layout", ["even", "uneven"])
    def test_matches_dense(self, world_size, layout, mode, chunk_size, distributed_results):
        rows = _layouts(world_size)[layout]
        dense_loss, (image_grad, text_grad, scale_grad, bias_grad) = _loss_and_grads(_global_inputs(rows))
        results = [ranks[(layout, mode, chunk_size)] for ranks in distributed_results[world_size]]
        losses, image_grads, text_grads, scale_grads, bias_grads = zip(*results, strict=True)
        # DDP semantics: rank values and gradients averaged over ranks equal the dense ones
        close = {"atol": 1e-10, "rtol": 0}
        torch.testing.assert_close(torch.stack(losses).mean(), dense_loss, **close)
        torch.testing.assert_close(torch.cat(image_grads) / world_size, image_grad, **close)
        torch.testing.assert_close(torch.cat(text_grads) / world_size, text_grad, **close)
        torch.testing.assert_close(torch.stack(scale_grads).mean(), scale_grad, **close)
        torch.testing.assert_close(torch.stack(bias_grads).mean(), bias_grad, **close)

    @pytest.mark.parametrize(("mode", "chunk_size"), DDP_CASES)
    def test_ddp_step_matches_single_process(self, world_size, mode, chunk_size, distributed_results):
        images, texts = _two_tower_batch(EVEN_ROWS * world_size)
        expected = _sgd_step(_TwoTower(), images, texts)
        for ranks in distributed_results[world_size]:
            parameters = ranks[("ddp", mode, chunk_size)]
            assert parameters.keys() == expected.keys()
            for name, parameter in parameters.items():
                torch.testing.assert_close(parameter, expected[name], atol=1e-10, rtol=0, msg=name)

    def test_exception(self, world_size, distributed_results):
        for ranks in distributed_results[world_size]:
            assert "same width D" in ranks["error_width"]
            assert "at least one image-text pair" in ranks["error_empty"]
