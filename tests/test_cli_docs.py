"""docs/cli.md holds every command's --help verbatim; this keeps the two equal.

Regenerate after changing a command's options: ``python tests/test_cli_docs.py --write``.
"""

import argparse
import os
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
README = DOC.parent.parent / "README.md"
WIDTH = "100"  # argparse wraps at the terminal width; the reference is written at this one

HEADER = """# Command reference

Every `lmm-steer` command's `--help`, verbatim (at 100 columns). `tests/test_cli_docs.py` fails
when a command's options and this page differ; `python tests/test_cli_docs.py --write`
regenerates the page from the parser.
"""


def _commands(parser, prefix=("lmm-steer",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
            return
    yield " ".join(prefix), parser


def reference() -> str:
    os.environ["COLUMNS"] = WIDTH
    from lmm_steer.cli import build_parser

    parts = [HEADER]
    for name, parser in _commands(build_parser()):
        parts.append(f"\n## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "".join(parts)


def test_docs_cli_equals_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", WIDTH)
    assert DOC.read_text() == reference(), "docs/cli.md is stale: run python tests/test_cli_docs.py --write"


def _logical_lines(text: str):
    """Lines with shell continuations (a trailing backslash) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def test_options_named_beside_a_command_exist():
    """Wherever README.md or docs/*.md shows `lmm-steer <command> ... --option`, the command has
    that option: a renamed or removed flag cannot linger in an example or a synopsis."""
    os.environ["COLUMNS"] = WIDTH
    from lmm_steer.cli import build_parser

    commands = dict(_commands(build_parser()))
    names = sorted(commands, key=len, reverse=True)  # "lmm-steer sae train" before "lmm-steer sae"
    checked = 0
    for doc in [README, *sorted(DOC.parent.glob("*.md"))]:
        for line in _logical_lines(doc.read_text()):
            for name in names:
                at = line.find(name + " ")
                if at < 0:
                    continue
                rest = re.split(r"[`|;#]|&&", line[at + len(name):])[0]
                known = {s for a in commands[name]._actions for s in a.option_strings}
                named = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", rest))
                assert named <= known, f"{doc.name}: {name} has no {sorted(named - known)}: {line.strip()}"
                checked += 1
                break
    assert checked >= 10


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    DOC.write_text(reference())
    print(f"wrote {DOC}")
