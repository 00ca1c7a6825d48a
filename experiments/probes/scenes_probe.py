"""What the scenes-model probes share: their common options, the served scenes model's engine, and
the record each writes. Imported by the probes beside it (run as `python experiments/probes/NAME.py`,
which puts this folder on the path)."""

from __future__ import annotations

import argparse
import json
import re

import torch

from lmm_steer.engine import EngineConfig
from lmm_steer.eval.preset import tally
from lmm_steer.scenes.commands import scene_engine

MODEL = "builtin:scenes-llava-next"
NAMED = {"colour": re.compile(r"What colour is the (\w+)\?"), "shape": re.compile(r"What shape is the (\w+) object\?")}


def named_value(item: dict) -> str:
    """The value a colour or shape question names: "hexagon" in "What colour is the hexagon?"."""
    return NAMED[item["type"]].match(item["question"]).group(1)


def named(item: dict) -> str:
    """A question's label by the value it names ("colour about hexagon"); other types kept whole."""
    return item["type"] if item["type"] not in NAMED else f"{item['type']} about {named_value(item)}"


def parser(doc: str) -> argparse.ArgumentParser:
    """A probe's parser (its docstring's first paragraph) with ``--threads`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="write the record here")
    return p


def engine(threads: int, **config):
    """The scenes model with its SAE, on ``threads`` CPU threads."""
    torch.set_num_threads(threads)
    return scene_engine(MODEL, None, None, None, EngineConfig(max_batch=16, max_seq_len=512, **config))


def tally_table(items: list[dict], base: list[str], said: dict[str, list[str]], types: tuple[str, ...]) -> dict:
    """Each steering's answers (``said``: name -> answers) against the unsteered ``base``: printed
    as a table (fixed, broken, net; fixed / broken per question type) and returned as ``tally``s."""
    out = {}
    print("| steering | fixed | broken | net | " + " | ".join(types) + " |\n" + "|---" * (4 + len(types)) + "|")
    for name, got in said.items():
        t = out[name] = tally(items, base, got)
        print(f"| {name} | {t['all']['fixed']} | {t['all']['broken']} | {t['all']['net']:+d} | "
              + " | ".join(f"{t[k]['fixed']} / {t[k]['broken']}" for k in types) + " |")
    return out


def save(path: str | None, record: dict) -> int:
    """Write ``record`` to ``path`` when one is given; the probe's exit status."""
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    return 0
