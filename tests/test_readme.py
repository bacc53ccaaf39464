"""Every README snippet runs verbatim, in order, offline, on the folder the README's offline section builds.

Python blocks run in one namespace; shell blocks line by line with ``python`` = this interpreter. Lines starting
with ``make`` are the development commands of the Makefile (CI runs them itself) and are skipped.
"""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^( *)```(python|bash)\n(.*?)^\1```", re.M | re.S)


def snippets():
    return [(language, textwrap.dedent(code)) for _, language, code in BLOCK.findall(README.read_text("utf-8"))]


def test_readme_has_the_offline_section():
    text = README.read_text("utf-8")
    assert "## Offline / no hub" in text and "demo --workdir" in text and "AutoTokenizer" in text
    languages = [language for language, _ in snippets()]
    assert languages.count("python") >= 3 and languages.count("bash") >= 2


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    namespace: dict = {}
    ran = []
    for language, code in snippets():
        if language == "python":
            exec(compile(code, f"README.md python block {len(ran)}", "exec"), namespace)
            ran.append(code)
            continue
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if not command or command.startswith("make "):
                continue
            result = subprocess.run(
                shlex.split(command), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
            )
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            ran.append(command)
    assert any("demo --workdir demo" in command for command in ran)
    assert (tmp_path / "my-checkpoint" / "tokenizer.json").is_file()
    assert (tmp_path / "embeddings.safetensors").is_file()
    out = capsys.readouterr().out
    assert "torch.Size([2, 2])" in out and "[[1, 14, 18], [1, 50, 5]] torch.Size([502, 64])" in out
