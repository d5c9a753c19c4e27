"""Reading the YAML of a config file or a ``--set`` value, stricter than ``yaml.safe_load``.

Plain PyYAML lets a repeated key silently replace the first, reads ``1e-3`` as text (YAML 1.1
wants a dot and a signed exponent in a float), and expands aliases without bound (a few lines
of ``&a``/``*a`` can stand for billions of values). ``load_yaml`` refuses repeated keys and
documents that stand for more than ``MAX_NODES`` values, and reads exponent floats as numbers.
Every refusal is a ``YamlRefused`` with a one-line message; ``describe`` makes any other
``yaml.YAMLError`` one line too. The caller adds the file or option name.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from memtrain.units import show

__all__ = ["MAX_NODES", "YamlRefused", "load_yaml", "describe"]

MAX_NODES = 100_000
"""Values (scalars, lists, mappings) a document may stand for once its aliases are expanded.
A config has a few hundred; the bound stops an alias bomb before anything is built from it."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(yaml.YAMLError):
    """YAML that parses but is refused: a repeated key, too many values, a value too large."""


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses repeated keys and documents too large once expanded."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` then explicit keys is how YAML overrides
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise YamlRefused(
                    f"line {key_node.start_mark.line + 1}: the key {show(key)} is given twice in one mapping "
                    f"(first on line {first.start_mark.line + 1}); keep one"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep)


# YAML 1.2 floats with an exponent and no dot ("1e-3", "1E+4", "+2.5e3"), which YAML 1.1 reads as
# text. Checked after the built-in resolvers, so nothing they match changes.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    """Values ``node`` stands for with its aliases expanded; raises past ``MAX_NODES``.

    Each distinct node is counted once (``sizes`` memoises), so the walk is linear in the
    document's text even when its expansion is exponential."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise YamlRefused(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it; "
                          "write the value out")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, active)
        if total > MAX_NODES:
            raise YamlRefused(f"the document stands for more than {MAX_NODES} values once its aliases (*name) "
                              "are expanded; write the values out or use fewer aliases")
    active.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str) -> Any:
    """The one YAML document in ``text``; raises ``yaml.YAMLError`` (``YamlRefused`` for refusals)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise YamlRefused("values are nested too deeply; a config needs a few levels") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits, a bad date
        raise YamlRefused(f"cannot read a value: {show(str(e), 100)}") from None
    finally:
        loader.dispose()


def describe(e: yaml.YAMLError) -> str:
    """One line saying where and what ``e`` is (PyYAML's own text spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(x for x in (e.context, e.problem) if x) or type(e).__name__
        return where + _cut(what, 160)
    if isinstance(e, yaml.reader.ReaderError):
        code = f"U+{e.character:04X}" if isinstance(e.character, int) else show(e.character)
        return f"character {e.position + 1}: {code} is not allowed in YAML ({e.reason})"
    return _cut(str(e), 200)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
