"""A run's config from its YAML file and ``--set`` overrides (the sections are memtrain.config's).

The file is read strictly (runtime.config_yaml: repeated keys, alias bombs and oversized files
are refused); each way a path can fail gets its own message naming the file; an override
``a.b[0].c=value`` reads its value as YAML and names itself in every message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from memtrain.units import show
from memtrain.config import MAX_CONFIG_BYTES, PARALLEL_AUTO, Config, ConfigError, _cut, config_from_dict
from memtrain.runtime.config_yaml import YamlRefused, describe, load_yaml

__all__ = ["load_config", "apply_overrides"]


_PART_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b[0].c`` in the raw config mapping; list items must already exist."""
    node: Any = data
    parts = dotted.split(".")
    opt = f"--set {_cut(dotted)}"
    for depth, part in enumerate(parts):
        m = _PART_RE.match(part)
        if not m:
            raise ConfigError(f"{opt}: cannot read {show(part)}; write names and [index], e.g. cluster.nodes[0].host_memory")
        name, indices = m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]
        last = depth == len(parts) - 1
        if not isinstance(node, dict):
            raise ConfigError(f"{opt}: {_cut('.'.join(parts[:depth]))} is not a section")
        if last and not indices:
            node[name] = value
            return
        if name not in node or node[name] is None or node[name] == "auto":
            if indices:
                raise ConfigError(f"{opt}: {name} has no item {indices[0]}; write the list in the config file")
            # 'cluster: auto' (or 'parallel: auto') stays auto: --set cluster.network_gbps=50 changes that field only
            auto = {"cluster": {"auto": True}, "parallel": PARALLEL_AUTO}.get(name, {}) if node.get(name) == "auto" else {}
            node[name] = dict(auto)
        node = node[name]
        for k, i in enumerate(indices):
            if not isinstance(node, list) or i >= len(node):
                raise ConfigError(f"{opt}: {name} has no item {i}; write the list in the config file")
            if last and k == len(indices) - 1:
                node[i] = value
                return
            node = node[i]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides; values are read as YAML (``2``, ``bf16``, ``[0.9, 0.99]``).

    A value that is not YAML is taken as text; one that is refused (a repeated key, an alias
    bomb) is an error."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {_cut(item)}: write section.field=value, e.g. --set train.steps=20")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw)
        except YamlRefused as e:
            raise ConfigError(f"--set {_cut(key.strip())}: {describe(e)}") from None
        except yaml.YAMLError:
            value = raw
        if key.strip() == "cluster" and value == "auto":
            data["cluster"] = "auto"
            continue
        _set_dotted(data, key.strip(), value)
    return data


def _read_config_file(p: Path) -> dict[str, Any]:
    """The mapping in config file ``p``; each way a path can fail gets its own message naming it."""
    where = f"config file {show(str(p), 200)}"
    try:
        if p.is_dir():
            raise ConfigError(f"{where} is a directory; pass a YAML file such as examples/tiny-cpu.yaml")
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; pass a YAML file such as examples/tiny-cpu.yaml") from None
    except PermissionError:
        raise ConfigError(f"{where} cannot be read: permission denied; fix its permissions or copy it") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror or e}); pass a readable YAML file") from None
    except ValueError:  # a NUL byte in the name
        raise ConfigError(f"{where} is not a valid file name") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KiB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    try:
        data = load_yaml(text)
    except YamlRefused as e:
        raise ConfigError(f"{where}: {describe(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {describe(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model, train, ...), got {show(data)}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The Config in YAML file ``path`` (None: the defaults) with ``--set`` ``overrides`` applied."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = _read_config_file(p)
        data.setdefault("name", p.stem)
    return config_from_dict(apply_overrides(data, list(overrides)))
