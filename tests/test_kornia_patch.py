"""scripts/kornia_patch.py renders the Kornia PR series (scripts/kornia_pr/prN) and checks it against Kornia 0.9.0.

The full check (Kornia's ruff and ty versions, the rendered tests, doctests, API and import probes) is
``make kornia-prs``, which CI runs; these tests cover the renderer, the API comparison and the PR files themselves, and
keep scripts/kornia_compare.py (the measurements of docs/upstreaming.md) working: only the kornia_siglip2 column is
asserted, Kornia's numbers are reported, not pinned.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SERIES = SCRIPTS / "kornia_pr"
LICENSE_FIRST_LINE = "# LICENSE HEADER MANAGED BY add-license-header"
NOT_IN_KORNIA = ("safetensors", "huggingface_hub", "transformers", "PIL", "kornia_siglip2", "numpy")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kornia_patch():
    return _load_script("kornia_patch")


def _pr_python_files() -> list[Path]:
    return sorted(p for p in SERIES.glob("pr*/**/*.py") if "__pycache__" not in p.parts)


def test_series_folders_match_the_series(kornia_patch):
    assert sorted(int(p.name[2:]) for p in SERIES.glob("pr*") if p.is_dir()) == sorted(kornia_patch.SERIES)
    for pr in kornia_patch.SERIES:
        files = kornia_patch.pr_files(pr)
        assert any(str(f).startswith("tests/") for f in files), f"PR {pr} has no tests"
        assert any(str(f).startswith("kornia/") for f in files), f"PR {pr} changes no kornia file"


@pytest.mark.parametrize("path", _pr_python_files(), ids=lambda p: str(p.relative_to(SERIES)))
def test_pr_file_is_kornia_clean(path):
    """Kornia's license header, no private citations, and only torch / kornia / the standard library in kornia/."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(LICENSE_FIRST_LINE)
    assert "REFERENCE" not in text
    relative = path.relative_to(SERIES).parts[1:]
    roots = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & set(NOT_IN_KORNIA), (relative, roots)
    if relative[0] == "kornia":
        assert roots <= {"torch", "kornia", "__future__", "math", "warnings", "itertools", "typing", "re",
                         "dataclasses", "logging"}, roots  # fmt: skip


def test_render_applies_the_series_cumulatively(tmp_path, kornia_patch):
    dest = kornia_patch.render(2, tmp_path)
    installed = kornia_patch.installed_kornia()
    # PR 1's and PR 2's files are in place, the rest of the package is 0.9.0's
    for pr in (1, 2):
        for relative in kornia_patch.pr_files(pr):
            if pr == 1 and relative in kornia_patch.pr_files(2):
                continue
            assert (dest / relative).read_bytes() == (SERIES / f"pr{pr}" / relative).read_bytes()
    assert (dest / "kornia/models/paligemma/modeling_paligemma.py").read_bytes() == (
        installed / "models/paligemma/modeling_paligemma.py"
    ).read_bytes()
    assert not (dest / "kornia/losses/sigmoid.py").exists()  # PR 3 is not applied
    assert (dest / "testing/base.py").is_file() and (dest / "conftest.py").is_file()
    # the diff is PR 2 alone, against the tree after PR 1
    diff = (dest / "pr2.diff").read_text()
    assert "+++ b/kornia/models/siglip2/attention.py" in diff
    assert "config.py" not in diff
    stats = json.loads((dest / "PR.json").read_text())
    assert {s["file"] for s in stats["files"]} == {str(f) for f in kornia_patch.pr_files(2)}


def test_rendered_tree_imports_the_copy(tmp_path, kornia_patch):
    dest = kornia_patch.render(1, tmp_path)
    code = "import kornia.models.siglip2.builder as b; print(b.__file__); print(hasattr(b, '_convert_hf_state_dict'))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=dest, env=kornia_patch._env(dest), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    path, has = done.stdout.split()
    assert Path(path).is_relative_to(dest) and has == "True"


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


def test_later_prs_keep_earlier_changes(kornia_patch):
    """A PR that carries a file an earlier PR changed keeps every line the earlier PR added (imports aside).

    Each PR folder holds whole files, so a stale copy would silently revert the earlier PR.
    """
    installed = kornia_patch.installed_kornia().parent
    for later in kornia_patch.SERIES:
        for relative in kornia_patch.pr_files(later):
            for earlier in range(1, later):
                earlier_file = SERIES / f"pr{earlier}" / relative
                if not earlier_file.is_file():
                    continue
                base = installed / relative
                before = set(base.read_text().splitlines()) if base.is_file() else set()
                added = {line for line in earlier_file.read_text().splitlines() if line not in before}
                kept = set((SERIES / f"pr{later}" / relative).read_text().splitlines())
                lost = {line for line in added - kept if not line.lstrip().startswith(("from ", "import "))}
                assert not lost, (later, earlier, str(relative), sorted(lost)[:5])
