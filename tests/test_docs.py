"""The snippets of docs/*.md run as written: python blocks are executed (and checked for undefined names), bash
blocks whose first line is '# runs in CI' are executed line by line; '# not run in CI: <why>' blocks are skipped."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def _blocks(kind):
    for page in sorted(DOCS.glob("*.md")):
        for i, (lang, code) in enumerate(BLOCK.findall(page.read_text())):
            if lang == kind and not code.startswith("# not run in CI"):
                yield pytest.param(page.name, code, id=f"{page.stem}-{i}")


@pytest.mark.parametrize(("page", "code"), list(_blocks("python")))
def test_python_snippets_name_everything_they_use_and_run(page, code, tmp_path):
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F821", "--stdin-filename",
                           f"{page}.py", "-"], input=code, capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, f"{page}: undefined names\n{lint.stdout}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, f"{page}:\n{out.stderr[-3000:]}"


@pytest.mark.parametrize(("page", "code"), [p for p in _blocks("bash") if p.values[1].startswith("# runs in CI")])
def test_bash_snippets_marked_for_ci_run(page, code, tmp_path, shared_data):
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (shared_data / "sst2" / "train.jsonl").read_text().splitlines()[:40]]
    for split, part in (("train", rows[:30]), ("test", rows[30:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": r["sentence"], "label": r["label"]}) + "\n"
                                                     for r in part))  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RESULTS": str(tmp_path / "r"),
           "DATA": str(data), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}  # fmt: skip
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, f"{page}:\n{(out.stdout + out.stderr)[-3000:]}"


def test_every_bash_block_says_whether_ci_runs_it():
    for page in sorted(DOCS.glob("*.md")):
        for lang, code in BLOCK.findall(page.read_text()):
            if lang == "bash" and not code.startswith(("# runs in CI", "# not run in CI")):
                assert "bayeslora" not in code or page.name == "multi_gpu.md", (page.name, code[:80])
