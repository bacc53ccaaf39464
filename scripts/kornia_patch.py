"""Build a Kornia base, apply kornia_siglip2's patch series with ``git am -3`` and check every PR on it.

The series is ``scripts/kornia_pr/series/000N-*.patch`` (``git format-patch`` output, one commit per PR) over the
base recorded in ``scripts/kornia_pr/base.json`` (a Kornia release). Two ways to build the base:

a. **From the release** (CI, anyone; needs only PyPI): ``pip download kornia==VERSION --no-binary :all:`` (the sdist:
   the ``kornia/`` package, ``pyproject.toml`` with Kornia's ruff, ty and pytest settings, ``changelog.d/``) is
   unpacked into a fresh git repository with this repository's small test harness (``scripts/kornia_pr/harness``:
   a ``testing/base.py`` and ``conftest.py`` written for these checks, with the interface of Kornia's, which the
   release does not ship) and committed: that commit is the base.
b. **Inside Kornia's tree** (``--kornia-repo PATH``, a clone of github.com/kornia/kornia): a clone of it with its
   ``kornia/`` package replaced by the release's, committed. Kornia's own tests of the modules a PR touches then
   run on the base and on every PR; a test that fails on the base is the baseline, any other failure fails.

For each PR on top of the previous ones (``build/kornia_pr/tree`` holds the result, one commit per PR):

``apply``: ``git am -3``; any conflict fails. ``changelog``: the PR adds one ``changelog.d`` fragment of a known type.
``api``: every public name of ``kornia.models.siglip2`` keeps its kind, parameters and defaults (the defaults a PR
moves on purpose are ``ALLOWED_DEFAULT_CHANGES``). ``runtime``: every ``kornia.models`` module imports, a tiny
forward with the loss, ``import kornia`` imports no optional library. ``tests``: the series' tests so far (mode a), and
Kornia's tests of the touched modules against the base's failures (mode b), in float32 and float64. ``doctest``: the
touched ``kornia/`` files. ``ruff``, ``ty``: Kornia's pinned versions (``scripts/kornia_pr/tools.txt``) with the tree's
settings; ``ty`` may report nothing the base does not. ``fullgraph``: ``torch.compile(fullgraph=True)`` of the vision
model without and with a patch mask. ``issue3481``: kornia#3481's reproduction gives finite logits and loss.
``docs``: every page the series adds under ``docs/`` is in a toctree.

Usage::

    python scripts/kornia_patch.py check                          # mode a, the recorded release
    python scripts/kornia_patch.py check --kornia latest          # mode a, the newest release on PyPI
    python scripts/kornia_patch.py check --kornia-repo ../kornia  # mode b
    python scripts/kornia_patch.py rebase --kornia 0.9.3          # apply onto a new release, rewrite the patches
    python scripts/kornia_patch.py export                         # rewrite the patches from build/kornia_pr/tree
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALLOWED_DEFAULT_CHANGES",
    "CheckResult",
    "apply_series",
    "build_base",
    "build_base_from_package",
    "compare_api",
    "fetch_release",
    "main",
    "series",
]

SCRIPTS = Path(__file__).resolve().parent
SERIES_DIR = SCRIPTS / "kornia_pr"
PATCHES = SERIES_DIR / "series"
HARNESS = SERIES_DIR / "harness"
BASE_RECORD = SERIES_DIR / "base.json"
PROBE = SERIES_DIR / "probe.py"

#: (class or function name, parameter or field) -> why a PR moves its default on purpose.
ALLOWED_DEFAULT_CHANGES = {
    ("SigLip2Config", "logit_scale_max"): "100 -> 1e4: a learned scale above 100 is used as learned (PR 1)",
    ("SigLip2Config", "logit_scale_init_value"): "2.6592 -> log(10), the SigLIP paper's initialisation (PR 2)",
}

#: Kornia's tools, pinned as Kornia pins them: ruff in .pre-commit-config.yaml, ty in pixi.toml.
TOOL_PINS = {"ruff": "0.16.1", "ty": "0.0.9"}
CHANGELOG_TYPES = ("added", "fixed", "breaking")
IDENTITY = ["-c", "user.name=kornia_siglip2 checker", "-c", "user.email=checker@kornia-siglip2.invalid"]


@dataclass
class CheckResult:
    """One check of one PR."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""
    data: dict = field(default_factory=dict)


def series() -> list[Path]:
    """The patch files, in order."""
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def _git(tree: Path, *args: str) -> str:
    code, out, _ = _run(["git", *IDENTITY, *args], tree)
    if code != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {tree}:\n{out}")
    return out


def _env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.pop("KORNIA_TEST_OPTIMIZER", None)  # Kornia's conftest then deselects its dynamo tests (see `fullgraph`)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def fetch_release(version: str, cache: Path) -> tuple[str, Path]:
    """The sdist of Kornia ``version`` (``latest``: the newest on PyPI) in ``cache``: (version, path)."""
    cache.mkdir(parents=True, exist_ok=True)
    if version != "latest":
        found = sorted(cache.glob(f"kornia-{version}.tar.gz"))
        if found:
            return version, found[0]
    spec = "kornia" if version == "latest" else f"kornia=={version}"
    target = cache / "download"
    shutil.rmtree(target, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    code, out, _ = _run([*command, "--dest", str(target), spec], cache)
    sdists = sorted(target.glob("kornia-*.tar.gz"))
    if code != 0 or not sdists:
        raise SystemExit(f"could not download the {spec} sdist from PyPI:\n{out}")
    resolved = sdists[0].name[len("kornia-") : -len(".tar.gz")]
    path = cache / sdists[0].name
    shutil.move(sdists[0], path)
    return resolved, path


def _unpack_sdist(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0]
        members = [m for m in archive.getmembers() if m.name.startswith(prefix + "/") and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix) + 1 :]
        archive.extractall(dest, members=[m for m in members if m.name], filter="data")


def build_base(out: Path, version: str, sdist: Path, kornia_repo: Path | None = None) -> Path:
    """A git tree of the base (see the module docstring, modes a and b); return its path (``out/tree``)."""
    tree = out.resolve() / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    release = out.resolve() / "release"
    shutil.rmtree(release, ignore_errors=True)
    _unpack_sdist(sdist, release)
    if kornia_repo is None:
        shutil.copytree(release, tree)
        shutil.copytree(HARNESS, tree, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        _git(tree, "init", "-q")
        message = f"base: kornia {version} (sdist from PyPI) and kornia_siglip2's test harness"
    else:
        _git(out, "clone", "-q", "--no-hardlinks", str(kornia_repo.resolve()), str(tree))
        head = _git(tree, "log", "-1", "--format=%h %cs %s").strip()
        shutil.rmtree(tree / "kornia")
        shutil.copytree(release / "kornia", tree / "kornia")
        message = f"base: kornia/ of the kornia {version} release on {head}"
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "--no-verify", "-m", message)
    _git(tree, "tag", "-f", "base")
    return tree


def build_base_from_package(out: Path, package: Path) -> Path:
    """A base tree of an installed ``kornia`` package folder and the harness (offline: ``tests/test_kornia_patch.py``).

    Without the sdist's ``pyproject.toml`` there are no ruff or ty settings: enough to apply the series and import it.
    """
    tree = out.resolve() / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(package, tree / "kornia", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(HARNESS, tree, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "--no-verify", "-m", f"base: the kornia package of {package}")
    _git(tree, "tag", "-f", "base")
    return tree


def apply_series(tree: Path, patches: list[Path]) -> list[str]:
    """``git am -3`` every patch in order; return the commit of each. A conflict aborts and raises."""
    commits = []
    for patch in patches:
        code, out, _ = _run(["git", *IDENTITY, "am", "-3", "--keep-cr", str(patch)], tree)
        if code != 0:
            _run(["git", "am", "--abort"], tree)
            raise SystemExit(f"{patch.name} does not apply to {tree} with git am -3:\n{out}")
        commits.append(_git(tree, "rev-parse", "HEAD").strip())
    return commits


def _changed(tree: Path, commit: str) -> list[tuple[str, str]]:
    out = _git(tree, "diff-tree", "--no-commit-id", "--name-status", "-r", commit)
    return [(line.split("\t")[0], line.split("\t")[-1]) for line in out.splitlines() if line.strip()]


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


def _tool(tools: Path, name: str) -> list[str]:
    binary = tools / "bin" / name
    if not binary.is_file():
        pins = " ".join(f"{tool}=={version}" for tool, version in TOOL_PINS.items())
        raise SystemExit(f"{name} is not in {tools}: python -m pip install --target {tools} {pins}")
    return [str(binary)]


def _kornia_tests(tree: Path, changed: list[str]) -> list[str]:
    """Kornia's test files of the modules ``changed`` touches (``kornia/a/b/...`` -> ``tests/a/test_b*.py``, ...)."""
    tests: set[str] = set()
    for path in changed:
        parts = Path(path).parts
        if parts[0] != "kornia" or not path.endswith(".py") or len(parts) < 3:
            continue
        folder, stem = Path("tests", *parts[1:-2]) if len(parts) > 3 else Path("tests"), parts[-2]
        if len(parts) == 3:
            folder, stem = Path("tests", parts[1]), Path(parts[2]).stem
            if stem == "__init__":
                tests |= {str(p.relative_to(tree)) for p in (tree / folder).glob("test_*.py")}
                continue
        tests |= {str(p.relative_to(tree)) for p in (tree / folder).glob(f"test_{stem}*.py")}
        if (tree / folder / stem).is_dir():
            tests |= {str(p.relative_to(tree)) for p in (tree / folder / stem).rglob("test_*.py")}
    return sorted(tests)


def _pytest(tree: Path, files: list[str], dtypes: str, log: Path) -> tuple[set[str], set[str], str, float]:
    """Run ``files`` in ``tree``: (passed, failed node ids, summary line, seconds); the output goes to ``log``."""
    if not files:
        return set(), set(), "no tests", 0.0
    report = log.with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", "--dtype", dtypes]
    code, out, seconds = _run([*command, f"--junitxml={report}", *files], tree, _env(tree))
    log.write_text(out)
    passed, failed = set(), set()
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            node = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(node)
            elif case.find("skipped") is None:
                passed.add(node)
    if code not in (0, 1) and not failed:
        failed.add(f"pytest exit status {code}")
    lines = [line.strip("= ") for line in out.strip().splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return passed, failed, (lines[-1] if lines else out.strip()[-300:]), seconds


def _probe(tree: Path, command: str) -> tuple[int, dict, float]:
    code, out, seconds = _run([sys.executable, str(PROBE), command], tree, _env(tree))
    try:
        return code, json.loads(out[out.index("{") :]), seconds
    except ValueError:
        return code or 1, {"failures": [out[-2000:]]}, seconds


def _ty(tree: Path, tools: Path) -> tuple[set[str], float]:
    command = [*_tool(tools, "ty"), "check", "--python", sys.prefix, "--output-format", "concise", "kornia"]
    _, out, seconds = _run(command, tree, _env(None))
    # a diagnostic without its line number, so that a line moved by a patch is the same diagnostic
    lines = [line for line in out.splitlines() if re.match(r"^\S+\.py:\d+:\d+: ", line)]
    return {re.sub(r":\d+:\d+:", ":", line) for line in lines}, seconds


def _toctree_entries(tree: Path) -> set[str]:
    entries = set()
    for page in (tree / "docs").rglob("*.rst") if (tree / "docs").is_dir() else []:
        inside = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith(".. toctree::"):
                inside = True
            elif inside and line.strip() and not line.startswith((" ", "\t")):
                inside = False
            elif inside and line.strip() and not line.strip().startswith(":"):
                target = (page.parent / line.strip()).resolve()
                entries.add(str(target.relative_to((tree / "docs").resolve())))
    return entries


@dataclass
class Context:
    """What every PR's checks share: the tree, the tools, the mode, the baselines of the base."""

    tree: Path
    tools: Path
    logs: Path
    dtypes: str
    kornia_repo: bool
    base_api: dict
    base_ty: set[str]
    base_failed: set[str] = field(default_factory=set)


def check_pr(number: int, commit: str, context: Context) -> list[CheckResult]:
    """Every check of the module docstring on the tree at ``commit`` (PR ``number`` on top of the previous ones)."""
    tree, results = context.tree, []
    _git(tree, "checkout", "-q", commit)
    changed = _changed(tree, commit)
    paths = [path for _, path in changed]
    python = [path for status, path in changed if path.endswith(".py") and status != "D"]
    kornia_files = [path for path in python if path.startswith("kornia/")]

    fragments = [path for status, path in changed if path.startswith("changelog.d/") and status == "A"]
    bad = [f for f in fragments if not re.match(rf"^changelog\.d/\+[\w-]+\.({'|'.join(CHANGELOG_TYPES)})\.md$", f)]
    results.append(
        CheckResult("changelog", len(fragments) == 1 and not bad, 0.0, f"fragments: {fragments}", {"files": fragments})
    )

    code, out, seconds = _run([sys.executable, str(PROBE), "api"], tree, _env(tree))
    problems = compare_api(context.base_api, json.loads(out)) if code == 0 else [out[-2000:]]
    results.append(CheckResult("api", not problems, seconds, "\n".join(problems)))

    code, report, seconds = _probe(tree, "runtime")
    if not str(report.get("kornia_file", "")).startswith(str(tree)):
        code, report["failures"] = 1, [*report.get("failures", []), f"imported kornia from {report.get('kornia_file')}"]
    results.append(CheckResult("runtime", code == 0, seconds, "\n".join(report.get("failures", [])), report))

    series_tests = sorted(
        str(p.relative_to(tree))
        for p in (tree / "tests").rglob("test_*.py")
        if _git(tree, "log", "--format=%H", "base..HEAD", "--", str(p.relative_to(tree))).strip()
    )
    log = context.logs / f"pr{number}-tests.log"
    own_passed, own_failed, summary, seconds = _pytest(tree, series_tests, context.dtypes, log)
    detail = f"series tests ({len(series_tests)} files): {summary}"
    data = {"series_tests": series_tests, "series_summary": summary, "log": str(log)}
    ok = not own_failed and bool(own_passed)
    if context.kornia_repo:
        kornia_tests = [t for t in _kornia_tests(tree, paths) if t not in series_tests]
        log = context.logs / f"pr{number}-kornia-tests.log"
        _, failed, kornia_summary, more = _pytest(tree, kornia_tests, context.dtypes, log)
        new = sorted(failed - context.base_failed)
        ok = ok and not new
        seconds += more
        detail += f"; Kornia's tests {kornia_tests}: {kornia_summary}, new failures {new}"
        data.update(kornia_tests=kornia_tests, kornia_summary=kornia_summary, new_failures=new, kornia_log=str(log))
    if own_failed:
        detail += f"\nfailed: {sorted(own_failed)[:20]}"
    results.append(CheckResult("tests", ok, seconds, detail, data))

    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", "--doctest-modules"]
    code, out, seconds = _run([*command, *kornia_files], tree, _env(tree)) if kornia_files else (5, "", 0.0)
    summaries = [line.strip("= ") for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if code == 5:  # pytest: no tests collected, i.e. the touched files have no docstring example
        code, summaries = 0, ["no docstring example in the touched files"]
    summary = (summaries or [out.strip()[-200:]])[-1]
    results.append(CheckResult("doctest", code == 0, seconds, summary if code == 0 else out[-3000:]))

    ruff = _tool(tools=context.tools, name="ruff")
    code, out, seconds = _run([*ruff, "check", "--no-cache", *python], tree, _env(None))
    code2, out2, seconds2 = _run([*ruff, "format", "--check", "--no-cache", *python], tree, _env(None))
    results.append(CheckResult("ruff", code == code2 == 0, seconds + seconds2, (out + out2).strip()[-3000:]))

    diagnostics, seconds = _ty(tree, context.tools)
    new = sorted(diagnostics - context.base_ty)
    detail = "\n".join(new) or f"{len(diagnostics)} diagnostics, as the base"
    results.append(CheckResult("ty", not new, seconds, detail))

    for probe in ("fullgraph", "issue3481"):
        code, report, seconds = _probe(tree, probe)
        failures = report.pop("failures", [])
        detail = "\n".join(failures) or ", ".join(f"{k} {v:.4g}" for k, v in report.items())
        results.append(CheckResult(probe, code == 0, seconds, detail, report))

    pages = [p for s, p in changed if p.startswith("docs/") and p.endswith(".rst") and s == "A"]
    entries = _toctree_entries(tree)
    orphans = [p for p in pages if str(Path(p).relative_to("docs").with_suffix("")) not in entries]
    detail = f"pages added: {pages or 'none'}" + (f"; not in a toctree: {orphans}" if orphans else "")
    results.append(CheckResult("docs", not orphans, 0.0, detail))
    return results


def _print(number: int, subject: str, results: list[CheckResult]) -> bool:
    print(f"PR {number}: {subject}")
    for result in results:
        first = result.detail.splitlines()[0] if result.detail else ""
        print(f"  {'ok  ' if result.ok else 'FAIL'} {result.name:10s} {result.seconds:6.1f} s  {first[:150]}")
        if not result.ok:
            print("    " + result.detail.replace("\n", "\n    ")[:4000])
    return all(result.ok for result in results)


def _prepare(args: argparse.Namespace) -> tuple[str, Path, Path]:
    record = json.loads(BASE_RECORD.read_text())
    version = record["kornia"] if args.kornia is None else args.kornia
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.sdist is not None:
        version, sdist = args.sdist.name[len("kornia-") : -len(".tar.gz")], args.sdist.resolve()
    else:
        version, sdist = fetch_release(version, out / "cache")
    tree = build_base(out, version, sdist, args.kornia_repo)
    return version, out, tree


def check(args: argparse.Namespace) -> int:
    """``check``: build the base, apply the series, check each PR."""
    start = time.perf_counter()
    version, out, tree = _prepare(args)
    mode = f"b (Kornia's tree {args.kornia_repo})" if args.kornia_repo else "a (the release's sdist + harness)"
    print(f"base: kornia {version}, mode {mode}: {tree} ({_git(tree, 'rev-parse', '--short', 'HEAD').strip()})")
    patches = series()
    commits = apply_series(tree, patches)
    print(f"git am -3: {len(patches)} patches applied without conflict")
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    tools = args.tools.resolve()
    _git(tree, "checkout", "-q", "base")
    code, api, _ = _run([sys.executable, str(PROBE), "api"], tree, _env(tree))
    if code != 0:
        raise SystemExit(f"probe api failed on the base:\n{api}")
    base_ty, _ = _ty(tree, tools)
    context = Context(tree, tools, logs, args.dtypes, args.kornia_repo is not None, json.loads(api), base_ty)
    if args.kornia_repo:
        touched = sorted({path for commit in commits for _, path in _changed(tree, commit)})
        kornia_tests = [t for t in _kornia_tests(tree, touched) if (tree / t).is_file()]
        _, failed, summary, seconds = _pytest(tree, kornia_tests, args.dtypes, logs / "base-kornia-tests.log")
        context.base_failed = failed
        print(f"base: Kornia's tests {kornia_tests}: {summary} ({seconds:.0f} s); baseline failures {sorted(failed)}")
    report, ok = [], True
    for number, (patch, commit) in enumerate(zip(patches, commits, strict=True), start=1):
        if args.pr and number > args.pr:
            break
        subject = _git(tree, "log", "-1", "--format=%s", commit).strip()
        results = check_pr(number, commit, context)
        ok = _print(number, subject, results) and ok
        report.append({"pr": number, "patch": patch.name, "subject": subject, "checks": [vars(r) for r in results]})
    _git(tree, "checkout", "-q", commits[-1] if commits else "base")
    summary = {"kornia": version, "mode": mode, "seconds": time.perf_counter() - start, "prs": report, "ok": ok}
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"{'all checks passed' if ok else 'FAILED'} in {summary['seconds']:.0f} s; report {out / 'report.json'}")
    return 0 if ok else 1


def export(tree: Path, version: str | None = None) -> list[Path]:
    """Rewrite ``scripts/kornia_pr/series`` from the commits ``base..HEAD`` of ``tree`` (and the base's version)."""
    for old in series():
        old.unlink()
    options = ["-q", "--zero-commit", "--full-index", "--no-signature", "--no-numbered", "-o", str(PATCHES)]
    _git(tree, "format-patch", *options, "base..HEAD")
    if version is not None:
        BASE_RECORD.write_text(json.dumps({**json.loads(BASE_RECORD.read_text()), "kornia": version}, indent=1) + "\n")
    return series()


def rebase(args: argparse.Namespace) -> int:
    """``rebase``: apply the series on the base of ``--kornia`` and rewrite the patches (and base.json)."""
    version, _, tree = _prepare(args)
    apply_series(tree, series())
    written = export(tree, version)
    print(f"the series applies to kornia {version}: {len(written)} patches rewritten, base.json records {version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "rebase", "export"):
        sub = commands.add_parser(name)
        sub.add_argument("--out", type=Path, default=Path("build/kornia_pr"))
        if name == "export":
            continue
        sub.add_argument("--kornia", default=None, help="a release (default: base.json's), or latest")
        sub.add_argument("--sdist", type=Path, default=None, help="a kornia-VERSION.tar.gz instead of downloading")
        sub.add_argument("--kornia-repo", type=Path, default=None, help="a clone of kornia/kornia: mode b")
        sub.add_argument("--tools", type=Path, default=Path("build/kornia_tools"))
        sub.add_argument("--dtypes", default="float32,float64")
        sub.add_argument("--pr", type=int, default=0, help="check PRs 1..PR only")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args)
    if args.command == "rebase":
        return rebase(args)
    written = export(args.out.resolve() / "tree")
    print(f"{len(written)} patches written to {PATCHES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
