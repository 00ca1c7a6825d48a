"""``lmm-steer eval fix``: do clamps fix a scenes model's misrecognitions? Measured on ground truth.

The test questions are asked once, unsteered; every wrong colour, shape, count or existence answer
is a misrecognition. For each, the attribute values involved are read from the question and the
two answers ("red" amplified and "brown" suppressed for a colour said brown that is red; the asked
object's colour and shape amplified for a "no" to an object that is there, suppressed for a "yes"
to one that is not; the counted value amplified for an undercount, suppressed for an overcount).
Each value becomes features as a user of the server would choose them: the catalog's top search
hits for the word, clamped at the feature's calibrated value (or three times its largest
activation) to amplify and at 0 to suppress, on the image's positions by default (``amplify``:
``scale`` multiplies the feature where it already fires instead; ``transfer`` writes it where the
wrong value's feature fired, a swap: ``transferred``). With ``gate="asked"`` each edit is gated
(``where``) by the feature of the question's other named value, the one that picks out the asked
object ("the circle" for a colour, "the purple object" for a shape, the shape of "a yellow hexagon"
for its colour and back): the edit then acts only on the patches where that feature fires
(``asked_gates``); with ``gate="localised"`` every row's gates are the oracle's features (chosen from
ground truth on the selection split for how well their firing patches cover a value's objects), so
each row's edits act on the asked object wherever such a feature finds it. The question is then
asked again: fixed, unchanged, or changed into another wrong answer.

Rows of the same run: ``search`` (those edits, delta semantics), ``search-tested`` (of each value's
top hits, the one whose clamp most often makes the model say the value on a selection split's
questions, reading only the model's answers there: ``eval.tested``), ``search-paper`` (the same
edits as ``search``, paper semantics), ``random`` (as many random features at the same values: should
fix about nothing; with localised gates, on the same patches), ``oracle`` (for each value, the
feature whose firing patches best overlap the value's objects on a separate selection split:
``scenes localise``'s choice from ground truth, which separates "search found the wrong feature"
from "the feature is not causal"), and collateral: each
misrecognition's edits of ``search``, ``search-tested`` and ``oracle`` applied to a question of the
same type the model got right.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..concepts.resolve import steer_value
from ..engine import FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from ..scenes.evaluate import normalise, questions
from ..scenes.generate import COLOURS, SHAPES

FIX_TYPES = ("colour", "shape", "count", "exist")
METHODS = ("search", "search-tested", "search-paper", "random", "oracle")
# the rows whose edits are also applied to right answers: the automatic ones and the oracle
COLLATERAL_METHODS = ("search", "search-tested", "oracle")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Target:
    """One attribute value to push: ``key`` is ``"colour:red"`` or ``"shape:star"``; ``sign`` +1
    amplifies, -1 suppresses."""

    key: str
    sign: int


def _words(text: str) -> list[str]:
    """The colour and shape values named in ``text`` (plurals read as their shape)."""
    out = []
    for word in normalise(text).split():
        one = word if word in SHAPES else (word[:-2] if word.endswith("ses") else word.removesuffix("s"))
        if word in COLOURS:
            out.append(f"colour:{word}")
        elif one in SHAPES:
            out.append(f"shape:{one}")
    return out


def targets(item: dict, got: str) -> list[Target]:
    """What to amplify and suppress to turn ``got`` into the item's answer (empty: nothing to say)."""
    kind, truth, said = item["type"], normalise(item["answer"]), normalise(got)
    if kind in ("colour", "shape"):
        out = [Target(f"{kind}:{truth}", +1)]
        if said in (COLOURS if kind == "colour" else SHAPES) and said != truth:
            out.append(Target(f"{kind}:{said}", -1))
        return out
    asked = _words(item["question"])
    if kind == "exist":
        return [Target(k, +1 if truth == "yes" else -1) for k in asked]
    if kind == "count":
        want = COUNT_WORDS.index(truth) if truth in COUNT_WORDS else None
        have = COUNT_WORDS.index(said) if said in COUNT_WORDS else None
        if want is None:
            return []
        sign = +1 if have is None or have < want else -1
        if have is None and want == 0:
            sign = -1
        return [Target(k, sign) for k in asked]
    return []


@dataclass
class Case:
    """One misrecognition and the edits each method chose for it."""

    item: dict
    got: str
    targets: list[Target]
    edits: dict[str, list[FeatureEdit]] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)


def outcome(item: dict, got: str, again: str) -> str:
    if normalise(again) == normalise(item["answer"]):
        return "fixed"
    return "unchanged" if normalise(again) == normalise(got) else "other_wrong"


def search_edits(searcher, catalog, tgs: list[Target], per_value: int, strength: float = 1.0,
                 amplify: str = "clamp", gates: dict[str, int] | None = None) -> list[FeatureEdit]:
    """The top ``per_value`` search hits of each value's word, as ``feature_edit`` makes them; a
    value's edits are gated by ``gates[key]`` where given."""
    edits: dict[int, FeatureEdit] = {}
    for t in tgs:
        word = t.key.split(":", 1)[1]
        taken = 0
        for entry, _ in searcher.search(word, per_value + len(edits)):
            if entry.feature in edits or taken == per_value:
                continue
            edits[entry.feature] = feature_edit(catalog, entry.feature, t.sign, strength, amplify,
                                                (gates or {}).get(t.key))
            taken += 1
    return list(edits.values())


def top_hit(searcher, key: str) -> int | None:
    """The search's first feature for a value's word."""
    hits = searcher.search(key.split(":", 1)[1], 1)
    return hits[0][0].feature if hits else None


def asked_gates(item: dict, tgs: list[Target], choose) -> dict[str, int]:
    """Per target, the feature (``choose(key)``) of the first value the question names of the other
    attribute, the one that picks out the asked object; a target without one stays ungated."""
    named = _words(item["question"])
    gates = {}
    for t in tgs:
        kind = t.key.split(":", 1)[0]
        for key in named:
            if key.split(":", 1)[0] != kind and (g := choose(key)) is not None:
                gates[t.key] = g
                break
    return gates


def steering_value(catalog, feature: int) -> float:
    """The feature's calibrated value, else three times its largest activation (0: none known)."""
    entry = catalog.get(feature)
    value = steer_value(entry)[0] if entry is not None else None
    return float(value) if value is not None else 0.0


def feature_edit(catalog, feature: int, sign: int, strength: float = 1.0, amplify: str = "clamp",
                 where: int | None = None) -> FeatureEdit:
    """Suppress: clamp at 0. Amplify with ``"clamp"``: clamp at the steering value times ``strength``,
    wherever the scope reaches; with ``"scale"``: multiply the feature's own activation by
    ``strength``, so only where it already fires (it cannot paint a colour onto another object).
    ``where``: the edit's gate, if any."""
    if where == feature:  # a gate on the edited feature itself would only ever touch where it fires
        where = None
    if sign < 0:
        return FeatureEdit(feature, 0.0, where=where)
    if amplify == "scale":
        return FeatureEdit(feature, strength, "scale", where=where)
    return FeatureEdit(feature, strength * steering_value(catalog, feature), where=where)


def mapped_edits(chosen: dict[str, int], catalog, tgs: list[Target], strength: float = 1.0,
                 amplify: str = "clamp", gates: dict[str, int] | None = None,
                 strengths: dict[str, float] | None = None) -> list[FeatureEdit]:
    """Each value's one feature from a ``"colour:red" -> feature`` choice (the oracle's, or the tested
    search's), gated by ``gates[key]`` where given, at ``strengths[key]`` where given (a strength
    chosen with the feature), else ``strength``."""
    edits = {}
    for t in tgs:
        if t.key in chosen and chosen[t.key] not in edits:
            edits[chosen[t.key]] = feature_edit(catalog, chosen[t.key], t.sign, (strengths or {}).get(t.key, strength),
                                                amplify, (gates or {}).get(t.key))
    return list(edits.values())


def transferred(edits: list[FeatureEdit], catalog, strength: float = 1.0) -> list[FeatureEdit]:
    """``--amplify transfer``: each amplifying edit becomes a transfer from the case's (first)
    suppressed feature, at ``strength`` times the ratio of the two features' largest activations,
    so the right value's feature is written where the wrong value's fired, as strongly, relatively;
    the suppression stays. Without a suppressed feature (a "no" to an object that is there, an
    undercount) there is nothing to move from, and the case gets no edit."""
    suppressed = [e for e in edits if e.mode == "clamp" and e.value == 0.0]
    if not suppressed:
        return []

    def peak(f):
        return float(catalog.get(f).extras.get("max_activation") or 0.0) if catalog.get(f) else 0.0

    source = suppressed[0].feature
    source_peak = peak(source)
    return [e if e in suppressed else FeatureEdit(e.feature, strength * peak(e.feature) / source_peak, "transfer", source,
                                                  e.where)
            for e in edits if e in suppressed or source_peak > 0]


def random_edits(like: list[FeatureEdit], pool: list[int], rng: random.Random,
                 keep_gates: bool = False) -> list[FeatureEdit]:
    """``like`` with each feature it names (a transfer's source and a gate included, unless
    ``keep_gates``: then the edits stay on the same patches) replaced by a random one from ``pool``
    minus those, at ``like``'s values and modes."""
    named = list(dict.fromkeys([f for e in like for f in (e.feature, e.source, None if keep_gates else e.where)
                                if f is not None]))
    taken = set(named) | {e.where for e in like}
    choices = dict(zip(named, rng.sample([f for f in pool if f not in taken], len(named)), strict=True))
    return [FeatureEdit(choices[e.feature], e.value, e.mode, None if e.source is None else choices[e.source],
                        e.where if keep_gates or e.where is None else choices[e.where]) for e in like]


def pair_collateral(cases: list[Case], right: list[dict]) -> list[tuple[Case, dict]]:
    """Each misrecognition beside a correctly answered question of its type (in order, cycling)."""
    by_type = defaultdict(list)
    for item in right:
        by_type[item["type"]].append(item)
    seen = defaultdict(int)
    pairs = []
    for case in cases:
        pool = by_type.get(case.item["type"])
        if pool:
            pairs.append((case, pool[seen[case.item["type"]] % len(pool)]))
            seen[case.item["type"]] += 1
    return pairs


def ask(engine, data: Path, items: list[dict], steerings: list[SteeringSpec | None], max_tokens: int = 10) -> list[str]:
    """Greedy answers through the steering engine, one single-turn conversation per question."""
    reqs = []
    for item, steering in zip(items, steerings, strict=True):
        with Image.open(data / item["image"]) as im:
            image = im.convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
        reqs.append(GenerationRequest(messages=messages, images=[image], steering=steering,
                                      sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    return [r.text for r in engine.generate(reqs)] if reqs else []


def run(engine, catalog, searcher, data: Path, *, oracle: dict[str, int] | None = None,
        tested: dict[str, int] | None = None, tested_strengths: dict[str, float] | None = None,
        limit: int | None = None,
        types=FIX_TYPES, per_value: int = 1, scope: str = "image", seed: int = 0, strength: float = 1.0,
        amplify: str = "clamp", gate: str = "none") -> dict:
    if gate == "localised" and oracle is None:
        raise ValueError("gate 'localised' takes its gates from the oracle's choice: give oracle")
    items = questions(data, limit, types)
    first = ask(engine, data, items, [None] * len(items))
    cases, right = [], []
    for item, got in zip(items, first, strict=True):
        if normalise(got) == normalise(item["answer"]):
            right.append(item)
        else:
            cases.append(Case(item, got, targets(item, got)))
    rng = random.Random(seed)
    pool = [f for f in catalog.ids() if (catalog.get(f).extras.get("max_activation") or 0) > 0]
    # a transfer is built from the clamp-form edits (suppress wrong, amplify right) of each method
    base = "clamp" if amplify == "transfer" else amplify

    def final(edits):
        return transferred(edits, catalog, strength) if amplify == "transfer" else edits

    def gates(case, choose):
        if gate == "none":
            return None
        return asked_gates(case.item, case.targets, oracle.get if gate == "localised" else choose)

    search_gate = functools.cache(functools.partial(top_hit, searcher))  # one search per value word, not per case

    for case in cases:
        # a gate marks where the asked object is, chosen as each row chooses its features: search's
        # top hit, the tested choice (a feature that makes the model say "purple" fires on purple
        # things), the oracle's choice from ground truth
        case.edits["search"] = final(search_edits(searcher, catalog, case.targets, per_value, strength, base,
                                                  gates(case, search_gate)))
        case.edits["search-paper"] = case.edits["search"]
        # localised gates are given, not chosen by the row: the control keeps them and draws the edits
        case.edits["random"] = random_edits(case.edits["search"], pool, rng, keep_gates=gate == "localised")
        if tested is not None:
            case.edits["search-tested"] = final(mapped_edits(tested, catalog, case.targets, strength, base,
                                                             gates(case, tested.get), tested_strengths))
        if oracle is not None:
            case.edits["oracle"] = final(mapped_edits(oracle, catalog, case.targets, strength, base,
                                                      gates(case, oracle.get)))
    # paper semantics rewrites pre-activations and has neither transfers nor gates
    made = {"oracle": oracle is not None, "search-tested": tested is not None,
            "search-paper": amplify != "transfer" and gate == "none"}
    methods = [m for m in METHODS if made.get(m, True)]
    jobs = [(case, m) for case in cases for m in methods if case.edits[m]]
    specs = [SteeringSpec(case.edits[m], scope=scope, semantics="paper" if m == "search-paper" else "delta")
             for case, m in jobs]
    for (case, m), again in zip(jobs, ask(engine, data, [c.item for c, _ in jobs], specs), strict=True):
        case.answers[m] = again
    pairs = pair_collateral(cases, right)
    paired = [(m, c, item) for m in COLLATERAL_METHODS if m in methods for c, item in pairs if c.edits[m]]
    answers = ask(engine, data, [item for _, _, item in paired],
                  [SteeringSpec(c.edits[m], scope=scope) for m, c, _ in paired])
    collateral = {m: [] for m in COLLATERAL_METHODS if m in methods}
    for (m, _, item), again in zip(paired, answers, strict=True):
        collateral[m].append((item, again))
    return summarise(items, cases, methods, collateral) | {"scope": scope, "per_value": per_value, "strength": strength,
                                                           "amplify": amplify, "gate": gate, "seed": seed,
                                                           "data": str(data)}


def summarise(items, cases: list[Case], methods, collateral: dict[str, list[tuple[dict, str]]]) -> dict:
    """Counts per method (overall, per type, per difficulty tag) and the collateral damage: per
    method, the right answers its edits were applied to, each with the answer it then gave."""
    table = {}
    for m in methods:
        cells = defaultdict(lambda: {"n": 0, "fixed": 0, "unchanged": 0, "other_wrong": 0, "no_edit": 0})
        for case in cases:
            tags = case.item["difficulty"] or ["none"]
            keys = ["all", case.item["type"], *(f"tag:{t}" for t in tags)]
            result = outcome(case.item, case.got, case.answers[m]) if m in case.answers else "no_edit"
            for k in keys:
                cells[k]["n"] += 1
                cells[k][result] += 1
        table[m] = {k: {**v, "fixed_share": round(v["fixed"] / v["n"], 4)} for k, v in sorted(cells.items())}
    damage = {}
    for m, asked in collateral.items():
        wrong = [(item["type"], normalise(again) != normalise(item["answer"])) for item, again in asked]
        broken = sum(w for _, w in wrong)
        by_type = {t: {"n": sum(k == t for k, _ in wrong), "turned_wrong": sum(w for k, w in wrong if k == t)}
                   for t in sorted({k for k, _ in wrong})}
        damage[m] = {"n": len(asked), "turned_wrong": broken, "share": round(broken / len(asked), 4) if asked else 0.0,
                     "by_type": by_type}
    return {"questions": len(items), "misrecognitions": len(cases), "methods": table, "collateral": damage,
            "cases": [{**c.item, "got": c.got, "targets": [[t.key, t.sign] for t in c.targets],
                       "edits": {m: [edit_json(e) for e in es] for m, es in c.edits.items()},
                       "answers": c.answers} for c in cases]}


def edit_json(e: FeatureEdit) -> dict:
    """An edit as the API's steering feature, ready to send or to put in a preset."""
    return {k: v for k, v in e.record().items() if (k, v) != ("mode", "clamp")}  # clamp: the API's default mode


def markdown(result: dict) -> str:
    methods = result["methods"]
    keys = ["all", *[t for t in FIX_TYPES if t in methods["search"]],
            *sorted(k for k in methods["search"] if k.startswith("tag:"))]
    lines = ["| misrecognitions | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in keys:
        cells = []
        for m in methods:
            c = methods[m].get(k)
            cells.append(f"{c['fixed']}/{c['n']} fixed, {c['other_wrong']} other wrong" if c else "")
        lines.append(f"| {k} ({methods['search'][k]['n']}) | " + " | ".join(cells) + " |")
    lines.append("\nCollateral (each row's edits applied to correctly answered questions of the same type): "
                 + "; ".join(f"`{m}` turned {c['turned_wrong']} of {c['n']} wrong ({c['share']:.1%})"
                             for m, c in result["collateral"].items()) + ".")
    return "\n".join(lines) + "\n"

