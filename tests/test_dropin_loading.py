"""Drop-in loading: transformers 5 ``from_pretrained`` keyword code, run once on transformers and once on ours.

Each snippet is user code of the form ``cls.from_pretrained(folder, **keywords)`` followed by a forward; the
test runs it with ``transformers.AutoModel`` and with :class:`kornia_siglip2.SigLip2` (or the vision towers)
and asserts the same dtype, device and values (fp32 atol 1e-5 / rtol 1e-4, bf16 3e-2, fp64 1e-10).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_hf_siglip, make_hf_siglip2, read_config, tolerance

from kornia_siglip2 import SigLip2, SigLip2VisionModel, load_vision_tower
from kornia_siglip2.attention import ATTENTION_BACKENDS
from kornia_siglip2.loading import ATTN_IMPLEMENTATIONS, load_options

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    """A SigLIP checkpoint saved in bfloat16 by transformers (config.json says dtype bfloat16)."""
    folder = tmp_path_factory.mktemp("siglip_bf16")
    make_hf_siglip(seed=3).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bf16_checkpoint_without_dtype(tmp_path_factory, bf16_checkpoint) -> Path:
    """The same weights, config.json without its dtype: "auto" falls back to the stored tensors' dtype."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("siglip_bf16_nodtype")
    for path in bf16_checkpoint.iterdir():
        shutil.copy(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
        for sub in ("text_config", "vision_config"):
            config[sub].pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def subfolder_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    make_hf_siglip2(seed=4).save_pretrained(folder / "weights", safe_serialization=True)
    return folder


def _inputs(naflex: bool, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 99, (3, 64), generator=generator)
    if naflex:
        return {
            "input_ids": input_ids,
            "pixel_values": torch.rand(2, 16, 48, generator=generator, dtype=dtype) * 2 - 1,
            "pixel_attention_mask": torch.tensor([[1] * 16, [1] * 12 + [0] * 4]),
            "spatial_shapes": torch.tensor([[4, 4], [3, 4]]),
        }
    return {"input_ids": input_ids, "pixel_values": torch.rand(2, 3, 16, 16, generator=generator, dtype=dtype) * 2 - 1}


# ----------------------------------------------------------------------------- user code
def load_and_score(model_class, folder, naflex=False, **keywords):
    model = model_class.from_pretrained(folder, **keywords)
    inputs = _inputs(naflex, model.dtype)
    with torch.no_grad():
        outputs = model(**inputs)
    return model.dtype, model.device, outputs.logits_per_image


def _same(theirs, ours, dtype):
    assert ours[:2] == theirs[:2], (ours[:2], theirs[:2])  # dtype, device
    torch.testing.assert_close(ours[2], theirs[2], **tolerance(dtype))


@pytest.mark.parametrize(
    "keywords",
    [{}, {"dtype": "auto"}, {"torch_dtype": "auto"}],
    ids=["no dtype", "dtype=auto", "torch_dtype=auto"],
)
def test_bf16_checkpoint_loads_in_the_dtype_transformers_gives(bf16_checkpoint, keywords):
    theirs = load_and_score(transformers.AutoModel, bf16_checkpoint, **keywords)
    ours = load_and_score(SigLip2, bf16_checkpoint, **keywords)
    assert theirs[0] == torch.bfloat16  # transformers 5: "auto" is the default
    _same(theirs, ours, torch.bfloat16)


def test_auto_without_config_dtype_reads_the_tensors(bf16_checkpoint_without_dtype):
    theirs = load_and_score(transformers.AutoModel, bf16_checkpoint_without_dtype, dtype="auto")
    ours = load_and_score(SigLip2, bf16_checkpoint_without_dtype, dtype="auto")
    _same(theirs, ours, torch.bfloat16)


@pytest.mark.parametrize(
    ("keywords", "expected_dtype"),
    [
        ({"torch_dtype": torch.float32}, torch.float32),
        ({"dtype": "float32"}, torch.float32),
        ({"torch_dtype": torch.float64}, torch.float64),
        ({"dtype": torch.float64, "torch_dtype": torch.float16}, torch.float64),  # dtype wins, as transformers
    ],
    ids=["torch_dtype=float32", "dtype='float32'", "torch_dtype=float64", "dtype and torch_dtype"],
)
def test_explicit_dtype(siglip_checkpoint, keywords, expected_dtype):
    theirs = load_and_score(transformers.AutoModel, siglip_checkpoint, **keywords)
    ours = load_and_score(SigLip2, siglip_checkpoint, **keywords)
    assert ours[0] == expected_dtype
    if {"dtype", "torch_dtype"} <= keywords.keys() and theirs[0] != expected_dtype:
        pytest.skip(
            f"transformers {transformers.__version__} lets torch_dtype win over dtype (5.6 does); "
            "kornia_siglip2 follows the pinned 5.24, where dtype wins"
        )
    _same(theirs, ours, expected_dtype)


def test_bf16_checkpoint_upcast_to_float32(bf16_checkpoint):
    theirs = load_and_score(transformers.AutoModel, bf16_checkpoint, dtype=torch.float32)
    ours = load_and_score(SigLip2, bf16_checkpoint, dtype=torch.float32)
    _same(theirs, ours, torch.float32)


@pytest.mark.parametrize(
    "device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, "auto"], ids=["str", "device", "dict", "auto"]
)
def test_device_map(siglip2_checkpoint, device_map):
    if device_map == "auto" and torch.cuda.is_available():
        pytest.skip("compares placement on a CPU-only machine")
    theirs = load_and_score(transformers.AutoModel, siglip2_checkpoint, naflex=True, device_map=device_map)
    ours = load_and_score(SigLip2, siglip2_checkpoint, naflex=True, device_map=device_map)
    assert ours[1] == torch.device("cpu")
    _same(theirs, ours, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device_map", ["cuda", 0, "auto"])
def test_device_map_cuda(siglip_checkpoint, device_map):
    model = SigLip2.from_pretrained(siglip_checkpoint, device_map=device_map)
    reference = transformers.AutoModel.from_pretrained(siglip_checkpoint, device_map=device_map)
    assert model.device.type == reference.device.type == "cuda"


@pytest.mark.parametrize("naflex", [False, True], ids=["siglip", "siglip2"])
def test_eager_attention_weights(siglip_checkpoint, siglip2_checkpoint, naflex):
    folder = siglip2_checkpoint if naflex else siglip_checkpoint

    def user_code(model_class):
        model = model_class.from_pretrained(folder, attn_implementation="eager")
        with torch.no_grad():
            outputs = model(**_inputs(naflex), output_attentions=True)
        return outputs.text_model_output.attentions, outputs.vision_model_output.attentions

    (text_theirs, vision_theirs), (text_ours, vision_ours) = user_code(transformers.AutoModel), user_code(SigLip2)
    assert len(text_ours) == len(text_theirs) and len(vision_ours) == len(vision_theirs)
    for ours, theirs in zip(text_ours, text_theirs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    lengths = [16, 12] if naflex else [16, 16]  # padded query rows: transformers computes them, we do not
    for ours, theirs in zip(vision_ours, vision_theirs, strict=True):
        assert ours.shape == theirs.shape
        for row, length in enumerate(lengths):
            torch.testing.assert_close(ours[row, :, :length], theirs[row, :, :length], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2"])
def test_attn_implementation_maps_to_our_backends(siglip_checkpoint, implementation):
    model = SigLip2.from_pretrained(siglip_checkpoint, attn_implementation=implementation)
    backends = {module.backend for module in model.modules() if hasattr(module, "backend")}
    assert backends == {ATTN_IMPLEMENTATIONS[implementation]}
    if implementation != "flash_attention_2":  # flash needs CUDA and half precision
        theirs = load_and_score(transformers.AutoModel, siglip_checkpoint, attn_implementation=implementation)
        _same(theirs, load_and_score(SigLip2, siglip_checkpoint, attn_implementation=implementation), torch.float32)


def test_accepted_keywords_that_change_nothing(siglip_checkpoint):
    keywords = dict(low_cpu_mem_usage=True, trust_remote_code=True, use_safetensors=True, token=None, revision=None)
    theirs = load_and_score(transformers.AutoModel, siglip_checkpoint, **keywords)
    _same(theirs, load_and_score(SigLip2, siglip_checkpoint, **keywords), torch.float32)


def test_subfolder(subfolder_checkpoint):
    theirs = load_and_score(transformers.AutoModel, subfolder_checkpoint, naflex=True, subfolder="weights")
    _same(theirs, load_and_score(SigLip2, subfolder_checkpoint, naflex=True, subfolder="weights"), torch.float32)
    with pytest.raises(FileNotFoundError, match="No subfolder 'nothing'"):
        SigLip2.from_pretrained(subfolder_checkpoint, subfolder="nothing")


def test_vision_tower_keywords_as_transformers_vision_model(tmp_path, bf16_checkpoint):
    """load_vision_tower takes the same keywords as SiglipVisionModel.from_pretrained."""
    hf = transformers.SiglipVisionModel.from_pretrained(bf16_checkpoint)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    pixels = _inputs(False)["pixel_values"]
    for keywords in ({}, {"dtype": "auto"}, {"torch_dtype": torch.float32, "device_map": "cpu"}):
        theirs = transformers.SiglipVisionModel.from_pretrained(tmp_path, attn_implementation="eager", **keywords)
        ours = load_vision_tower(tmp_path, attn_implementation="eager", **keywords)
        assert ours.embeddings.position_embedding.weight.dtype == theirs.dtype
        with torch.no_grad():
            expected = theirs(pixel_values=pixels.to(theirs.dtype)).pooler_output
            actual = ours(pixels.to(theirs.dtype)).pooler_output
        torch.testing.assert_close(actual, expected, **tolerance(theirs.dtype))
    with pytest.raises(TypeError, match="not_a_keyword"):
        load_vision_tower(tmp_path, not_a_keyword=1)


def test_backend_lists_agree():
    assert set(ATTN_IMPLEMENTATIONS.values()) <= set(ATTENTION_BACKENDS)
    assert load_options(attn_implementation="grouped").attention_backend == "grouped"  # our names pass through


def test_exception(siglip_checkpoint):
    with pytest.raises(TypeError, match=r"\['output_loading_info'\]"):
        SigLip2.from_pretrained(siglip_checkpoint, output_loading_info=True)
    with pytest.raises(ValueError, match="never unpickles"):
        SigLip2.from_pretrained(siglip_checkpoint, use_safetensors=False)
    with pytest.raises(ValueError, match="several devices"):
        SigLip2.from_pretrained(siglip_checkpoint, device_map={"vision_model": "cpu", "text_model": "cuda:1"})
    with pytest.raises(ValueError, match="device_map must be"):
        SigLip2.from_pretrained(siglip_checkpoint, device_map="balanced")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        SigLip2.from_pretrained(siglip_checkpoint, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="dtype must be 'auto'"):
        SigLip2.from_pretrained(siglip_checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="either device or device_map"):
        SigLip2.from_pretrained(siglip_checkpoint, device="cpu", device_map="cpu")


def test_save_pretrained_takes_transformers_keywords_and_writes_dtype(tmp_path):
    """The same save call on transformers' model and ours; config.json says dtype bfloat16 in both."""
    hf = make_hf_siglip(seed=4).to(torch.bfloat16)
    ours = SigLip2.from_transformers(hf)
    keywords = dict(safe_serialization=True, is_main_process=True, push_to_hub=False, max_shard_size="50GB")
    for name, model in (("theirs", hf), ("ours", ours)):
        model.save_pretrained(tmp_path / name, **keywords)
        assert read_config(tmp_path / name)["dtype"] == "bfloat16", name
        model.save_pretrained(tmp_path / f"{name}_state", state_dict=model.state_dict())
        model.save_pretrained(tmp_path / f"{name}_rank1", is_main_process=False)
        assert not (tmp_path / f"{name}_rank1" / "config.json").exists(), name
    for folder in ("ours", "ours_state"):
        reloaded = transformers.AutoModel.from_pretrained(tmp_path / folder)
        assert reloaded.dtype == torch.bfloat16
        for key, tensor in hf.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], tensor), key
    with pytest.raises(ValueError, match="upload_folder"):
        ours.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(TypeError, match="not_a_keyword"):
        ours.save_pretrained(tmp_path / "typo", not_a_keyword=True)


@pytest.mark.parametrize("naflex", [False, True], ids=["siglip", "siglip2"])
def test_vision_only_model_as_transformers(naflex, tmp_path):
    """SigLip2VisionModel loads and saves what SiglipVisionModel / Siglip2VisionModel do; same outputs."""
    hf_full = make_hf_siglip2(seed=5) if naflex else make_hf_siglip(seed=5)
    hf_class = transformers.Siglip2VisionModel if naflex else transformers.SiglipVisionModel
    hf_full.save_pretrained(tmp_path / "full")
    hf_full.vision_model.save_pretrained(tmp_path / "vision")
    inputs = _inputs(naflex)
    inputs = {key: value for key, value in inputs.items() if key != "input_ids"}
    for source in ("vision", "full"):
        theirs = hf_class.from_pretrained(tmp_path / source)
        ours = SigLip2VisionModel.from_pretrained(tmp_path / source)
        assert ours.dtype == theirs.dtype and ours.device == theirs.device
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }
        with torch.no_grad():
            expected = theirs(**inputs, output_hidden_states=True)
            actual = ours(**inputs, output_hidden_states=True)
        torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-4)
        valid = inputs["pixel_attention_mask"].bool() if naflex else slice(None)
        torch.testing.assert_close(
            actual.hidden_states[-2][valid], expected.hidden_states[-2][valid], atol=1e-5, rtol=1e-4
        )
    ours.save_pretrained(tmp_path / "ours")
    config = read_config(tmp_path / "ours")
    assert config["model_type"] == ("siglip2_vision_model" if naflex else "siglip_vision_model")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "ours")
    assert type(reloaded) is hf_class
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with pytest.raises(ValueError, match="SigLip2VisionModel"):
        SigLip2.from_pretrained(tmp_path / "vision")


def test_towers_expose_dtype_device_and_accept_patch_attention_mask(siglip_checkpoint):
    """VLM code: tower.dtype / tower.device, and Idefics-style patch_attention_mask= (transformers ignores it)."""
    theirs = transformers.SiglipVisionModel.from_pretrained(siglip_checkpoint)
    ours = SigLip2VisionModel.from_pretrained(siglip_checkpoint)
    full = SigLip2.from_pretrained(siglip_checkpoint).to(torch.float64)
    for tower in (full.vision_model, full.text_model):
        assert tower.dtype == torch.float64 and tower.device == torch.device("cpu")
    pixels = _inputs(False)["pixel_values"]
    everything = torch.ones(pixels.shape[0], 4, 4, dtype=torch.bool)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels.to(theirs.dtype), patch_attention_mask=everything).pooler_output
        actual = ours(pixel_values=pixels, patch_attention_mask=everything).pooler_output
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        partial = everything.clone()
        partial[:, 2:] = False
        with pytest.warns(UserWarning, match="not applied"):
            masked = ours(pixel_values=pixels, patch_attention_mask=partial).pooler_output
        torch.testing.assert_close(
            masked, theirs(pixel_values=pixels, patch_attention_mask=partial).pooler_output, atol=1e-5, rtol=1e-4
        )
