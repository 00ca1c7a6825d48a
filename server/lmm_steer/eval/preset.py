"""``lmm-steer eval preset``: a steering preset's strength chosen on held-out questions, then
measured on others.

An edit that fixed one misrecognition (``eval fix``) was found at a value that turned that answer;
served as a preset it meets every request that names it. On the scenes model the
``cross-not-square`` preset (run 9's), as found, fixed 3 of 221 shape answers of a held-out split and broke
173 (experiments/fixes.md). So the preset's non-zero values are scaled by each factor of a fixed grid, the
selection split's questions are asked with each, and the factor with the most fixed minus broken
answers is kept (the smallest on a tie; none when no factor fixes more than it breaks). The test
split, another seed, is then asked unsteered, with the preset as found, and with the chosen
factor: the selection never sees the questions that report it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..engine import SteeringSpec
from ..scenes.evaluate import normalise, questions
from .fix import ask

SCALES = (0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
OUTCOMES = ("kept right", "fixed", "broken", "kept wrong")


def scaled(spec: SteeringSpec, factor: float) -> SteeringSpec:
    """The spec with every edit's value times ``factor`` (a suppression at 0 stays 0)."""
    return replace(spec, edits=[replace(e, value=e.value * factor) for e in spec.edits])


def outcome(answer: str, plain: str, steered: str) -> str:
    right = normalise(answer)
    return {(True, True): "kept right", (False, True): "fixed", (True, False): "broken",
            (False, False): "kept wrong"}[normalise(plain) == right, normalise(steered) == right]


def by_type(item: dict) -> tuple[str, ...]:
    return ("all", item["type"])


def tally(items: list[dict], plain: list[str], steered: list[str], groups=by_type) -> dict[str, dict]:
    """Outcome counts over all and by question type (``groups(item)``: the groups an item counts
    in), each with ``n``, ``net`` (fixed - broken) and the accuracy without and with the steering."""
    counts: dict[str, Counter] = {}
    for item, a, b in zip(items, plain, steered, strict=True):
        kind = outcome(item["answer"], a, b)
        for group in groups(item):
            counts.setdefault(group, Counter())[kind] += 1
    out = {}
    for group, c in counts.items():
        n = sum(c.values())
        out[group] = {**{k: c[k] for k in OUTCOMES}, "n": n, "net": c["fixed"] - c["broken"],
                      "accuracy_before": (c["kept right"] + c["broken"]) / n,
                      "accuracy_after": (c["kept right"] + c["fixed"]) / n}
    return out


def choose(by_scale: dict[float, dict]) -> float | None:
    """The factor with the most fixed minus broken over all questions; the smallest on a tie; None
    when none fixes more than it breaks."""
    best = max(by_scale, key=lambda s: (by_scale[s]["all"]["net"], -s), default=None)
    return best if best is not None and by_scale[best]["all"]["net"] > 0 else None


def run(engine, spec: SteeringSpec, select: Path, data: Path, *, types=("colour", "shape"), scales=SCALES,
        select_limit: int | None = None, limit: int | None = None, progress=None) -> dict:
    chosen_on = questions(select, select_limit, types)
    plain = ask(engine, select, chosen_on, [None] * len(chosen_on))
    by_scale = {}
    for factor in scales:
        steered = ask(engine, select, chosen_on, [scaled(spec, factor)] * len(chosen_on))
        by_scale[factor] = tally(chosen_on, plain, steered)
        if progress:
            progress(factor, by_scale[factor]["all"])
    chosen = choose(by_scale)
    items = questions(data, limit, types)
    plain = ask(engine, data, items, [None] * len(items))
    test = {"as found (x1)": tally(items, plain, ask(engine, data, items, [spec] * len(items)))}
    if chosen is not None and chosen != 1.0:
        test[f"chosen (x{chosen:g})"] = tally(items, plain, ask(engine, data, items, [scaled(spec, chosen)] * len(items)))
    return {"select": str(select), "data": str(data), "types": list(types), "select_questions": len(chosen_on),
            "questions": len(items), "scales": {f"{s:g}": t for s, t in by_scale.items()},
            "chosen": chosen, "test": test}


def calibrated_preset(preset, factor: float, result: dict, name: str) -> dict:
    """The preset with its values scaled by ``factor``, described by where the factor was chosen."""
    steering = preset.steering.model_dump(exclude_none=True)
    steering["features"] = [{**f, "value": round(f["value"] * factor, 4)} for f in steering["features"]]
    row = result["scales"][f"{factor:g}"]["all"]
    description = (f"{preset.name} with its values x{factor:g}, the factor with the most fixed minus broken "
                   f"answers ({row['fixed']} fixed, {row['broken']} broken) on {result['select_questions']} "
                   f"{'/'.join(result['types'])} questions of {Path(result['select']).name} (`eval preset`). "
                   f"As found: {preset.description}")
    return {"name": name, "description": description[:500], "steering": steering}


def markdown(result: dict) -> str:
    head = "| {} | " + " | ".join(OUTCOMES) + " | net | accuracy without -> with |\n|---" + "|---" * (len(OUTCOMES) + 2) + "|\n"

    def line(label: str, cell: dict) -> str:
        return (f"| {label} ({cell['n']}) | " + " | ".join(str(cell[k]) for k in OUTCOMES) +
                f" | {cell['net']:+d} | {cell['accuracy_before']:.3f} -> {cell['accuracy_after']:.3f} |\n")

    out = head.format(f"selection: {Path(result['select']).name}, factor")
    for factor, cells in result["scales"].items():
        out += line(f"x{factor}", cells["all"])
    chosen = result["chosen"]
    out += ("\nChosen factor: " + (f"x{chosen:g}" if chosen is not None else
                                   "none (no factor fixes more than it breaks)") + "\n\n")
    out += head.format(f"test: {Path(result['data']).name}")
    for label, cells in result["test"].items():
        types = sorted(g for g in cells if g != "all")
        for group in ["all", *(types if len(types) > 1 else [])]:
            out += line(f"{label}, {group}", cells[group])
    return out
