"""The command-line reference, docs/cli.md, generated from ``memtrain``'s argument parser.

``python -m memtrain.runtime.cli_docs > docs/cli.md`` writes the page; a test checks it is current.
"""

from __future__ import annotations

import argparse

from memtrain.runtime.cli import EXIT_USER_ERROR, _parser

__all__ = ["cli_reference_markdown"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference_markdown() -> str:
    parser = _parser()
    lines = ["# Command-line reference", "",
             "Generated from memtrain's argument parser (`python -m memtrain.runtime.cli_docs > docs/cli.md`).", "",
             f"Every command exits with status {EXIT_USER_ERROR} and one line naming the field or file and the fix "
             "when the mistake is the user's (a bad config field, path or size, a plan that cannot fit); set "
             "`MEMTRAIN_DEBUG=1` to see the traceback.", ""]
    for name, sub in _subparsers(parser).items():
        sub.prog = f"memtrain {name}"
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)  # not the terminal's width
        lines += [f"## `memtrain {name}`", ""]
        if sub.description:
            lines += [" ".join(sub.description.split()), ""]
        lines += ["```text", sub.format_usage().strip(), "```", "", "| argument | meaning |", "|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
            if action.option_strings and action.metavar:
                flag += f" `{action.metavar}`"
            text = " ".join((action.help or "").split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            lines.append(f"| {flag} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(cli_reference_markdown(), end="")
