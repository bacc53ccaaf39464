"""Render and check the Kornia PR series of kornia_siglip2 (``make kornia-patch PR=N``, ``make kornia-prs``).

Each PR is a folder ``scripts/kornia_pr/prN/`` laid out as a Kornia checkout (``kornia/...``, ``tests/...``,
``docs/source/...``): the files it adds or changes, whole. Rendering PR ``N`` copies the installed Kornia package
(the 0.9.0 wheel) into ``build/kornia_pr/prN/kornia``, applies PRs ``1..N`` on top of it in order, adds the small test
harness of ``scripts/kornia_pr/harness`` (a ``testing/base.py`` and ``conftest.py`` compatible with Kornia's, which the
wheel does not ship, and Kornia's ``[tool.ty]`` settings), and writes ``prN.diff``: the unified diff of PR ``N``
against the tree after PR ``N - 1`` (against 0.9.0 for PR 1), which is what a maintainer would review.

The renderer reads only the installed Kornia package and the PR folders: it does not import kornia_siglip2.

``--check`` then proves, in subprocesses that import the rendered copy:

1. ``api``: every public name of 0.9.0's ``kornia.models.siglip2`` (each module's ``__all__`` or public definitions)
   still exists with the same kind, and every parameter, method and dataclass field keeps its name, order, kind and
   default; new parameters come after the old ones with defaults. ``ALLOWED_DEFAULT_CHANGES`` lists the defaults a PR
   changes on purpose, with the reason;
2. ``runtime``: every ``kornia.models.*`` module imports, a tiny PaliGemma and SigLip2 forward run, and
   ``import kornia`` imports none of safetensors, huggingface_hub, transformers, PIL (``probe.py runtime``);
3. ``pytest``: the rendered tests of PRs ``1..N`` in float32 and float64, dynamo tests included
   (``KORNIA_TEST_OPTIMIZER``), without transformers (it is blocked from import);
4. ``doctest``: the docstring examples of every rendered ``kornia`` file;
5. ``ruff``: ``ruff check`` and ``ruff format --check`` with Kornia's rules (``scripts/kornia_ruff.toml``) and the
   ruff version Kornia's pre-commit pins, on the rendered files;
6. ``ty``: ``ty check kornia`` with the ty version Kornia's ``pixi.toml`` pins and Kornia's ``[tool.ty]`` settings
   passes with no diagnostic (as it does on 0.9.0 itself).

Usage::

    python scripts/kornia_patch.py --pr 2 [--out build/kornia_pr] [--check] [--tools build/kornia_tools]
    python scripts/kornia_patch.py --all --check
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALLOWED_DEFAULT_CHANGES",
    "SERIES",
    "CheckResult",
    "compare_api",
    "installed_kornia",
    "main",
    "pr_files",
    "render",
    "run_checks",
]

SCRIPTS = Path(__file__).resolve().parent
SERIES_DIR = SCRIPTS / "kornia_pr"
HARNESS = SERIES_DIR / "harness"
RUFF_CONFIG = SCRIPTS / "kornia_ruff.toml"

#: PR number -> title. Each has its folder ``scripts/kornia_pr/pr<N>``.
SERIES = {
    1: "siglip2: parity fixes (no logit-scale clamp, paper initialisation, PIL-filter resize, NaFlex checkpoints)",
    2: "siglip2: packed variable-length attention for padded vision batches (internal)",
    3: "losses: SigmoidLoss (SigLIP pairwise sigmoid loss) in kornia.losses",
    4: "losses: the SigLIP 2 objective (self-distillation cross-entropy, teacher center, loss schedule)",
}

#: (class or function name, parameter or field) -> why its default changes, wherever the name is exported and in every
#: signature that has the parameter (a dataclass's class signature, its ``__init__`` and its field). Everything else
#: keeps its default.
ALLOWED_DEFAULT_CHANGES = {
    ("SigLip2Config", "logit_scale_init_value"): (
        "2.6592 (CLIP's log(1/0.07)) -> log(10), the SigLIP paper's initialisation (section 3.2)"
    ),
}

#: Kornia's tools, pinned as Kornia pins them (main b4f5a78): ruff in .pre-commit-config.yaml, ty in pixi.toml.
TOOL_PINS = {"ruff": "0.16.1", "ty": "0.0.9"}


@dataclass
class CheckResult:
    """One check of one rendered PR."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""
    data: dict = field(default_factory=dict)


def installed_kornia() -> Path:
    """The folder of the kornia package this Python imports."""
    spec = importlib.util.find_spec("kornia")
    if spec is None or spec.origin is None:
        raise SystemExit("kornia is not installed in this Python: pip install kornia==0.9.0")
    return Path(spec.origin).parent


def pr_files(pr: int) -> list[Path]:
    """The files of PR ``pr``, relative to a Kornia checkout."""
    folder = SERIES_DIR / f"pr{pr}"
    if not folder.is_dir():
        raise SystemExit(f"no PR {pr}: {folder} does not exist (the series is {sorted(SERIES)})")
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []


def render(pr: int, out: Path) -> Path:
    """Render PRs ``1..pr`` onto a copy of the installed Kornia; return the tree (``out/pr<N>``)."""
    dest = out.resolve() / f"pr{pr}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(installed_kornia(), dest / "kornia", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(HARNESS, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    diff: list[str] = []
    stats: list[dict] = []
    for number in range(1, pr + 1):
        for relative in pr_files(number):
            target = dest / relative
            before = _read(target)
            after = _read(SERIES_DIR / f"pr{number}" / relative)
            if number == pr:
                lines = list(difflib.unified_diff(before, after, f"a/{relative}", f"b/{relative}"))
                diff += lines
                added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
                removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
                stats.append({"file": str(relative), "added": added, "removed": removed, "new": not before})
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SERIES_DIR / f"pr{number}" / relative, target)
    (dest / f"pr{pr}.diff").write_text("".join(diff), encoding="utf-8")
    (dest / "PR.json").write_text(json.dumps({"pr": pr, "title": SERIES[pr], "files": stats}, indent=1))
    return dest


def _compare_signature(where: str, old: list | None, new: list | None, allowed: dict, owner: str) -> list[str]:
    if old is None:
        return []
    if new is None:
        return [f"{where}: signature no longer readable"]
    problems = []
    new_by_position = {param[0]: (i, param) for i, param in enumerate(new)}
    last = -1
    for name, kind, default in old:
        if name not in new_by_position:
            problems.append(f"{where}: parameter {name!r} removed")
            continue
        index, (_, new_kind, new_default) = new_by_position[name]
        if index < last:
            problems.append(f"{where}: parameter {name!r} moved")
        last = index
        if new_kind != kind:
            problems.append(f"{where}: parameter {name!r} kind {kind} -> {new_kind}")
        if new_default != default and (owner, name) not in allowed:
            problems.append(f"{where}: default of {name!r} {default} -> {new_default}")
    old_names = {param[0] for param in old}
    for name, kind, default in new:
        if name not in old_names and default == "<none>" and kind not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            problems.append(f"{where}: new parameter {name!r} without a default")
    return problems


def compare_api(old: dict, new: dict, allowed: dict | None = None) -> list[str]:
    """Every way ``new`` (``probe.py api`` output) breaks the public surface ``old``; empty if none."""
    allowed = ALLOWED_DEFAULT_CHANGES if allowed is None else allowed
    problems = []
    for module, names in old.items():
        if module not in new:
            problems.append(f"module {module} removed")
            continue
        for name, description in names.items():
            where = f"{module}.{name}"
            current = new[module].get(name)
            if current is None:
                problems.append(f"{where} removed")
                continue
            if current["kind"] != description["kind"]:
                problems.append(f"{where}: {description['kind']} -> {current['kind']}")
                continue
            problems += _compare_signature(where, description.get("signature"), current.get("signature"), allowed, name)
            for method, signature in description.get("methods", {}).items():
                if method not in current.get("methods", {}):
                    problems.append(f"{where}.{method} removed")
                    continue
                problems += _compare_signature(
                    f"{where}.{method}", signature, current["methods"][method], allowed, name
                )
            for field_name, default in description.get("fields", {}).items():
                new_default = current.get("fields", {}).get(field_name)
                if new_default is None:
                    problems.append(f"{where}: field {field_name!r} removed")
                elif new_default != default and (name, field_name) not in allowed:
                    problems.append(f"{where}: default of field {field_name!r} {default} -> {new_default}")
    return problems


def _env(dest: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if dest is not None:
        env["PYTHONPATH"] = str(dest)
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def _tool(tools: Path, name: str) -> list[str]:
    """The pinned tool ``name`` installed in ``tools`` (``pip install --target tools ruff==... ty==...``)."""
    binary = tools / "bin" / name
    if not binary.is_file():
        raise SystemExit(
            f"{name} is not in {tools}: python -m pip install --target {tools} "
            + " ".join(f"{tool}=={version}" for tool, version in TOOL_PINS.items())
        )
    return [str(binary)]


def _tool_version(tools: Path, name: str) -> str:
    code, out, _ = _run([*_tool(tools, name), "--version"], Path.cwd(), _env(None))
    return out.strip() if code == 0 else f"unknown ({out.strip()[:80]})"


def run_checks(pr: int, dest: Path, tools: Path) -> list[CheckResult]:
    """Run every check of the module docstring on the rendered tree ``dest`` of PR ``pr``."""
    results = []
    probe = str(SERIES_DIR / "probe.py")
    rendered = sorted({str(f) for number in range(1, pr + 1) for f in pr_files(number)})
    python_files = [f for f in rendered if f.endswith(".py")]
    kornia_files = [f for f in python_files if f.startswith("kornia/")]
    test_files = [f for f in python_files if f.startswith("tests/")]

    code, out, seconds = _run([sys.executable, probe, "api"], dest, _env(None))
    if code != 0:
        raise SystemExit(f"probe api on the installed kornia failed:\n{out}")
    old = json.loads(out)
    code, out, more = _run([sys.executable, probe, "api"], dest, _env(dest))
    problems = compare_api(old, json.loads(out)) if code == 0 else [out[-2000:]]
    names = sum(len(names) for names in old.values())
    results.append(CheckResult("api", not problems, seconds + more, "\n".join(problems), {"public_names": names}))

    code, out, seconds = _run([sys.executable, probe, "runtime"], dest, _env(dest))
    try:
        report = json.loads(out[out.index("{") :])
    except ValueError:
        report = {"failures": [out[-2000:]]}
    detail = "\n".join(report.get("failures", []))
    if not report.get("kornia_file", "").startswith(str(dest)):
        code, detail = 1, f"imported kornia from {report.get('kornia_file')}, not from {dest}\n{detail}"
    results.append(CheckResult("runtime", code == 0, seconds, detail, report))

    # transformers must not be needed: a finder that refuses it makes any import of it fail the tests
    blocker = dest / "_block_transformers"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'PIL'):\n"
        "            raise ImportError(f'{name} is blocked in the rendered tests')\n\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = _env(dest)
    env["PYTHONPATH"] = f"{blocker}{os.pathsep}{dest}"
    env.pop("KORNIA_TEST_OPTIMIZER", None)  # Kornia's conftest then deselects the dynamo tests
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    code, out, seconds = _run([*pytest, "--dtype", "float32,float64", *test_files], dest, env)
    summaries = [f"float32,float64: {out.strip().splitlines()[-1] if out.strip() else ''}"]
    failed_output = out[-3000:] if code else ""
    # the dynamo tests compile with inductor, Kornia's default backend; in float32 only unless told otherwise, since
    # each compile takes tens of seconds on 2 cores
    env["KORNIA_TEST_OPTIMIZER"] = os.environ.get("KORNIA_TEST_OPTIMIZER", "inductor")
    dynamo_dtypes = os.environ.get("KORNIA_PR_DYNAMO_DTYPES", "float32")
    code2, out2, seconds2 = _run([*pytest, "--dtype", dynamo_dtypes, "-k", "dynamo", *test_files], dest, env)
    summaries.append(
        f"dynamo ({env['KORNIA_TEST_OPTIMIZER']}, {dynamo_dtypes}): "
        + (out2.strip().splitlines()[-1] if out2.strip() else "")
    )
    failed_output += out2[-3000:] if code2 else ""
    results.append(
        CheckResult(
            "pytest",
            code == 0 and code2 == 0,
            seconds + seconds2,
            failed_output or "; ".join(summaries),
            {"summary": summaries},
        )
    )

    command = [sys.executable, "-m", "pytest", "-q", "--doctest-modules", "-p", "no:cacheprovider", *kornia_files]
    code, out, seconds = _run(command, dest, _env(dest))
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    results.append(CheckResult("doctest", code == 0, seconds, out[-3000:] if code else summary, {"summary": summary}))

    ruff = _tool(tools, "ruff")
    config = ["--config", str(RUFF_CONFIG), "--no-cache"]
    code, out, seconds = _run([*ruff, "check", *config, *python_files], dest, _env(None))
    code2, out2, seconds2 = _run([*ruff, "format", "--check", *config, *python_files], dest, _env(None))
    results.append(
        CheckResult(
            "ruff",
            code == 0 and code2 == 0,
            seconds + seconds2,
            (out + out2).strip()[-3000:],
            {"version": _tool_version(tools, "ruff"), "files": len(python_files)},
        )
    )

    # Kornia's CI command on the whole rendered package, with Kornia's [tool.ty] settings (pyproject.toml of the tree);
    # Kornia 0.9.0 itself gives no diagnostic under them, so any diagnostic fails
    command = [*_tool(tools, "ty"), "check", "--python", sys.prefix, "--output-format", "concise", "kornia"]
    code, out, seconds = _run(command, dest, _env(None))
    diagnostics = [line for line in out.splitlines() if re.match(r"^\S+\.py:\d+:\d+: ", line)]
    ours = [line for line in diagnostics if line.split(":")[0] in kornia_files]
    results.append(
        CheckResult(
            "ty",
            code == 0 and not diagnostics,
            seconds,
            "\n".join(diagnostics) or (out.strip()[-2000:] if code else ""),
            {"version": _tool_version(tools, "ty"), "diagnostics_total": len(diagnostics), "in_rendered": len(ours)},
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: render one PR (``--pr N``) or the whole series (``--all``), optionally checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pr", type=int, choices=sorted(SERIES))
    which.add_argument("--all", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("build/kornia_pr"))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--tools", type=Path, default=Path("build/kornia_tools"))
    args = parser.parse_args(argv)
    failed = False
    for pr in sorted(SERIES) if args.all else [args.pr]:
        dest = render(pr, args.out)
        stats = json.loads((dest / "PR.json").read_text())["files"]
        added, removed = sum(s["added"] for s in stats), sum(s["removed"] for s in stats)
        print(f"PR {pr}: {SERIES[pr]}\n  {dest}: {len(stats)} files, +{added} -{removed} ({dest / f'pr{pr}.diff'})")
        if not args.check:
            continue
        results = run_checks(pr, dest, args.tools.resolve())
        (dest / "checks.json").write_text(json.dumps([vars(r) for r in results], indent=1, default=str))
        for result in results:
            line = result.detail.splitlines()[-1] if result.ok and result.detail else ""
            print(f"  {'ok  ' if result.ok else 'FAIL'} {result.name:8s} {result.seconds:6.1f} s  {line}")
            if not result.ok:
                failed = True
                print("    " + result.detail.replace("\n", "\n    "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
