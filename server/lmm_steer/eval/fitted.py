"""``lmm-steer eval fitted``: a fitted preset on a held-out split beside its controls, all from
the same run: the base model, random features at the same modes, values and scope (firing about
as often as the preset's, where the catalog knows each feature's rate), a prompt
asking the model to look carefully, and the difference-of-means direction ``preset fit`` fitted
and chose on the same data. Per question type and difficulty: accuracy, fixed, broken, net, and
the net share of the base model's errors."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import torch

from ..engine import SteeringSpec
from ..fit.answers import SplitAnswers
from .preset import tally

LOOK_CAREFULLY = ("Look carefully at the colour and the shape of every object in the image, and at which objects "
                  "are there, before you answer.")
ROWS = ("preset", "random", "prompting", "diffmean")


def by_type_and_difficulty(item: dict) -> tuple[str, ...]:
    return ("all", item["type"], *(f"tag:{t}" for t in item.get("difficulty") or ["none"]))


def random_like(spec: SteeringSpec, pool: list[int], rng: random.Random, density: dict[int, float] | None = None,
                near: int = 10) -> SteeringSpec:
    """The same edits (modes, values, gates, conditions, scope) on features drawn from ``pool``, none of
    the spec's own, each feature standing in for one of the spec's wherever that one is edited.

    With ``density`` (each feature's firing rate), each edit's feature is drawn from the ``near``
    pool features whose rate is closest to its own on a log scale: a scaled feature acts only where
    it fires, so a control drawn from rarely firing features would change nothing by construction."""
    own = {e.feature for e in spec.edits}
    free = [f for f in pool if f not in own]
    drawn: dict[int, int] = {}  # one stand-in per feature: a feature edited in several slots keeps that shape
    for edit in spec.edits:
        if edit.feature in drawn:
            continue
        left = [f for f in free if f not in drawn.values()]
        rate = (density or {}).get(edit.feature)
        if rate and rate > 0:
            rated = [f for f in left if (density.get(f) or 0) > 0]
            left = sorted(rated, key=lambda f: abs(math.log(density[f] / rate)))[:near] or left
        drawn[edit.feature] = rng.choice(left)
    return replace(spec, edits=[replace(e, feature=drawn[e.feature]) for e in spec.edits])


def summary(result: dict) -> dict:
    """Each group's counts, with ``error_reduction``: net over the base model's wrong answers."""
    out = {}
    for group, r in result.items():
        errors = r["fixed"] + r["kept wrong"]
        out[group] = {**r, "error_reduction": round(r["net"] / errors, 4) if errors else None}
    return out


def run(engine, root: Path, items: list[dict], spec: SteeringSpec, *, pool: list[int], diffmean: dict | None,
        seed: int = 0, rows=ROWS, random_draws: int = 1, density: dict[int, float] | None = None,
        progress=None) -> dict:
    steerings = {"base": None, "preset": spec}
    for draw in range(random_draws):  # the same edits on other features: random, random-2, ...
        steerings["random" + (f"-{draw + 1}" if draw else "")] = random_like(spec, pool, random.Random(seed + draw),
                                                                                density)
    if diffmean:
        steerings["diffmean"] = torch.tensor(diffmean["vector"]) * diffmean["strength"]
    names = [n for n in steerings if n == "base" or n.split("-")[0] in rows]
    said = SplitAnswers(engine, root)(items, [steerings[n] for n in names])
    answers = dict(zip(names, said, strict=True))
    base = answers.pop("base")
    if "prompting" in rows:
        answers["prompting"] = SplitAnswers(engine, root, system=LOOK_CAREFULLY)(items, [None])[0]
    out = {"questions": len(items), "base_right": tally(items, base, base)["all"]["kept right"], "rows": {},
           "random_features": {n: [e.feature for e in s.edits] for n, s in steerings.items() if n.startswith("random")
                               and n in answers},
           "random_matched": "firing rate" if density else "none"}
    for name, got in answers.items():
        out["rows"][name] = summary(tally(items, base, got, by_type_and_difficulty))
        if progress:
            progress(name, out["rows"][name]["all"])
    draws = [r for n, r in out["rows"].items() if n.split("-")[0] == "random"]
    if len(draws) > 1:  # one draw is one sample of the control; the mean over draws is its expected effect
        out["random_mean"] = {g: {"draws": len(draws), "accuracy_before": draws[0][g]["accuracy_before"],
                                  "accuracy_after": round(sum(d[g]["accuracy_after"] for d in draws) / len(draws), 4),
                                  "net": round(sum(d[g]["net"] for d in draws) / len(draws), 2)}
                              for g in draws[0] if not g.startswith("tag:")}
    return out


def markdown(result: dict) -> str:
    groups = [g for g in next(iter(result["rows"].values()), {}) if not g.startswith("tag:")]
    tags = sorted(g for g in next(iter(result["rows"].values()), {}) if g.startswith("tag:"))
    lines = ["| row | group | n | accuracy base -> row | fixed | broken | net | net / base errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name, cells in result["rows"].items():
        for group in [*groups, *tags]:
            c = cells[group]
            share = f"{c['error_reduction']:+.1%}" if c["error_reduction"] is not None else ""
            lines.append(f"| {name} | {group} | {c['n']} | {c['accuracy_before']:.3f} -> {c['accuracy_after']:.3f} | "
                         f"{c['fixed']} | {c['broken']} | {c['net']:+d} | {share} |")
    for group, c in (result.get("random_mean") or {}).items():
        lines.append(f"| random, mean of {c['draws']} draws | {group} | | {c['accuracy_before']:.3f} -> "
                     f"{c['accuracy_after']:.3f} | | | {c['net']:+.2f} | |")
    return "\n".join(lines) + "\n"
