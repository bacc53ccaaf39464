"""The Kornia patch series (scripts/kornia_pr/series) and its checker (scripts/kornia_patch.py).

The full check (the base built from the release's sdist, ``git am -3``, each PR's tests, doctests, Kornia's ruff and
ty, fullgraph dynamo, kornia#3481) is ``make kornia-prs``, which CI runs. These tests cover the patch files, the API
comparison, and the one source of truth: the series applied to the installed Kornia and kornia_siglip2 give the same
outputs and loss on the same weights and inputs, and that comparison fails when either side changes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SERIES = SCRIPTS / "kornia_pr"
LICENSE_FIRST_LINE = "# LICENSE HEADER MANAGED BY add-license-header"
KORNIA_IMPORTS = {"torch", "kornia", "__future__", "math", "warnings", "typing", "re", "dataclasses"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kornia_patch():
    return _load_script("kornia_patch")


def _patch_files(patch: Path) -> dict[str, tuple[bool, list[str]]]:
    """Each file of a ``git format-patch`` file: (whether the patch creates it, its added lines)."""
    files: dict[str, tuple[bool, list[str]]] = {}
    current, new = None, False
    for line in patch.read_text(encoding="utf-8").splitlines():
        if line.startswith("diff --git "):
            current, new = None, False
        elif line.startswith("new file mode"):
            new = True
        elif line.startswith("+++ "):
            current = line[len("+++ b/") :]
            files[current] = (new, [])
        elif current is not None and line.startswith("+"):
            files[current][1].append(line[1:])
    return files


def test_series_is_patches_over_a_recorded_release(kornia_patch):
    patches = kornia_patch.series()
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    assert json.loads((SERIES / "base.json").read_text())["kornia"] == "0.9.2"
    # no hand-kept copies of Kornia files remain next to the patches
    assert not list(SERIES.rglob("kornia/**/*.py"))
    for patch in patches:
        text = patch.read_text(encoding="utf-8")
        assert text.startswith("From 0000000000000000000000000000000000000000 "), patch.name
        files = _patch_files(patch)
        assert any(f.startswith("kornia/") for f in files), f"{patch.name} changes no kornia file"
        assert any(f.startswith("tests/") for f in files), f"{patch.name} has no tests"
        fragments = [f for f in files if f.startswith("changelog.d/")]
        assert len(fragments) == 1, (patch.name, fragments)
        assert "Behaviour change:" in text, f"{patch.name}: its commit message states no behaviour change"
        # a minimal diff of our change, not a copy: few library lines per PR
        library = sum(len(added) for path, (_, added) in files.items() if path.startswith("kornia/"))
        assert 0 < library <= 40, (patch.name, library)


@pytest.mark.parametrize("patch", sorted((SERIES / "series").glob("*.patch")), ids=lambda p: p.name[:4])
def test_patch_is_kornia_clean(patch):
    """A new file has Kornia's license header; kornia/ imports only torch, kornia and the standard library."""
    text = patch.read_text(encoding="utf-8")
    assert "REFERENCE" not in text
    for path, (new, added) in _patch_files(patch).items():
        if not path.endswith(".py"):
            continue
        if new:
            assert added[0] == LICENSE_FIRST_LINE, path
        roots = {m.group(1) for line in added for m in [re.match(r"\s*(?:from|import) (\w+)", line)] if m}
        if path.startswith("kornia/"):
            assert roots <= KORNIA_IMPORTS, (path, roots)
        assert not roots & {"kornia_siglip2", "transformers", "PIL", "safetensors", "huggingface_hub"}, (path, roots)


def _surface(**changes):
    base = {
        "kornia.models.siglip2.config": {
            "SigLip2Config": {
                "kind": "class",
                "signature": [["projection_dim", "POSITIONAL_OR_KEYWORD", "768"],
                              ["logit_scale_init_value", "POSITIONAL_OR_KEYWORD", "2.6592"]],
                "methods": {"from_name": [["model_name", "POSITIONAL_OR_KEYWORD", "<none>"]]},
                "fields": {"projection_dim": "768", "logit_scale_init_value": "2.6592"},
            }
        }
    }  # fmt: skip
    surface = json.loads(json.dumps(base))
    config = surface["kornia.models.siglip2.config"]["SigLip2Config"]
    for key, value in changes.items():
        config[key] = value
    return base, surface


def test_compare_api_accepts_additions_and_allowed_defaults(kornia_patch):
    old, new = _surface()
    config = new["kornia.models.siglip2.config"]["SigLip2Config"]
    config["signature"][1][2] = "2.302585092994046"
    config["fields"]["logit_scale_init_value"] = "2.302585092994046"
    config["signature"].append(["logit_bias_init_value", "POSITIONAL_OR_KEYWORD", "-10.0"])
    config["methods"]["from_hf"] = [["path", "POSITIONAL_OR_KEYWORD", "<none>"]]
    new["kornia.models.siglip2.packing"] = {"X": {"kind": "function", "signature": []}}
    assert kornia_patch.compare_api(old, new) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"signature": [["projection_dim", "POSITIONAL_OR_KEYWORD", "512"]]}, "default of 'projection_dim'"),
        ({"signature": [["logit_scale_init_value", "POSITIONAL_OR_KEYWORD", "2.6592"],
                        ["projection_dim", "POSITIONAL_OR_KEYWORD", "768"]]}, "moved"),
        ({"signature": [["projection_dim", "KEYWORD_ONLY", "768"],
                        ["logit_scale_init_value", "POSITIONAL_OR_KEYWORD", "2.6592"]]}, "kind"),
        ({"methods": {}}, "from_name removed"),
        ({"fields": {"projection_dim": "768"}}, "field 'logit_scale_init_value' removed"),
    ],
)  # fmt: skip
def test_compare_api_reports_breaks(kornia_patch, change, message):
    old, new = _surface(**change)
    problems = kornia_patch.compare_api(old, new, allowed={})
    assert any(message in problem for problem in problems), problems


def test_compare_api_reports_removed_names(kornia_patch):
    old, new = _surface()
    del new["kornia.models.siglip2.config"]["SigLip2Config"]
    assert kornia_patch.compare_api(old, new) == ["kornia.models.siglip2.config.SigLip2Config removed"]
    old, new = _surface()
    new["kornia.models.siglip2.config"]["SigLip2Config"]["signature"].append(["x", "POSITIONAL_OR_KEYWORD", "<none>"])
    assert kornia_patch.compare_api(old, new) == ["kornia.models.siglip2.config.SigLip2Config: new parameter 'x' "
                                                  "without a default"]  # fmt: skip


def test_probe_reads_the_installed_surface():
    done = subprocess.run([sys.executable, str(SERIES / "probe.py"), "api"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    surface = json.loads(done.stdout)
    names = set(surface["kornia.models.siglip2"])
    assert {"SigLip2Builder", "SigLip2Config", "SigLip2ImagePreprocessor", "SigLip2Model", "SigLip2Result"} <= names
    assert "SigLip2VisionConfig" in surface["kornia.models.siglip2.config"]
    assert "SigLip2Attention" in surface["kornia.models.siglip2.attention"]


def test_kornia_tests_of_touched_modules(kornia_patch, tmp_path):
    """Mode b runs Kornia's tests of the touched modules: kornia/models/siglip2/x.py -> tests/models/test_siglip2*."""
    for name in ("tests/models/test_siglip2.py", "tests/models/test_sam.py", "tests/losses/test_focal_loss.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    found = kornia_patch._kornia_tests(tmp_path, ["kornia/models/siglip2/config.py", "changelog.d/+x.fixed.md"])
    assert found == ["tests/models/test_siglip2.py"]
    assert kornia_patch._kornia_tests(tmp_path, ["kornia/losses/__init__.py"]) == ["tests/losses/test_focal_loss.py"]


# ------------------------------------------------------------------ one source of truth: Kornia + series == ours


@pytest.fixture(scope="module")
def kornia_tree(kornia_patch, tmp_path_factory):
    """The installed Kornia package with the series applied by ``git am -3`` (a git tree, offline)."""
    installed = importlib.metadata.version("kornia")
    recorded = json.loads((SERIES / "base.json").read_text())["kornia"]
    package = Path(importlib.util.find_spec("kornia").origin).parent
    tree = kornia_patch.build_base_from_package(tmp_path_factory.mktemp("kornia_series"), package)
    try:
        kornia_patch.apply_series(tree, kornia_patch.series())
    except SystemExit as error:
        if installed == recorded:
            raise AssertionError(f"the series does not apply to the installed kornia {installed}") from error
        pytest.skip(f"the series is written for kornia {recorded} and does not apply to the installed {installed}")
    return tree


def test_a_conflict_fails_the_series(kornia_patch, tmp_path):
    """``git am -3`` on a base whose lines under a patch changed: the checker stops, the tree is left clean."""
    package = Path(importlib.util.find_spec("kornia").origin).parent
    tree = kornia_patch.build_base_from_package(tmp_path, package)
    config = tree / "kornia/models/siglip2/config.py"
    config.write_text(config.read_text().replace("logit_scale_max: float = 100.0", "logit_scale_max: float = 50.0"))
    kornia_patch._git(tree, "commit", "-qam", "a base that moved the line PR 1 changes")
    kornia_patch._git(tree, "tag", "-f", "base")
    with pytest.raises(SystemExit, match="does not apply"):
        kornia_patch.apply_series(tree, kornia_patch.series()[:1])
    assert kornia_patch._git(tree, "status", "--porcelain").strip() == ""


@pytest.fixture(scope="module")
def same_width_checkpoint(tmp_path_factory) -> Path:
    """A tiny transformers ``SiglipModel`` whose towers have one width (Kornia's layout needs it), saved."""
    pytest.importorskip("transformers")
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"vocab_size": 99, "max_position_embeddings": 16, "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None}
    text.update(sizes)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config={"image_size": 16, "patch_size": 4, **sizes}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # off the initial values, so a dropped or swapped weight shows
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.logit_scale.fill_(4.8)  # exp(4.8) = 121.5: above Kornia 0.9.2's clamp at 100, below the new bound
        model.logit_bias.fill_(-12.0)
    folder = tmp_path_factory.mktemp("siglip_same_width")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(2)
    data = {
        "pixel_values": torch.rand(3, 3, 16, 16, generator=generator, dtype=torch.float64) * 2 - 1,
        "input_ids": torch.randint(2, 99, (3, 16), generator=generator),
        # a high-frequency pattern in [0, 255], where a Gaussian pre-blur and PIL's filter differ
        "images": (torch.arange(2 * 3 * 37 * 45) * 37 % 256).reshape(2, 3, 37, 45).double(),
    }
    path = tmp_path_factory.mktemp("inputs") / "inputs.pt"
    torch.save(data, path)
    return path


def _kornia_outputs(tree: Path, checkpoint: Path, inputs: Path, out: Path) -> dict[str, torch.Tensor]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    command = [sys.executable, str(SERIES / "probe.py"), "siglip", str(checkpoint), str(inputs), str(out)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out)


def _our_outputs(checkpoint: Path, inputs: Path) -> dict[str, torch.Tensor]:
    from kornia_siglip2 import SigLip2
    from kornia_siglip2.preprocess import SigLipImagePreprocessor

    data = torch.load(inputs)
    model = SigLip2.from_pretrained(checkpoint).double().eval()
    with torch.no_grad():
        result = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"], return_loss=True)
        size = tuple(data["pixel_values"].shape[-2:])
        preprocessed = {
            mode: SigLipImagePreprocessor(image_size=size, resample=mode).double()(data["images"] / 255)
            for mode in ("bilinear", "bicubic")
        }
    return {
        "logits_per_image": result.logits_per_image,
        "image_embeds": result.image_embeds,
        "text_embeds": result.text_embeds,
        "logit_scale": model.logit_scale.exp(),
        "loss": result.loss,
        **{f"preprocessed_{mode}": value for mode, value in preprocessed.items()},
    }


def _assert_same(kornia: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """float64 on both sides: equal up to summation order (the preprocessors run the same antialiased kernel)."""
    assert sorted(kornia) == sorted(ours)
    for name, theirs in kornia.items():
        mine = ours[name].to(theirs.dtype).reshape(theirs.shape)  # a scalar scale is () in Kornia, (1,) here
        torch.testing.assert_close(theirs, mine, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_kornia_with_the_series_equals_kornia_siglip2(kornia_tree, same_width_checkpoint, inputs, tmp_path):
    """Logits, embeddings, scale, loss and preprocessing agree to 1e-10 in float64 on the same weights and inputs.

    The checkpoint's scale exp(4.8) = 121.5 is above Kornia 0.9.2's clamp at 100 (PR 1), and the preprocessors
    resize a high-frequency pattern (PR 3): without the series the two sides differ.
    """
    kornia = _kornia_outputs(kornia_tree, same_width_checkpoint, inputs, tmp_path / "kornia.pt")
    ours = _our_outputs(same_width_checkpoint, inputs)
    _assert_same(kornia, ours)
    assert float(kornia["logit_scale"]) == pytest.approx(121.51041751873485)


def test_equivalence_fails_when_kornia_siglip2_changes(
    kornia_tree, same_width_checkpoint, inputs, tmp_path, monkeypatch
):
    import kornia_siglip2.model
    import kornia_siglip2.preprocess

    kornia = _kornia_outputs(kornia_tree, same_width_checkpoint, inputs, tmp_path / "kornia.pt")
    loss = kornia_siglip2.model._pairwise_sigmoid_loss
    with monkeypatch.context() as patch:
        patch.setattr(kornia_siglip2.model, "_pairwise_sigmoid_loss", lambda logits: loss(logits) * (1 + 1e-8))
        with pytest.raises(AssertionError, match="loss"):
            _assert_same(kornia, _our_outputs(same_width_checkpoint, inputs))
    interpolate = kornia_siglip2.preprocess._interpolate
    with monkeypatch.context() as patch:
        patch.setattr(kornia_siglip2.preprocess, "_interpolate", lambda i, s, k: interpolate(i, s, k) + 1e-8)
        with pytest.raises(AssertionError, match="preprocessed"):
            _assert_same(kornia, _our_outputs(same_width_checkpoint, inputs))
    _assert_same(kornia, _our_outputs(same_width_checkpoint, inputs))  # and undone, they agree again


def test_equivalence_fails_when_kornia_changes(kornia_patch, kornia_tree, same_width_checkpoint, inputs, tmp_path):
    ours = _our_outputs(same_width_checkpoint, inputs)
    model = kornia_tree / "kornia/models/siglip2/model.py"
    text = model.read_text()
    assert "self.logit_scale.clamp(min=0.0, max=self.logit_scale_max_log).exp()" in text
    try:
        # the series undone in one place: Kornia 0.9.2's clamp at 100
        model.write_text(text.replace("max=self.logit_scale_max_log", "max=math.log(100.0)"))
        with pytest.raises(AssertionError, match="logits_per_image"):
            _assert_same(_kornia_outputs(kornia_tree, same_width_checkpoint, inputs, tmp_path / "k.pt"), ours)
    finally:
        model.write_text(text)
    _assert_same(_kornia_outputs(kornia_tree, same_width_checkpoint, inputs, tmp_path / "k2.pt"), ours)


def test_kornia_compare_runs(tmp_path, monkeypatch):
    """The measurements of docs/upstreaming.md still run; our column stays within tolerance."""
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    compare = _load_script("kornia_compare")
    rows = compare.compare(workdir=tmp_path)
    assert len(rows) >= 10
    bad = [f"{row.check}: {row.ours}" for row in rows if not row.ours_ok]
    assert not bad, bad
