import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.planner.units import format_bytes, parse_bytes
from memtrain.runtime.config import ConfigError, config_from_dict, config_reference_markdown, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text,expected",
    [("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1.5 TiB", int(1.5 * 2**40)), (1024, 1024), ("7", 7), ("2k", 2000)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["24 GBs", "lots", "-1", -5, True, [1]])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="memory.device"):
        parse_bytes(bad, field="memory.device")


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(24 * 2**30) == "24.0 GiB"
    assert format_bytes(12) == "12 B"


def test_examples_load():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_sizes_and_cluster_forms():
    cfg = config_from_dict(
        {
            "memory": {"device": "2GiB", "host": "8GiB"},
            "cluster": {"nodes": [{"host_memory": "64GiB", "devices": [{"kind": "rtx4090", "count": 2}]}]},
        }
    )
    assert cfg.memory.device == 2 * 2**30
    assert cfg.cluster.auto is False
    assert cfg.cluster.nodes[0].host_memory == 64 * 2**30
    assert cfg.cluster.nodes[0].devices[0].count == 2
    assert config_from_dict({"cluster": "auto"}).cluster.auto is True


def test_overrides_apply_with_yaml_values():
    cfg = load_config(
        ROOT / "examples" / "tiny-cpu.yaml",
        ["train.steps=3", "train.optimizer.betas=[0.8, 0.9]", "memory.device=64MiB", "train.dtype=bf16"],
    )
    assert cfg.train.steps == 3
    assert cfg.train.optimizer.betas == (0.8, 0.9)
    assert cfg.memory.device == 64 * 2**20
    assert cfg.train.dtype == "bf16"


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["train.steps=0"], "train.steps"),
        (["train.dtype=int8"], "train.dtype"),
        (["train.micro_batch_size=3"], "train.micro_batch_size"),
        (["train.optimizer.lr=-1"], "train.optimizer.lr"),
        (["train.optimizer.name=lamb"], "train.optimizer.name"),
        (["memory.device=huge"], "memory.device"),
        (["memory.safety_margin=1.5"], "memory.safety_margin"),
        (["train.bogus=1"], "train.bogus"),
        (["model.source=onnx"], "model.source"),
        (["model.source=python"], "model.factory"),
        (["train.seq_len=abc"], "train.seq_len"),
        (["steps"], "--set steps"),
        (["cluster.nodes=[]"], "cluster.nodes"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "examples" / "tiny-cpu.yaml", overrides)
    assert str(e.value).startswith(field), str(e.value)


def test_overrides_reach_list_items():
    cfg = load_config(ROOT / "examples" / "gpt-1b-on-4090.yaml",
                      ["cluster.nodes[0].devices[0].kind=a100-80gb", "cluster.nodes[0].host_memory=32GiB"])
    assert cfg.cluster.nodes[0].devices[0].kind == "a100-80gb"
    assert cfg.cluster.nodes[0].host_memory == 32 * 2**30
    with pytest.raises(ConfigError, match=r"nodes has no item 3"):
        load_config(ROOT / "examples" / "gpt-1b-on-4090.yaml", ["cluster.nodes[3].host_memory=1GiB"])
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_config(ROOT / "examples" / "gpt-1b-on-4090.yaml", ["cluster.nodes[x].host_memory=1GiB"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference_markdown(), (
        "docs/config.md is stale: run `python -m memtrain.runtime.config > docs/config.md`"
    )
    assert all(doc for _, _, _, doc in __import__("memtrain.runtime.config", fromlist=["_"]).field_docs())


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "memtrain.runtime.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    r = _cli("plan", str(ROOT / "examples" / "tiny-cpu.yaml"), "--set", "train.steps=-3")
    assert r.returncode == 2
    assert "train.steps" in r.stderr and "Traceback" not in r.stderr
    r = _cli("plan", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
