"""The import contracts of pyproject.toml ([tool.importlinter]; docs/DESIGN.md, "Layers") hold on
the code as it is, and each one fails when a wrong import is planted."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
CONTRACTS = {c["id"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
ENGINE_REWRITE_IGNORES = {
    "memtrain.offload.activations -> memtrain.planner.simulate",
}
"""The offload → planner imports left for the one-program rewrite of the engine, which removes them."""


def namespace_tree(dest: Path, copy: str | None = None) -> Path:
    """The ``memtrain.*`` namespace as one folder tree under ``dest``: import-linter reads a package
    from one directory, while pyproject.toml maps the project's folders into the namespace
    (planner/ is memtrain.planner). Every folder is a symlink, but ``copy`` (e.g. ``memtrain.models``),
    a copy to plant a wrong import in."""
    top = dest / "memtrain"
    top.mkdir(parents=True)
    for f in (ROOT / PACKAGE_DIRS["memtrain"]).glob("*.py"):
        (top / f.name).symlink_to(f)
    for name, folder in PACKAGE_DIRS.items():
        if name == "memtrain":
            continue
        target = dest / name.replace(".", "/")
        if name == copy:
            shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.symlink_to(ROOT / folder, target_is_directory=True)
    return dest


def lint_imports(tree: Path, *contract_ids: str) -> subprocess.CompletedProcess:
    """``lint-imports`` with pyproject.toml's contracts on ``tree`` (first on the import path)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    args = ["--no-cache", "--no-logo", *(a for c in contract_ids for a in ("--contract", c)), str(ROOT / "pyproject.toml")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_hold(tmp_path):
    result = lint_imports(namespace_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


# A wrong import per contract, planted as a new module: (contract, package copied, {file: text}).
# The layers case imports inside a function and the cycle closes under TYPE_CHECKING: both count.
WRONG_IMPORTS = [
    ("layers", "memtrain.models", {"_wrong.py": "def f():\n    from memtrain.runtime import engine\n"}),
    ("layers", "memtrain.cluster", {"_wrong.py": "from memtrain.planner import search\n"}),
    ("acyclic", "memtrain.offload", {
        "_wrong_a.py": "from memtrain.offload import _wrong_b\n",
        "_wrong_b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from memtrain.offload import _wrong_a\n",
    }),
    ("offload-plan-types", "memtrain.offload", {"_wrong.py": "from memtrain.planner.search import plan\n"}),
    ("offload-no-cost", "memtrain.offload", {"_wrong.py": "from memtrain.planner.bounds import stream_work_s\n"}),
    ("ray", "memtrain.planner", {"_wrong.py": "import ray\n"}),
]


@pytest.mark.parametrize(("contract", "package", "files"), WRONG_IMPORTS, ids=[f"{c}-{p}" for c, p, _ in WRONG_IMPORTS])
def test_a_wrong_import_breaks_its_contract(tmp_path, contract, package, files):
    tree = namespace_tree(tmp_path, copy=package)
    for name, text in files.items():
        (tree / package.replace(".", "/") / name).write_text(text)
    result = lint_imports(tree, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    squeezed = "".join(result.stdout.split())  # the report wraps long lines
    assert "".join(f"{CONTRACTS[contract]['name']}BROKEN".split()) in squeezed, result.stdout


def _children(package: str) -> set[str]:
    """Modules and packages directly under ``package`` of the namespace."""
    folder = ROOT / PACKAGE_DIRS[package]
    names = {f"{package}.{f.stem}" for f in folder.glob("*.py") if f.stem != "__init__"}
    names |= {n for n in PACKAGE_DIRS if n.rpartition(".")[0] == package}
    return names


def test_the_contract_lists_name_every_module():
    # A module added under memtrain/ or planner/ must be placed in these contracts by hand.
    assert set(CONTRACTS["ray"]["source_modules"]) == _children("memtrain") - {"memtrain.runtime", "memtrain.comm"}
    plan_types = {"memtrain.planner.plan", "memtrain.planner.stats"}
    assert set(CONTRACTS["offload-plan-types"]["forbidden_modules"]) == _children("memtrain.planner") - plan_types
    layers = {m.strip() for layer in CONTRACTS["layers"]["layers"] for m in layer.split("|")}
    assert {f"memtrain.{m}" for m in layers} == _children("memtrain")
    # No offload → planner import is exempt but those the engine rewrite removes.
    for contract in ("offload-plan-types", "offload-no-cost"):
        assert set(CONTRACTS[contract].get("ignore_imports", ())) <= ENGINE_REWRITE_IGNORES
    assert all("ignore_imports" not in CONTRACTS[c] for c in ("layers", "acyclic", "ray"))
