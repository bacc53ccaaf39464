"""Loading and saving checkpoints: folders, shards, the HF cache offline, errors, round trips."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_config
from safetensors.torch import load_file, save_file

from kornia_siglip2 import SigLip2, load_vision_tower, patchify
from kornia_siglip2.hub import from_hf_state_dict, to_hf_state_dict
from kornia_siglip2.packing import conv_to_linear_patch_weight, linear_to_conv_patch_weight


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
class TestLoad:
    def _folder(self, request, family):
        return request.getfixturevalue(f"{family}_checkpoint")

    def test_every_weight_loads(self, request, family):
        folder = self._folder(request, family)
        hf = request.getfixturevalue(f"hf_{family}")
        model = SigLip2.from_pretrained(folder)
        assert model.config.model_type == family and not model.training
        ours = to_hf_state_dict(model)
        theirs = hf.state_dict()
        assert set(ours) == set(theirs)  # MAP head, text head, logit scale and bias included
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), key

    def test_save_roundtrip_is_bit_exact(self, request, family, tmp_path):
        folder = self._folder(request, family)
        SigLip2.from_pretrained(folder).save_pretrained(tmp_path / "saved")
        original = load_file(folder / "model.safetensors")
        saved = load_file(tmp_path / "saved" / "model.safetensors")
        assert set(saved) == set(original)
        for key, tensor in original.items():
            assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key

    def test_saved_folder_loads_in_transformers(self, request, family, tmp_path):
        from transformers import AutoModel

        model = SigLip2.from_pretrained(self._folder(request, family))
        model.save_pretrained(tmp_path / "saved")
        reference = AutoModel.from_pretrained(tmp_path / "saved").eval()
        input_ids = torch.randint(0, 99, (2, 64))
        images = {"pixel_values": torch.randn(2, 3, 16, 16)}
        if family == "siglip2":  # transformers' NaFlex model takes padded patches
            patches, grid_thw = patchify(images["pixel_values"], 4)
            images = {
                "pixel_values": patches.reshape(2, 16, 48),
                "pixel_attention_mask": torch.ones(2, 16, dtype=torch.int32),
                "spatial_shapes": grid_thw[:, 1:],
            }
        with torch.no_grad():
            expected = reference(input_ids=input_ids, **images).logits_per_image
            out = model(input_ids=input_ids, **images).logits_per_image
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    def test_sharded(self, request, family, tmp_path):
        hf = request.getfixturevalue(f"hf_{family}")
        hf.save_pretrained(tmp_path, max_shard_size="50KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
        sharded = SigLip2.from_pretrained(tmp_path)
        single = SigLip2.from_pretrained(self._folder(request, family))
        for (key, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
            assert torch.equal(a, b), key

    def test_device_and_dtype(self, request, family):
        model = SigLip2.from_pretrained(self._folder(request, family), dtype=torch.float64, device="cpu")
        assert {p.dtype for p in model.parameters()} == {torch.float64}


def _populate_hf_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay out a Hugging Face hub cache entry by hand, as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_load_by_hub_id_from_offline_cache(siglip2_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    _populate_hf_cache(cache, "tiny-org/tiny-siglip2", siglip2_checkpoint)
    script = (
        "import torch, kornia_siglip2 as k;"
        "m = k.SigLip2.from_pretrained('tiny-org/tiny-siglip2');"
        "print(m.config.model_type, sum(p.numel() for p in m.parameters()))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = sum(p.numel() for p in SigLip2.from_pretrained(siglip2_checkpoint).parameters())
    assert result.stdout.split() == ["siglip2", str(expected)]
    # the same call with an explicit cache_dir, in process
    model = SigLip2.from_pretrained("tiny-org/tiny-siglip2", cache_dir=cache, local_files_only=True)
    assert model.config.is_naflex


class TestErrors:
    def test_missing_key(self, siglip2_checkpoint, tmp_path):
        folder = _copy(siglip2_checkpoint, tmp_path)
        tensors = load_file(folder / "model.safetensors")
        del tensors["vision_model.head.probe"]
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(ValueError, match=r"missing keys \['vision_model.head.probe'\]"):
            SigLip2.from_pretrained(folder)

    def test_unexpected_key(self, siglip2_checkpoint, tmp_path):
        folder = _copy(siglip2_checkpoint, tmp_path)
        tensors = load_file(folder / "model.safetensors")
        tensors["vision_model.extra.weight"] = torch.zeros(2)
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(ValueError, match=r"unexpected keys \['vision_model.extra.weight'\]"):
            SigLip2.from_pretrained(folder)

    def test_incomplete_qkv(self, siglip2_checkpoint, tmp_path):
        folder = _copy(siglip2_checkpoint, tmp_path)
        tensors = load_file(folder / "model.safetensors")
        del tensors["text_model.encoder.layers.1.self_attn.k_proj.bias"]
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(ValueError, match=r"text_model.encoder.layers.1.self_attn.k_proj.bias"):
            SigLip2.from_pretrained(folder)

    def test_wrong_shape_names_config(self, siglip2_checkpoint, tmp_path):
        folder = _copy(siglip2_checkpoint, tmp_path)
        config = read_config(folder)
        config["text_config"]["max_position_embeddings"] = 32
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(
            ValueError,
            match=r"text_model.embeddings.position_embedding.weight: checkpoint \(64, 48\) vs model \(32, 48\)",
        ):
            SigLip2.from_pretrained(folder)

    def test_unknown_model_type(self, siglip2_checkpoint, tmp_path):
        folder = _copy(siglip2_checkpoint, tmp_path)
        config = read_config(folder)
        config["model_type"] = "clip"
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="Unknown model_type 'clip'"):
            SigLip2.from_pretrained(folder)

    def test_pickle_is_refused(self, tmp_path, siglip2_checkpoint):
        shutil.copy(siglip2_checkpoint / "config.json", tmp_path / "config.json")
        (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
        with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
            SigLip2.from_pretrained(tmp_path)

    def test_missing_config(self, tmp_path, siglip2_checkpoint):
        shutil.copy(siglip2_checkpoint / "model.safetensors", tmp_path / "model.safetensors")
        with pytest.raises(FileNotFoundError, match=r"No config\.json"):
            SigLip2.from_pretrained(tmp_path)

    def test_unknown_hub_id_offline(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="Could not find checkpoint 'nobody/nothing'"):
            SigLip2.from_pretrained("nobody/nothing", cache_dir=tmp_path, local_files_only=True)


def test_minimal_hub_config_gets_transformers_defaults(siglip_checkpoint, tmp_path):
    """Hub configs often name only the model types; absent fields take transformers' defaults."""
    folder = _copy(siglip_checkpoint, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match=r"\(99, 48\) vs model \(32000, 768\)"):
        SigLip2.from_pretrained(folder)


def test_conv_patch_embedding_as_linear_over_py_px_c(hf_siglip):
    """transformers' conv weight is kept; as a Linear over (py, px, c) patches it equals the conv."""
    ours = from_hf_state_dict(hf_siglip.state_dict())
    conv = hf_siglip.vision_model.embeddings.patch_embedding
    assert torch.equal(ours["vision_model.embeddings.patch_embedding.weight"], conv.weight)
    weight = conv_to_linear_patch_weight(conv.weight)
    assert weight.shape == (32, 4 * 4 * 3) and "vision_model.encoder.layers.0.self_attn.q_proj.weight" in ours
    assert torch.equal(linear_to_conv_patch_weight(weight, 3), conv.weight)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = conv(images).flatten(2).transpose(1, 2).flatten(0, 1)
    patches, _ = patchify(images, 4)
    torch.testing.assert_close(patches @ weight.T + conv.bias, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_vision_only_checkpoints(family, tmp_path, request):
    """transformers' SiglipVisionModel / Siglip2VisionModel save without the `vision_model.` prefix."""
    hf = request.getfixturevalue(f"hf_{family}")
    hf.vision_model.save_pretrained(tmp_path / "vision")
    tower = load_vision_tower(tmp_path / "vision", dtype=torch.float64)
    from_full = load_vision_tower(request.getfixturevalue(f"{family}_checkpoint"), dtype=torch.float64)
    patches, grid_thw = patchify(torch.rand(2, 3, 16, 16, dtype=torch.float64), 4)
    expected = SigLip2.from_pretrained(request.getfixturevalue(f"{family}_checkpoint"), dtype=torch.float64)
    with torch.no_grad():
        reference = expected.encode_image(patches=patches, grid_thw=grid_thw)
        torch.testing.assert_close(tower(patches, grid_thw).pooler_output, reference, atol=0, rtol=0)
        torch.testing.assert_close(from_full(patches, grid_thw).pooler_output, reference, atol=0, rtol=0)
