"""Drop-in training: ``transformers.Trainer`` user code run once on transformers' model and once on ours.

The same script (tiny random checkpoint, 3 optimizer steps, ``gradient_checkpointing=True``, CPU) trains
``AutoModel.from_pretrained(folder)`` and ``SigLip2.from_pretrained(folder)``; the logged losses and the trained
weights must agree (fp32: losses to 1e-4, weights to 1e-5), and ``trainer.save_model`` folders reload.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import read_config

from kornia_siglip2 import SigLip2

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _dataset(naflex: bool) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(12):
        item = {"input_ids": torch.randint(0, 99, (64,), generator=generator)}
        if naflex:  # transformers' padded NaFlex inputs: a 4 x 3 grid padded to 16 patches
            pixels = torch.zeros(16, 48)
            pixels[:12] = torch.rand(12, 48, generator=generator) * 2 - 1
            item["pixel_values"] = pixels
            item["pixel_attention_mask"] = (torch.arange(16) < 12).int()
            item["spatial_shapes"] = torch.tensor([4, 3])
        else:
            item["pixel_values"] = torch.rand(3, 16, 16, generator=generator) * 2 - 1
        items.append(item)
    return items


def _collate(items: list[dict[str, torch.Tensor]]) -> dict:
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    batch["return_loss"] = True
    return batch


def _train(model, output_dir, dataset, **arguments) -> transformers.Trainer:
    """What a user writes: TrainingArguments + Trainer + train()."""
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        gradient_checkpointing=True,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **{"save_strategy": "no", "learning_rate": 1e-3, **arguments},
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing=True is deprecated in 5.24
        trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_trainer_with_gradient_checkpointing_logs_transformers_losses(family, request, tmp_path):
    folder = request.getfixturevalue(f"{family}_checkpoint")
    dataset = _dataset(naflex=family == "siglip2")
    theirs = transformers.AutoModel.from_pretrained(folder)
    ours = SigLip2.from_pretrained(folder)
    # plain SGD: Adam divides by the gradient's running RMS, so a gradient that is 0 up to rounding (the key
    # biases: softmax ignores a shift; any element near 0) takes a learning-rate-sized step whose sign is rounding
    # noise, and the trained weights would differ by ~lr wherever the two libraries round differently
    options = {"optim": "sgd", "learning_rate": 0.1}
    expected = _train(theirs, tmp_path / "theirs", dataset, **options)
    actual = _train(ours, tmp_path / "ours", dataset, **options)
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing
    assert len(_losses(actual)) == 3
    assert _losses(actual) == pytest.approx(_losses(expected), abs=1e-4)
    assert _losses(expected)[0] != pytest.approx(_losses(expected)[-1], abs=1e-4)  # the weights did move
    trained = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, trained[key], atol=1e-5, rtol=1e-4, msg=key)


def test_gradient_checkpointing_api_as_transformers(hf_siglip):
    """enable / disable / is_... with transformers' keywords; the deprecated names warn as transformers'."""
    ours = SigLip2.from_transformers(hf_siglip)
    theirs = transformers.SiglipModel(hf_siglip.config)
    for model in (theirs, ours):
        assert model.supports_gradient_checkpointing and not model.is_activation_checkpointing
        with pytest.warns(FutureWarning):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with pytest.warns(FutureWarning):
            assert model.is_gradient_checkpointing
        with pytest.warns(FutureWarning):
            model.gradient_checkpointing_disable()
        assert not model.is_activation_checkpointing
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing


def test_gradient_checkpointing_gradients_equal_transformers(hf_siglip):
    ours = SigLip2.from_transformers(hf_siglip).train()
    theirs = transformers.SiglipModel(hf_siglip.config)
    theirs.load_state_dict(hf_siglip.state_dict())
    theirs.train()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, 99, (3, 64), generator=generator),
        "pixel_values": torch.rand(3, 3, 16, 16, generator=generator),
        "return_loss": True,
    }
    for model in (theirs, ours):
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.zero_grad()
        model(**inputs).loss.backward()
    gradients = {name: parameter.grad for name, parameter in theirs.named_parameters()}
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unsupported_checkpointing_options_are_named(hf_siglip):
    ours = SigLip2.from_transformers(hf_siglip)
    with pytest.raises(ValueError, match="preserve_rng_state"):
        ours.activation_checkpointing_enable({"preserve_rng_state": False})
    with pytest.raises(ValueError, match="every_n_layers"):
        ours.activation_checkpointing_enable(every_n_layers=2)
    with pytest.raises(ValueError, match="offload"):
        ours.activation_checkpointing_enable(offload=True)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_trainer_save_model_folder_reloads_with_the_base_config(family, request, tmp_path):
    """Trainer.save_model writes weights only for a model that is not a PreTrainedModel; config= reloads it."""
    folder = request.getfixturevalue(f"{family}_checkpoint")
    dataset = _dataset(naflex=family == "siglip2")
    ours = SigLip2.from_pretrained(folder)
    trainer = _train(ours, tmp_path / "run", dataset)
    trainer.save_model(tmp_path / "saved")
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == ["model.safetensors", "training_args.bin"]
    with pytest.raises(FileNotFoundError, match="config=BASE"):
        SigLip2.from_pretrained(tmp_path / "saved")
    # the same call on transformers' class loads the same folder with the same config
    base_config = transformers.AutoConfig.from_pretrained(folder)
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "saved", config=base_config)
    reloaded = SigLip2.from_pretrained(tmp_path / "saved", config=base_config)
    for config in (str(folder), ours.config, read_config(folder)):
        assert SigLip2.from_pretrained(tmp_path / "saved", config=config).config == ours.config
    trained = {key: tensor.detach() for key, tensor in ours.state_dict().items()}
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[key]), key
        assert torch.equal(theirs.state_dict()[key], trained[key]), key


def test_trainer_resumes_from_its_checkpoint(siglip_checkpoint, tmp_path):
    """save_steps=2 then resume_from_checkpoint: the resumed third step logs the uninterrupted run's loss."""
    dataset = _dataset(naflex=False)
    straight = _train(SigLip2.from_pretrained(siglip_checkpoint), tmp_path / "straight", dataset)
    _train(SigLip2.from_pretrained(siglip_checkpoint), tmp_path / "run", dataset, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = transformers.Trainer(
        model=SigLip2.from_pretrained(siglip_checkpoint),
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=_collate,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert _losses(resumed)[-1] == pytest.approx(_losses(straight)[-1], abs=1e-4)
