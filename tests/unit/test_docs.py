"""The documentation site: it builds without warnings, its generated pages are current, and every
code block of the quick start runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.runtime.cli_docs import cli_reference_markdown

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart.md"


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    r = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
    assert (tmp_path / "site" / "reports" / "gpt-1b-on-4090.html").is_file()  # the real report the guide links


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [a page that is not there](missing.md).\n")
    r = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "missing.md" in r.stdout + r.stderr


def test_the_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference_markdown() + "", (
        "docs/cli.md is stale: run `python -m memtrain.runtime.cli_docs > docs/cli.md`")


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M)]


def test_the_quick_start_has_commands_and_code():
    kinds = [k for k, _ in _blocks(QUICKSTART.read_text())]
    assert kinds.count("bash") >= 3 and kinds.count("python") >= 1 and set(kinds) <= {"bash", "python"}


def test_every_quick_start_block_runs_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for i, (kind, code) in enumerate(_blocks(QUICKSTART.read_text())):
        if kind == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=600, env=env)
        else:
            r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                               env=env)
        assert r.returncode == 0, f"block {i} ({kind}) failed:\n{code}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        if "memtrain resume" in code:
            assert "resuming after step 20 " in r.stdout
        if kind == "python":
            assert r.stdout.strip().endswith("True")
    assert (tmp_path / "plan.html").is_file()
    lines = (tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
