"""docs/reference/cli.md holds every command's --help verbatim; this keeps the two equal.

Regenerate after changing a command's options: ``python tests/test_cli_docs.py --write``.
"""

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reference" / "cli.md"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXPERIMENTS = ROOT / "experiments"  # docs/experiments links here, so the site includes the records
WIDTH = "100"  # argparse wraps at the terminal width; the reference is written at this one

HEADER = """# Command reference

Every `lmm-steer` command's `--help`, verbatim (at 100 columns). `tests/test_cli_docs.py` fails
when a command's options and this page differ; `python tests/test_cli_docs.py --write`
regenerates the page from the parser.
"""


def _commands(parser, prefix=("lmm-steer",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if not action.required:  # a command of its own too (``bench``, beside ``bench soak``)
                yield " ".join(prefix), parser
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
    assert DOC.read_text() == reference(), "docs/reference/cli.md is stale: run python tests/test_cli_docs.py --write"


def _pages():
    """Every markdown page of the user guide (docs/, its subfolders included) and of the experiment
    records, each once: the docs/experiments link is walked as experiments/."""
    docs = [p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "experiments"]
    return sorted(docs) + sorted(EXPERIMENTS.rglob("*.md"))


def _logical_lines(text: str):
    """Lines with shell continuations (a trailing backslash) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def test_options_named_beside_a_command_exist():
    """Wherever README.md, a docs page or an experiment record shows `lmm-steer <command> ... --option`, the command has
    that option: a renamed or removed flag cannot linger in an example or a synopsis."""
    os.environ["COLUMNS"] = WIDTH
    from lmm_steer.cli import build_parser

    commands = dict(_commands(build_parser()))
    names = sorted(commands, key=len, reverse=True)  # "lmm-steer sae train" before "lmm-steer sae"
    checked = 0
    pages = _pages()
    assert DOC in pages and EXPERIMENTS / "README.md" in pages
    for doc in [README, *pages]:
        for line in _logical_lines(doc.read_text()):
            for name in names:
                at = line.find(name + " ")
                if at < 0:
                    continue
                rest = re.split(r"[`|;#]|&&", line[at + len(name):])[0]
                known = {s for a in commands[name]._actions for s in a.option_strings}
                named = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", rest))
                assert named <= known, f"{doc.relative_to(ROOT)}: {name} has no {sorted(named - known)}: {line.strip()}"
                checked += 1
                break
    assert checked >= 10


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    DOC.write_text(reference())
    print(f"wrote {DOC}")
