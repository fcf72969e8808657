"""Docs that run: every command in README.md and docs/*.md fenced as ```bash is executed here.

Install steps (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install``) are what CI itself runs
before the tests, so they are skipped; the README's test command (``python -m pytest``) is skipped
too (it is this very run). Commands run in a scratch folder that links to the repository's
``models/`` and ``tools/``, so outputs never land in the checkout. Benchmark commands are shown in
```text blocks (they take minutes) and are not run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = (re.compile(r"^python3? -m venv\b"), re.compile(r"^(\.|source) \S*activate"),
        re.compile(r"^(python3? -m )?pip install\b"), re.compile(r"^python3? -m pytest\b"),
        re.compile(r"^cd\b"), re.compile(r"^git clone\b"))


def _commands(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in (p.strip() for p in line.split("&&")):
                if part and not any(rx.match(part) for rx in SKIP):
                    cmds.append(part)
    return cmds


CASES = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS if p.exists() for c in _commands(p)]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


PY_CASES = [(p.relative_to(ROOT).as_posix(), code) for p in DOCS if p.exists() for code in _python_blocks(p)]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    assert "pip install -e '.[test]'" in blocks[0] and "onnxcompress " in blocks[0] and "tools/compare.py" in blocks[0]
    assert "python -m pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test]'" in ci and "python -m pytest" in ci


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for name in ("models", "tools"):
        os.symlink(ROOT / name, d / name)
    return d


@pytest.mark.parametrize("doc,cmd", CASES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(CASES)])
def test_documented_command_runs(doc, cmd, workdir):
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(cmd, shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{doc}: `{cmd}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("doc,code", PY_CASES, ids=[f"{d}:py{i}" for i, (d, _) in enumerate(PY_CASES)])
def test_documented_python_runs(doc, code, workdir):
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{doc}: python block failed\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
