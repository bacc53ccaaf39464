"""The recipe on tar shards: bad samples in metrics.jsonl, SIGKILL-and-resume, the run record, weight decay groups,
accumulation, TensorBoard; and over gloo: DDP on shards equals one process, ranks agree on the checkpoint and the
run folder, a world-size change re-deals the epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from training_helpers import kill_at_step, spawn, tiny_siglip2_config

from kornia_siglip2 import SigLip2
from kornia_siglip2.losses.sigmoid import sigmoid_loss
from kornia_siglip2.packing import PackedImages
from kornia_siglip2.training.checkpoint import latest_checkpoint
from kornia_siglip2.training.data import ByteTokenizer
from kornia_siglip2.training.recipe import (
    ContrastiveForward,
    RecipeConfig,
    _accumulated_step,
    agree_on_checkpoint,
    build_model,
    check_shared_folder,
    parameter_groups,
    train,
)
from kornia_siglip2.training.shards import parse_sources, write_shards
from kornia_siglip2.training.stream import ShardStream, StreamFeed, StreamSpec
from kornia_siglip2.training.synthetic import write_synthetic_dataset

TINY = tiny_siglip2_config()
PATTERN = "s-{000..009}.tar"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe-stream")
    manifest = write_synthetic_dataset(root / "images", 30, seed=6, min_side=12, max_side=40)
    write_shards(manifest, str(root / "s-{:03d}.tar"), max_count=3)  # 10 shards
    (root / "tiny.json").write_text(json.dumps(TINY))
    # the same shards with one image's bytes broken (its json still gives a size: it is packed, then fails to decode)
    (root / "bad").mkdir()
    for path in root.glob("s-*.tar"):
        shutil.copy(path, root / "bad" / path.name)
    with tarfile.open(root / "s-004.tar") as source:
        members = [(member.name, source.extractfile(member).read()) for member in source if member.isfile()]
    with tarfile.open(root / "bad" / "s-004.tar", "w") as archive:
        for name, data in members:
            data = b"\x89PNG broken" if name == "000000013.png" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return root


def _options(root: Path, out: str, **overrides) -> dict:
    options = dict(
        data=str(root / PATTERN),
        out=str(root / out),
        model_config=str(root / "tiny.json"),
        text_length=12,
        parallel="none",
        precision="fp64",
        token_budget=48,
        max_num_patches=(8, 16),
        steps=6,
        accumulation=2,
        learning_rate=0.01,
        warmup_steps=2,
        shuffle_buffer=4,
        num_workers=0,
        threads=1,
        device="cpu",
        seed=1,
        log_every=100,
    )
    options.update(overrides)
    return options


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_image_is_skipped_counted_and_the_run_goes_on(root, capfd):
    records = train(RecipeConfig(**_options(root, "bad-run", data=str(root / "bad" / PATTERN), steps=8)))
    assert len(records) == 8 and all(math.isfinite(record["loss"]) for record in records)
    last = _metrics(root / "bad-run")[-1]
    # the broken sample, once in every epoch that reached it (the run reads the 30 samples more than once)
    named = capfd.readouterr().err.count(f"{root / 'bad' / 's-004.tar'} sample 000000013 (undecodable")
    assert last["epoch"] >= 1 and named >= 1 and last["skipped"] == named
    assert last["skipped_reasons"] == {"undecodable": named} and last["skipped_per_rank"] == [named]
    assert last["read"] >= 30 and last["dropped"] == 0  # one rank: no ragged end to drop
    assert all(0 < record["fill"] <= 1 for record in records)


def test_max_skip_fraction_stops_the_run(root):
    options = _options(root, "bad-stop", data=str(root / "bad" / PATTERN), steps=8, max_skip_fraction=0.01)
    with pytest.raises(
        RuntimeError, match=r"1 of \d+ samples read were skipped \(\d\.\d% > --max-skip-fraction 0\.01\)"
    ):
        train(RecipeConfig(**options))


def _command(options: dict) -> list[str]:
    command = [sys.executable, "-m", "kornia_siglip2.train"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        command += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return command


def test_kill_and_resume_on_shards_equals_uninterrupted(root):
    """Two DataLoader workers, killed with SIGKILL after step 5 (checkpoint at 4): the same losses and weights."""
    steps = 10
    reference = train(RecipeConfig(**_options(root, "shards-uninterrupted", steps=steps, num_workers=2, save_every=2)))
    assert reference[-1]["epoch"] >= 1  # the run crosses an epoch end
    options = _options(root, "shards-killed", steps=steps, num_workers=2, save_every=2)
    metrics = root / "shards-killed" / "metrics.jsonl"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kill_at_step(_command(options), metrics, 5, environment)
    killed_at = latest_checkpoint(root / "shards-killed" / "checkpoints")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < steps
    subprocess.run(_command(options), env=environment, check=True, stdout=subprocess.DEVNULL, timeout=180)
    kept = {record["step"]: record["loss"] for record in _metrics(root / "shards-killed")}
    assert kept == {record["step"]: record["loss"] for record in reference}  # bit for bit
    final = SigLip2.from_pretrained(root / "shards-killed" / "final", dtype=torch.float64).state_dict()
    expected = SigLip2.from_pretrained(root / "shards-uninterrupted" / "final", dtype=torch.float64).state_dict()
    assert all(torch.equal(final[name], tensor) for name, tensor in expected.items())
    saved = json.loads((latest_checkpoint(root / "shards-killed" / "checkpoints") / "trainer.json").read_text())
    saved = saved["stream"]
    assert saved["world_size"] == 1 and saved["num_workers"] == 2 and len(saved["ranks"][0]["roles"]) == 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 2}, "seed: was 1, now 2"),
        ({"warmup_steps": 3}, "warmup_steps: was 2, now 3"),
        ({"token_budget": 64}, "token_budget: was 48, now 64"),
        ({"max_num_patches": (16,)}, r"max_num_patches: was \[8, 16\], now \[16\]"),
        ({"data": "DATA"}, "data: was"),
    ],
)
def test_resume_refuses_a_changed_run(root, change, match):
    out = "record"
    if not (root / out / "final").is_dir():
        train(RecipeConfig(**_options(root, out, save_every=2)))
    if change.get("data") == "DATA":  # another shard list (one shard fewer)
        change = {"data": str(root / "s-{000..008}.tar")}
    with pytest.raises(ValueError, match=match):
        train(RecipeConfig(**_options(root, out, **change)))
    record = json.loads((root / out / "run.json").read_text())
    assert record["seed"] == 1 and record["world_size"] == 1 and record["model_config_json"] == TINY


def test_parameter_groups_decay_only_weight_matrices(root):
    model = build_model(RecipeConfig(**_options(root, "x")))
    decay, no_decay = parameter_groups(ContrastiveForward(model), 0.1)
    names = {id(parameter): name.removeprefix("model.") for name, parameter in model.named_parameters()}
    decayed = {names[id(parameter)] for parameter in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    layers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    expected = {
        "vision_model.embeddings.patch_embedding.weight",
        *(f"vision_model.encoder.layers.0.{layer}.weight" for layer in layers),
        "vision_model.head.attention.in_proj_weight",
        "vision_model.head.attention.out_proj.weight",
        "vision_model.head.mlp.fc1.weight",
        "vision_model.head.mlp.fc2.weight",
        "text_model.embeddings.token_embedding.weight",
        *(f"text_model.encoder.layers.0.{layer}.weight" for layer in layers),
        "text_model.head.weight",
    }
    assert decayed == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("num_micro", [2, 3])
def test_accumulation_equals_one_big_batch(root, num_micro):
    """k micro-batches scored against all their features == one batch of all of them: loss and every gradient."""
    config = RecipeConfig(**_options(root, "x", accumulation=num_micro))
    model = build_model(config)
    spec = StreamSpec(tuple(parse_sources(config.data)), 48, 8, (8, 16), seed=1, shuffle_buffer=4)
    feed = StreamFeed(ShardStream(spec, ByteTokenizer(12)))
    batches = [(0, feed.next()["batch"]) for _ in range(num_micro)]
    loss, images, _ = _accumulated_step(ContrastiveForward(model), batches, config, 1, torch.device("cpu"), "none")
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    # the reference: the model's own dense loss on the concatenated batch (SigLip2.forward, return_loss)
    items = [batch for _, batch in batches]
    output = model(
        input_ids=torch.cat([batch.input_ids for batch in items]),
        pixel_values=PackedImages(
            torch.cat([batch.images.patches for batch in items]).double(),
            torch.cat([batch.images.grid_thw for batch in items]),
        ),
        return_loss=True,
    )
    output.loss.backward()
    assert images == sum(batch.images.num_images for batch in items)
    torch.testing.assert_close(loss, output.loss.detach(), atol=1e-12, rtol=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-12, rtol=1e-10, msg=name)
    # and it differs from averaging the micro-batch losses (negatives from each micro-batch only)
    model.zero_grad()
    forward = ContrastiveForward(model)
    with torch.no_grad():
        averaged = sum(sigmoid_loss(*forward(b.images.patches.double(), b.images.grid_thw, b.input_ids)) for b in items)
    assert abs(float(averaged) / num_micro - float(loss)) > 1e-5  # far outside the 1e-12 of the equality above


def test_tensorboard_when_installed(root, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, folder: str) -> None:
            calls.append(("folder", folder))

        def add_scalar(self, name: str, value: float, step: int) -> None:
            calls.append((name, step))

        def close(self) -> None:
            calls.append(("close", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(RecipeConfig(**_options(root, "tb", steps=2)))
    assert calls[0] == ("folder", str(root / "tb" / "tensorboard"))
    assert ("train/loss", 1) in calls and ("train/skipped", 2) in calls and calls[-1] == ("close", None)


# ---- over gloo --------------------------------------------------------------------------------------------------

WORKERS = 2


def _gloo(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=90)
    )


CASES = {2: ("ddp", "fsdp"), 3: ("ddp",)}


def _distributed_worker(rank: int, world_size: int, port: int, root: str) -> None:
    _gloo(rank, world_size, port)
    root = Path(root)
    try:
        results = {}
        for parallel in CASES[world_size]:
            options = _options(root, f"w{world_size}-{parallel}", parallel=parallel, num_workers=WORKERS, steps=4)
            # FSDP2 saves sharded checkpoints (torch.distributed.checkpoint), DDP full ones
            fmt = "sharded" if parallel == "fsdp" else "full"
            config = RecipeConfig(**options, save_every=2, checkpoint_format=fmt, eval_data=str(root / EVAL_DATA))
            results[parallel] = [record["loss"] for record in train(config)]
            if rank == 0:
                (Path(config.out) / "checkpoints" / "latest").write_text("step-00000002\n")
            dist.barrier()
            resumed = train(config)
            results[f"{parallel}-resumed"] = [record["loss"] for record in resumed]
            results[f"{parallel}-eval"] = {k: v for k, v in resumed[-1].items() if k.startswith("eval_")}
        # a rank that does not see the checkpoint rank 0 picked: every rank refuses (none starts from scratch)
        checkpoints = root / f"w{world_size}-ddp" / "checkpoints" if rank == 0 else root / f"nothing-{rank}"
        try:
            agree_on_checkpoint(checkpoints, True, rank, world_size)
            results["refused"] = None
        except RuntimeError as error:
            results["refused"] = str(error)
        # a run folder that is not shared: each rank looks into its own folder
        try:
            check_shared_folder(root / f"private-{rank}", rank, world_size)
            results["unshared"] = None
        except RuntimeError as error:
            results["unshared"] = str(error)
        if world_size == 3:
            # a 1-process run's step-2 checkpoint (mid-epoch) resumed on 3 processes: its reader re-dealt
            config = RecipeConfig(**_options(root, "w1-to-w3", parallel="ddp", num_workers=WORKERS, steps=4))
            results["redealt"] = [record["loss"] for record in train(config)]
        torch.save(results, root / f"w{world_size}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference_run(root: Path, world_size: int) -> list[float]:
    """One process: the ranks' streams (workers emulated in process), ended together, one dense loss per step."""
    config = RecipeConfig(**_options(root, "reference", steps=4))
    model = build_model(config).train()
    spec = StreamSpec(tuple(parse_sources(config.data)), 48, 8, (8, 16), seed=1, shuffle_buffer=4)
    feeds = [StreamFeed(ShardStream(spec, ByteTokenizer(12), rank, world_size, WORKERS)) for rank in range(world_size)]

    def next_round() -> list:
        while True:
            items = [feed.next() for feed in feeds]
            if all(item is not None for item in items):
                return [item["batch"] for item in items]
            for feed in feeds:
                feed.end_epoch()

    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate)
    losses = []
    for step in range(config.steps):
        factor = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / (config.steps - 2)))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        parts = [batch for _ in range(config.accumulation) for batch in next_round()]
        output = model(
            input_ids=torch.cat([part.input_ids for part in parts]),
            pixel_values=PackedImages(
                torch.cat([part.images.patches for part in parts]).double(),
                torch.cat([part.images.grid_thw for part in parts]),
            ),
            return_loss=True,
        )
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_distributed_on_shards(root, world_size):
    """2 and 3 processes x 2 workers: DDP (and FSDP2 with sharded checkpoints) on shards equal one process."""
    if world_size == 3:  # the world-size change: a 1-process run stopped at step 2, resumed on 3 processes
        train(RecipeConfig(**_options(root, "w1-to-w3", num_workers=WORKERS, steps=4, save_every=2)))
        shutil.rmtree(root / "w1-to-w3" / "final")
        (root / "w1-to-w3" / "checkpoints" / "latest").write_text("step-00000002\n")
    spawn(_distributed_worker, world_size, str(root), timeout_s=600)
    expected = reference_run(root, world_size)
    for rank in range(world_size):
        results = torch.load(root / f"w{world_size}-rank{rank}.pt")
        for parallel in CASES[world_size]:
            losses = torch.tensor(results[parallel])
            torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-10, rtol=1e-10)
            assert results[f"{parallel}-resumed"] == results[parallel][2:]  # resumed from step 2: bit for bit
            # the evaluation split over the ranks: the exported model's scores, computed by hand in one process
            final = root / f"w{world_size}-{parallel}" / "final"
            assert results[f"{parallel}-eval"] == _hand_scores(final, str(root / EVAL_DATA))
        assert "which rank(s) [1" in results["refused"] and "cannot read" in results["refused"]
        assert "is not shared: rank 1 on" in results["unshared"]
    metrics = _metrics(root / f"w{world_size}-ddp")
    assert metrics[-1]["skipped_per_rank"] == [0] * world_size and metrics[-1]["read"] > 0
    if world_size == 2:
        assert (root / "w2-fsdp" / "checkpoints" / "step-00000004" / "dcp" / ".metadata").is_file()
    if world_size == 3:
        redealt = [torch.load(root / f"w3-rank{rank}.pt")["redealt"] for rank in range(3)]
        assert all(len(losses) == 2 and all(math.isfinite(loss) for loss in losses) for losses in redealt)
        history = json.loads((root / "w1-to-w3" / "run.json").read_text())["history"]
        assert [(entry["step"], entry["world_size"]) for entry in history] == [(0, 1), (2, 3)]
        assert (
            json.loads((root / "w1-to-w3" / "checkpoints" / "step-00000004" / "trainer.json").read_text())["stream"][
                "world_size"
            ]
            == 3
        )


EVAL_DATA = "s-{008..009}.tar"  # 6 samples, held out as the evaluation set


def _hand_scores(final: Path, eval_data: str) -> dict[str, float]:
    """The exported model's zero-shot and recall@1 on the held-out shards, image by image, written out."""
    model = SigLip2.from_pretrained(final, dtype=torch.float64)
    spec = StreamSpec(tuple(parse_sources(eval_data)), 16, 8, (16,), shuffle_buffer=1)
    images, texts, keys = [], [], []
    for item in ShardStream(spec, ByteTokenizer(12)).role_batches(0):
        for index in range(item["batch"].images.num_images):
            one = _single(item, index)
            with torch.no_grad():
                pixels = PackedImages(one["patches"].double(), one["grid_thw"])
                images.append(torch.nn.functional.normalize(model.get_image_features(pixels).pooler_output, dim=-1))
                text = model.get_text_features(one["input_ids"][None]).pooler_output
                texts.append(torch.nn.functional.normalize(text, dim=-1))
        keys += item["keys"]
    by_key = {}
    for url in spec.urls:
        with tarfile.open(url) as archive:
            for member in archive:
                if member.name.endswith(".txt"):
                    by_key[f"{url}/{member.name.removesuffix('.txt')}"] = archive.extractfile(member).read().decode()
    captions = [by_key[key] for key in keys]
    images, texts = torch.cat(images), torch.cat(texts)
    # nearest caption among the distinct ones; nearest text; nearest image (a repeated caption counts as right)
    distinct = sorted(set(captions))
    prompts = torch.stack([texts[captions.index(name)] for name in distinct])
    count = len(captions)
    zero_shot = sum(distinct[int((images[i] @ prompts.T).argmax())] == captions[i] for i in range(count))
    to_text = sum(captions[int((images[i] @ texts.T).argmax())] == captions[i] for i in range(count))
    to_image = sum(captions[int((texts[i] @ images.T).argmax())] == captions[i] for i in range(count))
    assert count == 6
    return {
        "eval_zero_shot_top1": zero_shot / count,
        "eval_image_to_text_r1": to_text / count,
        "eval_text_to_image_r1": to_image / count,
    }


def test_evaluation_during_training(root):
    """Zero-shot and retrieval on held-out shards at steps 2 and 4, equal to the final model scored by hand."""
    eval_data = str(root / EVAL_DATA)
    records = train(RecipeConfig(**_options(root, "eval", steps=4, eval_data=eval_data, eval_every=2)))
    assert [("eval_zero_shot_top1" in record) for record in records] == [False, True, False, True]
    expected = _hand_scores(root / "eval" / "final", eval_data)
    assert {name: records[-1][name] for name in expected} == expected


def _single(item: dict, index: int) -> dict:
    """Image ``index`` of a stream batch as a dataset item."""
    batch = item["batch"]
    lengths = batch.images.grid_thw.prod(-1).tolist()
    start = sum(lengths[:index])
    return {
        "patches": batch.images.patches[start : start + lengths[index]],
        "grid_thw": batch.images.grid_thw[index : index + 1],
        "input_ids": batch.input_ids[index],
    }
