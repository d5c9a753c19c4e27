import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.units import format_bytes, parse_bytes
from memtrain.config import ConfigError, config_from_dict
from memtrain.runtime.config_file import load_config
from memtrain.runtime.config_docs import config_reference_markdown, field_docs

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
        (["cluster.auto=false", "cluster.nodes=[]"], "cluster.nodes"),
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
        "docs/config.md is stale: run `python -m memtrain.runtime.config_docs > docs/config.md`"
    )
    assert all(doc for _, _, _, doc in field_docs())


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "memtrain.runtime.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    r = _cli("plan", str(ROOT / "examples" / "tiny-cpu.yaml"), "--set", "train.steps=-3")
    assert r.returncode == 2
    assert "train.steps" in r.stderr and "Traceback" not in r.stderr
    r = _cli("plan", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# --- bad input (issue 16, section 3) ---------------------------------------------------------


def test_size_is_a_type_of_its_own_and_int_fields_take_whole_numbers_only():
    from memtrain.config import Size

    assert Size is not int
    assert config_from_dict({"memory": {"device": "5GiB"}}).memory.device == 5 * 2**30
    for section, name, value in [("train", "steps", "5GiB"), ("train", "steps", 1.5), ("train", "seq_len", 2.9),
                                 ("snapshot", "k", 3.7), ("train", "steps", 2.0), ("train", "steps", True),
                                 ("train", "global_batch_size", "8")]:
        with pytest.raises(ConfigError, match=rf"^{section}\.{name}: expected a whole number") as e:
            config_from_dict({section: {name: value}})
        if isinstance(value, float):
            assert "without a decimal point" in str(e.value)  # 2.0 too: every float is refused, and said so


@pytest.mark.parametrize("text,expected", [("1e-3", 1e-3), ("1E-4", 1e-4), ("+2.5e+3", 2500.0), ("3.0e-4", 3e-4), (".5e1", 5.0)])
def test_exponent_floats_are_numbers_in_yaml_and_in_set(tmp_path, text, expected):
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  optimizer:\n    lr: {text}\n")
    assert load_config(path).train.optimizer.lr == expected
    assert load_config(None, [f"train.optimizer.lr={text}"]).train.optimizer.lr == expected
    assert config_from_dict({"train": {"optimizer": {"lr": text}}}).train.optimizer.lr == expected  # quoted text
    # the same reading reaches free-form mappings (a GPT override), not only float fields
    assert load_config(None, [f"model.overrides={{norm_eps: {text}}}"]).model.overrides["norm_eps"] == expected


@pytest.mark.parametrize("text", ["1e-3x", "e5", "1e", "0x10", "one", "1e-3 1"])
def test_float_fields_refuse_other_text(text):
    with pytest.raises(ConfigError, match=r"^train\.optimizer\.lr: expected a number"):
        config_from_dict({"train": {"optimizer": {"lr": text}}})


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.optimizer.lr=.inf", "train.optimizer.lr"),
        ("train.optimizer.lr=1e999", "train.optimizer.lr"),
        ("train.optimizer.weight_decay=.nan", "train.optimizer.weight_decay"),
        ("train.optimizer.eps=-.inf", "train.optimizer.eps"),
        ("train.optimizer.betas=[0.9, .nan]", "train.optimizer.betas[1]"),
        ("memory.safety_margin=.nan", "memory.safety_margin"),
        ("memory.device=.nan", "memory.device"),
        ("memory.host=.inf", "memory.host"),
        ("cluster.network_gbps=.inf", "cluster.network_gbps"),
        ("model.overrides={dropout: .nan}", "model.overrides.dropout"),
        ("model.hf_config={model_type: llama, rms_norm_eps: .nan}", "model.hf_config.rms_norm_eps"),
    ],
)
def test_non_finite_values_are_refused_at_load_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "examples" / "tiny-cpu.yaml", [override])
    assert str(e.value).startswith(field + ":"), str(e.value)


@pytest.mark.parametrize(
    "section,values,field",
    [
        ("train.optimizer", {"eps": -1}, "train.optimizer.eps"),
        ("train.optimizer", {"eps": 0}, "train.optimizer.eps"),
        ("train.optimizer", {"momentum": 1.0}, "train.optimizer.momentum"),
        ("train.optimizer", {"betas": [1.0, 0.9]}, "train.optimizer.betas[0]"),
        ("train.optimizer", {"weight_decay": -0.1}, "train.optimizer.weight_decay"),
        ("train", {"global_batch_size": 2**40}, "train.global_batch_size"),
        ("train", {"seq_len": 2**40}, "train.seq_len"),
        ("train", {"steps": 10**12}, "train.steps"),
        ("train", {"seed": -1}, "train.seed"),
        ("train", {"micro_batch_size": 16}, "train.micro_batch_size"),
        ("snapshot", {"k": 0}, "snapshot.k"),
        ("snapshot", {"m": -1}, "snapshot.m"),
        ("snapshot", {"interval_steps": -1}, "snapshot.interval_steps"),
        ("data", {"seed": 2**40}, "data.seed"),
    ],
)
def test_hyper_parameters_are_checked_by_the_dataclasses(section, values, field):
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node.update(values)
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_cluster_fields_are_checked_and_named_by_their_index():
    node = {"devices": [{"kind": "rtx4090"}, {"kind": "rtx4090", "h2d_gbps": 0}]}
    with pytest.raises(ConfigError, match=r"^cluster\.nodes\[0\]\.devices\[1\]\.h2d_gbps: must be a finite number > 0"):
        config_from_dict({"cluster": {"nodes": [node]}})
    for change, field in [({"num_cpus": 0}, "cluster.nodes[1].num_cpus"), ({"host_memory": 0}, "cluster.nodes[1].host_memory"),
                          ({"nvme": {"path": "/x", "read_gbps": -1}}, "cluster.nodes[1].nvme.read_gbps"),
                          ({"nvme": {"path": "bad\0name"}}, "cluster.nodes[1].nvme.path"),
                          ({"devices": [{"count": 10**6}]}, "cluster.nodes[1].devices[0].count"),
                          ({"devices": [{"memory": 0}]}, "cluster.nodes[1].devices[0].memory")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({"cluster": {"nodes": [{"name": "a"}, {"name": "b", **change}]}})
        assert str(e.value).startswith(field + ":"), str(e.value)


def test_repeated_yaml_keys_are_refused_naming_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 3\n  seq_len: 32\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*line 4: the key 'steps' is given twice .*first on line 2"):
        load_config(path)
    path.write_text("train: {steps: 3}\nmodel: {preset: tiny}\ntrain: {seq_len: 32}\n")
    with pytest.raises(ConfigError, match=r"line 3: the key 'train' is given twice"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set model\.overrides: .*'num_layers' is given twice"):
        load_config(None, ["model.overrides={num_layers: 2, num_layers: 3}"])
    # a YAML merge key (<<) followed by the keys it overrides is not a repetition
    path.write_text("train:\n  <<: {steps: 3, seq_len: 32}\n  steps: 5\n")
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.seq_len) == (5, 32)


def _alias_bomb(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb() + "\nname: *l8\n")  # 9**9 = 387M strings once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.perf_counter() - t0 < 5
    assert str(e.value).startswith(f"config file {str(path)!r}: the document stands for more than")
    assert len(str(e.value)) < 300
    bomb = "{" + _alias_bomb(7).replace("\n", ", ") + ", x: *l6}"  # 9**7 values, in one --set value
    with pytest.raises(ConfigError, match=r"^--set name: the document stands for more than"):
        load_config(None, ["name=" + bomb])
    path.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"line 1: an alias refers to a value that contains it"):
        load_config(path)


def test_messages_never_embed_a_long_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": ["x" * 10_000] * 1000})
    assert str(e.value).startswith("name: expected text") and len(str(e.value)) < 200
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"dtype": "y" * 100_000}})
    assert len(str(e.value)) < 200
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  steps: " + "9" * 5000 + "\n")  # Python refuses to read a 5000-digit int
    with pytest.raises(ConfigError, match=r"big\.yaml.*cannot read a value") as e:
        load_config(path)
    assert len(str(e.value)) < 300


def test_each_config_path_failure_has_its_own_message(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"config file .* is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file .*latin\.yaml' is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(latin)
    with pytest.raises(ConfigError, match=r"config file .*not a valid file name"):
        load_config(str(tmp_path / "a\0b.yaml"))
    locked = tmp_path / "locked.yaml"
    locked.write_text("name: x\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # tests run as root, where chmod 000 does not stop a read
    with pytest.raises(ConfigError, match=r"config file .*locked\.yaml' cannot be read: permission denied"):
        load_config(locked)


def test_show_and_parse_bytes_bound_what_they_quote():
    from memtrain.units import MAX_BYTES, show

    assert len(show("x" * 10_000)) <= 60
    assert show(10**5000) == "a number of about 5001 digits"
    nested: list = [1]
    for _ in range(200):
        nested = [nested] * 10
    assert len(show(nested)) <= 60
    for bad, what in [(float("nan"), "finite"), (float("inf"), "finite"), ("1e400", "finite"), ("2048PiB", "1 EiB"),
                      (MAX_BYTES + 1, "1 EiB")]:
        with pytest.raises(ValueError, match=rf"^memory\.device: .*{what}"):
            parse_bytes(bad, field="memory.device")


def test_yaml_errors_are_one_line_naming_file_and_place(tmp_path):
    path = tmp_path / "ctl.yaml"
    path.write_text("name: a\x01b\n")
    with pytest.raises(ConfigError, match=r"ctl\.yaml': not valid YAML: character 8: U\+0001 is not allowed") as e:
        load_config(path)
    path.write_text("train:\n\tsteps: 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 2, column 1: .*'\\t'") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_setting_a_cluster_field_keeps_cluster_auto(tmp_path):
    """--set cluster.network_gbps on a 'cluster: auto' file changes that field and keeps reading
    this machine (it used to turn auto off, then refuse the config for listing no node)."""
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny}\ncluster: auto\n")
    cfg = load_config(p, ["cluster.network_gbps=50"])
    assert cfg.cluster.auto is True and cfg.cluster.network_gbps == 50
    cfg = load_config(p, ["cluster.auto=false", "cluster.nodes=[{host_memory: 8GiB}]"])
    assert cfg.cluster.auto is False and cfg.cluster.nodes[0].host_memory == 8 * 2**30
