"""Tests of kornia_siglip2.training.recipe in one process: schedule, activation checkpointing, bf16, CLI, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_helpers import recipe_options, tiny_siglip2_config

from kornia_siglip2 import SigLip2, SigLip2Config
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.losses import sigmoid_loss
from kornia_siglip2.packing import PackedImages
from kornia_siglip2.training.data import ByteTokenizer, ImageTextDataset, collate_packed, read_manifest
from kornia_siglip2.training.recipe import ContrastiveForward, RecipeConfig, _parser, train, warmup_cosine
from kornia_siglip2.training.synthetic import write_synthetic_dataset

TINY = tiny_siglip2_config(vision_layers=3, text_layers=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe_unit")
    write_synthetic_dataset(root / "data", 12, seed=0, min_side=12, max_side=40)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def _options(root: Path, out: str, **overrides) -> dict:
    return recipe_options(root, root / out, **overrides)


def test_warmup_cosine():
    total, warmup, floor = 20, 5, 0.1
    for step in range(total + 3):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            angle = math.pi * min((step - warmup) / (total - warmup), 1.0)
            expected = floor + (1 - floor) * (1 + math.cos(angle)) / 2
        assert warmup_cosine(step, total, warmup, floor) == pytest.approx(expected, abs=1e-15)


def _saved_bytes_and_grads(model: SigLip2, packed: PackedImages, input_ids: torch.Tensor):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        image_embeds, text_embeds, scale, bias = ContrastiveForward(model)(*packed, input_ids)
        loss = sigmoid_loss(image_embeds, text_embeds, scale, bias)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return sum(saved), grads


def test_grad_checkpointing_same_gradients_fewer_saved_activations(root):
    model = SigLip2(SigLip2Config.from_hf_dict(TINY)).double().train()
    dataset = ImageTextDataset(read_manifest(root / "data" / "manifest.jsonl"), ByteTokenizer(12), 8, 16)
    items = [dataset[index] for index in range(4)]
    batch = collate_packed(items)
    packed = batch.images.to(dtype=torch.float64)
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, packed, batch.input_ids)
    model.set_grad_checkpointing(True)
    checkpointed_bytes, checkpointed_grads = _saved_bytes_and_grads(model, packed, batch.input_ids)
    for plain, checkpointed in zip(plain_grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-12, rtol=1e-12)
    # the tensors autograd keeps for backward (activation memory) with three blocks per tower recomputed
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_bf16_with_grad_checkpointing_and_accumulation(root):
    options = _options(root, "bf16", precision="bf16", grad_checkpointing=True, accumulation=2, progress=True)
    records = train(RecipeConfig(**options))
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]) and record["tokens"] > 0 for record in records)
    logged = [json.loads(line) for line in (root / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert logged == records
    assert {"loss", "lr", "tokens_per_s", "memory_mb", "grad_norm", "images"} <= logged[0].keys()
    assert (root / "bf16" / "final" / "model.safetensors").is_file()


FULL = dict(objective="siglip2", distill_start=0.5, size_factor=0.25, locca_num_bins=16, distill_heads=(16, 8, 32))


def test_full_objective_bf16_with_grad_checkpointing(root):
    """Both sides of the switch under bf16 autocast with recomputed blocks; the first step near float64's."""
    reference = train(RecipeConfig(**_options(root, "full-fp64", precision="fp64", **FULL)))
    options = _options(root, "full-bf16", precision="bf16", grad_checkpointing=True, accumulation=2, **FULL)
    records = train(RecipeConfig(**options))
    assert [record["distillation"] for record in records] == [False, True]
    assert records[0]["consistency"] is None and math.isfinite(records[1]["consistency"])
    assert all(math.isfinite(record[name]) for record in records for name in ("loss", "sigmoid", "locca"))
    # accumulation 2 vs 1 covers the same first micro-batch and more: compare the term of one micro-batch
    single = train(RecipeConfig(**{**options, "out": str(root / "full-bf16-1"), "accumulation": 1}))
    for name in ("loss", "sigmoid", "locca"):
        assert single[0][name] == pytest.approx(reference[0][name], rel=2e-2), name
    final = SigLip2.from_pretrained(root / "full-bf16" / "final").state_dict()
    assert final.keys() == SigLip2(SigLip2Config.from_hf_dict(TINY)).state_dict().keys()  # the model only


def test_fine_tune_starts_from_the_checkpoint(root):
    """With a zero learning rate a fine-tuning run keeps the loaded weights; its loss is the model's own."""
    torch.manual_seed(0)
    start = SigLip2(SigLip2Config.from_hf_dict(TINY))
    start.save_pretrained(root / "start")
    options = _options(root, "finetune", model=str(root / "start"), model_config=None, learning_rate=0.0, steps=1)
    options["precision"] = "fp64"
    records = train(RecipeConfig(**options))
    final = SigLip2.from_pretrained(root / "finetune" / "final").state_dict()
    for name, tensor in start.state_dict().items():
        assert torch.equal(final[name], tensor), name
    assert math.isfinite(records[0]["loss"])


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--token-budget" in text and "patch tokens per rank and micro-batch" in text and "{none,ddp,fsdp}" in text
    assert "{sigmoid,siglip2}" in text and "--distill-start" in text and "--size-factor" in text


def test_cli_parses_into_the_config():
    argv = "--data m.jsonl --out o --model-config c.json --max-num-patches 64 256 --token-budget 4096"
    argv += " --learning-rate 3e-4 --grad-checkpointing --no-resume --parallel fsdp --grad-clip 0.5"
    args = _parser().parse_args(argv.split())
    config = RecipeConfig(**vars(args))
    assert config.max_num_patches == (64, 256) and config.token_budget == 4096
    assert config.learning_rate == 3e-4 and config.grad_checkpointing and not config.resume
    assert config.parallel == "fsdp" and config.grad_clip == 0.5 and config.save_every is None
    assert RecipeConfig(**{**vars(args), "grad_clip": 0.0}).grad_clip is None  # 0 switches clipping off
    argv = "--data m.jsonl --out o --model-config c.json --objective siglip2 --distill-heads 64 16 128"
    argv += " --size-factor 0.5 --distill-start 0.75 --ema-momentum 0.99 --parallel fsdp"
    config = RecipeConfig(**vars(_parser().parse_args(argv.split())))
    assert config.objective == "siglip2" and config.distill_heads == (64, 16, 128) and config.size_factor == 0.5
    assert config.distill_start == 0.75 and config.ema_momentum == 0.99  # EMA under FSDP2 is allowed


def test_exception(root):
    with pytest.raises(ValueCheckError, match="parallel must be one of"):
        RecipeConfig(**_options(root, "x", parallel="zero"))
    with pytest.raises(ValueCheckError, match="Give model"):
        RecipeConfig(**_options(root, "x", model_config=None))
    with pytest.raises(ValueCheckError, match="objective must be one of"):
        RecipeConfig(**_options(root, "x", objective="locca"))
    with pytest.raises(ValueCheckError, match="distill_heads needs 3 widths"):
        RecipeConfig(**_options(root, "x", distill_heads=(8, 8)))
    with pytest.raises(ValueError, match=r"not a SigLIP 2 size.*--size-factor"):  # a 16-wide tower has no size
        train(RecipeConfig(**_options(root, "x", objective="siglip2")))
    small = {**TINY, "text_config": {**TINY["text_config"], "vocab_size": 99}}
    (root / "small.json").write_text(json.dumps(small))
    with pytest.raises(ValueCheckError, match="has 258 ids but the text tower embeds 99"):
        train(RecipeConfig(**_options(root, "x", model_config=str(root / "small.json"))))


def test_token_drop_run_and_resume(root):
    """``--token-drop 0.5``: more images per step within the budget; a resumed run equals the uninterrupted one."""
    argv = f"--data {root / 'data' / 'manifest.jsonl'} --model-config {root / 'tiny.json'} --text-length 12"
    argv += " --parallel none --token-budget 64 --max-num-patches 16 --warmup-steps 1 --num-workers 0"
    argv = f"{argv} --threads 1 --device cpu --precision fp64 --token-drop 0.5".split()
    config = RecipeConfig(**vars(_parser().parse_args([*argv, "--out", str(root / "drop"), "--steps", "2"])))
    assert config.token_drop == 0.5
    records = train(config)
    plain = train(RecipeConfig(**{**vars(config), "out": str(root / "no-drop"), "token_drop": 0.0}))
    assert all(math.isfinite(record["loss"]) and 0 < record["tokens"] <= 64 for record in records)
    assert records[0]["images"] > plain[0]["images"]  # the budget holds more images once half is dropped
    assert records[0]["tokens"] / records[0]["images"] <= 0.5 * plain[0]["tokens"] / plain[0]["images"] + 1
    # resumed from the step-1 checkpoint: bit for bit the uninterrupted run (the same dropped patches)
    first = RecipeConfig(**vars(_parser().parse_args([*argv, "--out", str(root / "drop-resumed"), "--steps", "2"])))
    train(RecipeConfig(**{**vars(first), "save_every": 1}))
    (root / "drop-resumed" / "checkpoints" / "latest").write_text("step-00000001\n")
    resumed = train(first)
    assert [record["step"] for record in resumed] == [2] and resumed[0]["loss"] == records[1]["loss"]
    expected = SigLip2.from_pretrained(root / "drop" / "final", dtype=torch.float64).state_dict()
    final = SigLip2.from_pretrained(root / "drop-resumed" / "final", dtype=torch.float64).state_dict()
    assert all(torch.equal(final[name], tensor) for name, tensor in expected.items())


def test_token_drop_refuses_the_full_objective(root):
    with pytest.raises(ValueCheckError, match=r"token_drop 0\.5 needs objective 'sigmoid'"):
        RecipeConfig(**_options(root, "x", token_drop=0.5, **FULL))
    with pytest.raises(ValueCheckError, match=r"token_drop must be in \[0, 1\)"):
        RecipeConfig(**_options(root, "x", token_drop=1.0))
