"""The configuration reference, docs/config.md, generated from the config sections' dataclasses
(memtrain/config.py and memtrain/config_train.py).

Each field's row is its dotted name, type, default and the docstring under it (read from the
source with ``ast``). ``python -m memtrain.runtime.config_docs > docs/config.md`` writes the page; a
test checks it is current.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from memtrain.config import _SECTIONS, Size

__all__ = ["field_docs", "config_reference_markdown"]


def field_docs() -> list[tuple[str, str, str, str]]:
    """``(dotted name, type, default, docstring)`` for every config field, read from the sections' source."""
    import ast
    import inspect

    docs: dict[tuple[str, str], str] = {}
    modules = dict.fromkeys(inspect.getmodule(cls) for _, cls in _SECTIONS)  # config.py and config_train.py
    for node in (n for m in modules for n in ast.parse(inspect.getsource(m)).body):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[(node.name, a.target.id)] = " ".join(str(b.value.value).split())
    rows = []
    for prefix, cls in _SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):  # a section of its own (model, train.optimizer, nodes[], ...)
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            type_name = "size" if Size in (hints[f.name], *typing.get_args(hints[f.name])) else _type_name(hints[f.name])
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            rows.append((dotted, type_name, default, docs.get((cls.__name__, f.name), "")))
    return rows


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or any(_is_section(a) for a in typing.get_args(tp))


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_name(args[0]) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def config_reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `memtrain/config.py` by `python -m memtrain.runtime.config_docs` (a test checks it is current).",
        "Every field can be set on the command line with `--set dotted.name=value` (values are read as YAML; list items by index, e.g. `--set cluster.nodes[0].devices[0].kind=a100-80gb`).",
        "Sizes accept `24GiB`, `512MB`, `1.5TiB` or a number of bytes. `cluster: auto` reads this machine. "
        "`parallel: auto` stands for `{pipeline: 0, data: 0, schedule: auto}`: `memtrain plan` chooses the degrees "
        "and the schedule over the cluster's devices (`memtrain run` needs them fixed).",
        "An `int` is a whole number (`2`, not `2.0` or `2GiB`); a `float` accepts `0.1`, `1e-3` or `3.0e-4`; "
        "`.inf` and `.nan` are refused everywhere. A YAML key given twice in one mapping is an error.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for dotted, type_name, default, doc in field_docs():
        lines.append(f"| `{dotted}` | {type_name} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m memtrain.runtime.config_docs > docs/config.md
    print(config_reference_markdown(), end="")
