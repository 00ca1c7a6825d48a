"""``lmm-steer sae effects``: what clamping a feature on the image makes a scenes model say.

Each candidate feature is clamped on scope ``image`` at a grid of values, and the colour and shape
questions about a calibration split's scenes are asked again (greedy, as a caller asks: see
``effects.clamps``). Read per clamp:

* ``says``: the answers it gives to questions of a type (colour, shape), as shares of them;
* the rate for a value word: of the questions of its type not already answered with it unsteered,
  the share now answered with it (``eval.tested.effect_rates``);
* ``kept_other``: of the other type's questions answered right unsteered, the share still right
  (what the clamp breaks).

Candidates, per colour and shape value: the top search hits of its word (by meaning), the features
whose firing patches best overlap its objects on the split (``scenes.localise``'s IoU, from the
split's ground-truth masks; calibration reads this split only), and the features whose decoder
directions are nearest the best-overlapping one's. Each is screened at one value on a few scenes;
each value's best few by what the screen measured, drawn from every screened candidate (a search
hit for "red" that turns shapes into triangles is a triangle finalist), are then measured over the
grid on other scenes. Where a value's rows will be conditioned on its question type (``leaks``,
read first by ``sae effects``), a clamp's breakage of the other type counts only on the share of
prompts its condition fires on (``rank.under_condition``).

A feature's effect is the word it turns most answers into (at any value), and the value chosen for
it: the smallest grid value reaching the best rate among those keeping ``kept_bound`` of the other
type's answers, when that rate reaches ``rate_target``; otherwise (keeping that much costs the
effect, as painting every object red loses "the purple object" a shape question names) the value
with the best rate's lower bound times kept (``rank.strength``). Its catalog row gets that effect
and a ``steer`` record with that value and scope ``image``, which concept steering uses
(``concepts.resolve``) and ranks by (``concepts.semantic``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine import FeatureEdit, SteeringSpec
from ..eval.tested import VALUE_KEYS, effect_rates
from ..scenes.evaluate import normalise, questions
from ..scenes.generate import COLOURS, SHAPES
from .clamps import group_by_image
from .rank import rank_key, strength, under_condition

TYPES = ("colour", "shape")
WORD_TYPE = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}
OTHER = {"colour": "shape", "shape": "colour"}
GRID = (50.0, 75.0, 100.0, 150.0)
SCOPE = "image"


@dataclass
class EffectConfig:
    grid: tuple[float, ...] = GRID
    screen_value: float = 100.0  # mid-grid: strong enough to show an effect, weak enough to keep most answers
    hits: int = 8  # search hits per value word
    localised: int = 3  # features per value by patch IoU
    localise_scenes: int = 20  # scenes whose patches the IoU is measured on
    neighbours: int = 2  # per value, features whose decoder directions are nearest its best-localised one's
    screen_scenes: int = 2  # scenes each candidate is screened on
    finalists: int = 2  # per value, the best screened features measured over the grid
    grid_scenes: int = 5  # other scenes the finalists are measured on
    kept_bound: float = 0.9  # share of the other type's right answers a chosen value should keep
    rate_target: float = 0.8  # share of questions a chosen value should turn into its word
    keys: tuple[str, ...] = VALUE_KEYS
    # question type -> share of the other types' prompts its condition fires on, for the types whose
    # rows will be conditioned (``effects.conditions``; empty: none)
    leaks: dict[str, float] = field(default_factory=dict)


@dataclass
class Tally:
    """One clamp's answers on a set of questions, against the unsteered answers."""

    said: dict[str, list[str]] = field(default_factory=dict)  # type -> steered answers (normalised)
    plain: dict[str, list[str]] = field(default_factory=dict)  # type -> unsteered answers (normalised)
    truth: dict[str, list[str]] = field(default_factory=dict)  # type -> right answers

    def add(self, item: dict, unsteered: str, steered: str) -> None:
        kind = item["type"]
        self.said.setdefault(kind, []).append(normalise(steered))
        self.plain.setdefault(kind, []).append(normalise(unsteered))
        self.truth.setdefault(kind, []).append(normalise(item["answer"]))

    def rate(self, word: str) -> tuple[float, int]:
        """(share turned into ``word``, questions of its type not already answered ``word``)."""
        kind = WORD_TYPE[word]
        said, plain = self.said.get(kind, []), self.plain.get(kind, [])
        n = sum(p != word for p in plain)
        return (effect_rates([said], plain, word)[0] if n else 0.0), n

    def kept(self, kind: str) -> tuple[float, int]:
        """(share of ``kind``'s right unsteered answers still right, how many were right)."""
        pairs = [(s, t) for s, p, t in zip(self.said.get(kind, []), self.plain.get(kind, []), self.truth.get(kind, []),
                                           strict=True) if p == t]
        return (sum(s == t for s, t in pairs) / len(pairs) if pairs else 1.0), len(pairs)

    def says(self, kind: str, floor: float = 0.05) -> dict[str, float]:
        """The answers given to ``kind``'s questions, as shares, those of at least ``floor``."""
        said = self.said.get(kind, [])
        counts = Counter(said)
        return {w: round(c / len(said), 4) for w, c in counts.most_common() if c / len(said) >= floor} if said else {}


def clamp(feature: int, value: float) -> SteeringSpec:
    return SteeringSpec([FeatureEdit(feature, float(value))], scope=SCOPE)


# -- candidates ---------------------------------------------------------------------------------

def search_candidates(searcher, keys, hits: int) -> dict[str, list[int]]:
    """Each value's top ``hits`` search hits for its word."""
    return {key: [e.feature for e, _ in searcher.search(key.split(":", 1)[1], hits)] for key in keys}


def localised_candidates(patches: list[tuple[torch.Tensor, dict[str, np.ndarray]]], per_value: int) -> dict[str, list[int]]:
    """Per value, the ``per_value`` features whose firing patches best overlap its objects' patches
    (IoU over the scenes given: ``[patches, latents]`` activations and ``value -> bool [patches]``)."""
    from ..scenes.localise import iou

    if not patches:
        return {}
    fired = torch.cat([a > 0 for a, _ in patches])
    keys = sorted({k for _, lab in patches for k in lab})
    out = {}
    for key in keys:
        truth = torch.from_numpy(np.concatenate([lab.get(key, np.zeros(len(a), bool)) for a, lab in patches]))
        if truth.any():
            scores = iou(fired, truth)
            out[key] = [int(f) for f in scores.argsort(descending=True)[:per_value] if scores[f] > 0]
    return out


def decoder_neighbours(sae, seeds: dict[str, list[int]], per_value: int) -> dict[str, list[int]]:
    """Per value, the ``per_value`` features whose decoder directions are nearest (cosine) to that of
    its first seed feature: a clamp adds a decoder direction, so these push where it pushes."""
    if sae is None or per_value <= 0:
        return {}
    w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    out = {}
    for key, features in seeds.items():
        if features:
            sims = w @ w[features[0]]
            sims[features[0]] = -math.inf
            out[key] = sims.topk(per_value).indices.tolist()
    return out


def scene_patches(answerer, data: Path, scenes: int, items_by_image: dict[str, list[dict]]):
    """``[(activations [patches, latents], value -> bool [patches])]`` for the split's first
    ``scenes`` scenes, from the answerer's own pass over each image where it makes one (else from
    the engine's inspection of the base view)."""
    from ..scenes.localise import patch_activations, scene_masks, value_patches

    out = []
    for file, masks in scene_masks(data)[:scenes]:
        if hasattr(answerer, "prepare_prefix"):
            entry = answerer.prepare_prefix(data, file, items_by_image.get(file) or [])
            if entry.base_patches is None:
                return []
            acts, (rows, cols) = entry.base_patches, entry.grid
        else:
            acts, rows, cols = patch_activations(answerer.engine, data / file)
        out.append((acts, value_patches(masks, rows, cols)))
    return out


# -- measuring ----------------------------------------------------------------------------------

def tally_specs(answerer, data: Path, items: list[dict], unsteered: list[str], specs: list[SteeringSpec]) -> list[Tally]:
    said = answerer.answers(data, items, specs)
    out = []
    for answers in said:
        t = Tally()
        for item, plain, got in zip(items, unsteered, answers, strict=True):
            t.add(item, plain, got)
        out.append(t)
    return out


def word_effect(tallies: dict[float, Tally], word: str, kept_bound: float, rate_target: float = 0.8) -> dict:
    """A feature's effect toward ``word`` over its grid (``value -> Tally``). Where some value keeps
    ``kept_bound`` of the other type's right answers and still turns ``rate_target`` of the
    questions, the smallest value reaching the best rate among those; otherwise keeping that much
    costs the effect, and the value is the frontier's best trade, the best ``rank.strength`` (rate's
    lower bound times kept; the smaller value on a tie)."""
    kind = WORD_TYPE[word]
    rows = []
    for value, t in sorted(tallies.items()):
        rate, n = t.rate(word)
        kept, n_other = t.kept(OTHER[kind])
        rows.append({"value": value, "rate": round(rate, 4), "n": n, "kept_other": round(kept, 4), "n_other": n_other})
    admissible = [r for r in rows if r["kept_other"] >= kept_bound]
    best = max((r["rate"] for r in admissible), default=0.0)
    if admissible and best >= rate_target:
        chosen = next(r for r in admissible if r["rate"] == best)
    else:
        top = max(round(strength(r), 4) for r in rows)
        chosen = next(r for r in rows if round(strength(r), 4) == top)
    met = chosen["rate"] >= rate_target and chosen["kept_other"] >= kept_bound
    return {**chosen, "word": word, "type": kind, "kept_bound_met": chosen["kept_other"] >= kept_bound,
            "targets_met": met, "grid": [{k: r[k] for k in ("value", "rate", "kept_other")} for r in rows]}


def feature_effect(tallies: dict[float, Tally], words, kept_bound: float, prefer: str | None = None,
                   rate_target: float = 0.8) -> dict:
    """What a feature makes the model say: the word it turns most questions into at any value of its
    grid (by the rate's lower bound; a tie goes to ``prefer``, the word it was a candidate for), with
    that word's effect (``word_effect``) and the answers the chosen clamp gives."""
    from .rank import lower_bound

    def reach(word):
        return max(lower_bound(*t.rate(word)) for t in tallies.values())

    word = max(words, key=lambda w: (round(reach(w), 4), w == prefer))
    best = word_effect(tallies, word, kept_bound, rate_target)
    t = tallies[best["value"]]
    return {**best, "says": t.says(best["type"]), "says_other": t.says(OTHER[best["type"]])}


def screen_strength(t: Tally, word: str, cfg: EffectConfig) -> float:
    """How strongly a screened clamp steers to ``word`` (``rank.strength``), its breakage of the
    other type counted under its type's condition where the rows will have one (``cfg.leaks``)."""
    effect = word_effect({cfg.screen_value: t}, word, cfg.kept_bound, cfg.rate_target)
    leak = cfg.leaks.get(effect["type"])
    return strength(effect if leak is None else under_condition(effect, leak))


def tally_json(t: Tally) -> dict:
    return {"said": t.said, "plain": t.plain, "truth": t.truth}


def tally_of(d: dict) -> Tally:
    return Tally(d["said"], d["plain"], d["truth"])


def effects_of(tallies: dict[int, dict[float, Tally]], stages: dict[int, tuple[str, int]], candidates: dict,
               cfg: EffectConfig) -> dict[int, dict]:
    """Each feature's effect from its tallies (``feature -> value -> Tally``); ``stages``: per feature,
    the stage it was last measured in and on how many scenes."""
    words = [k.split(":", 1)[1] for k in cfg.keys]
    prefer = {f: key.split(":", 1)[1] for key, fs in reversed(list(candidates.items())) for f in fs}
    out = {}
    for f in sorted(tallies):
        effect = feature_effect(tallies[f], words, cfg.kept_bound, prefer.get(f), cfg.rate_target)
        effect["stage"], effect["scenes"] = stages[f]
        out[f] = effect
    return out


def measure_effects(answerer, searcher, data: Path, cfg: EffectConfig, *, progress=None,
                    localised: dict[str, list[int]] | None = None) -> dict:
    """``{"features": {feature: effect}, "candidates": {key: [features]}, "screen": {...}, "timing": {...}}``
    (see the module docstring); ``localised`` overrides the IoU candidates (None: measured here)."""
    t0 = time.perf_counter()
    items = questions(data, None, TYPES)
    by_image = group_by_image(items)
    images = sorted(by_image)
    items_by_image = {im: [items[i] for i in by_image[im]] for im in images}
    screen_images = images[:cfg.screen_scenes]
    grid_images = images[cfg.screen_scenes:cfg.screen_scenes + cfg.grid_scenes]

    def subset(names):
        return [q for im in names for q in items_by_image[im]]

    candidates = search_candidates(searcher, cfg.keys, cfg.hits)
    if localised is None and cfg.localised:
        patches = scene_patches(answerer, data, cfg.localise_scenes, items_by_image)
        localised = localised_candidates(patches, cfg.localised)
    near = decoder_neighbours(getattr(getattr(answerer, "engine", None), "sae", None), localised or {}, cfg.neighbours)
    for source in (localised or {}, near):
        for key, features in source.items():
            if key in candidates:
                candidates[key] += [f for f in features if f not in candidates[key]]
    t_candidates = time.perf_counter()

    def report(stage, done, total):
        if progress:
            progress(stage, done, total, time.perf_counter() - t0)

    # screen: every candidate once, at one value, on a few scenes
    screen_items = subset(screen_images)
    screen_plain = answerer.answers(data, screen_items, [None])[0]
    unique = sorted({f for fs in candidates.values() for f in fs})
    screened: dict[int, Tally] = {}
    step = 16
    for start in range(0, len(unique), step):
        chunk = unique[start:start + step]
        for f, t in zip(chunk, tally_specs(answerer, data, screen_items, screen_plain,
                                           [clamp(f, cfg.screen_value) for f in chunk]), strict=True):
            screened[f] = t
        report("screen", min(start + step, len(unique)), len(unique))
    t_screen = time.perf_counter()

    # finalists: each value's best screened features (its own candidates first on a tie), measured
    # over the grid on other scenes
    finalists: dict[str, list[int]] = {}
    for key in cfg.keys:
        word = key.split(":", 1)[1]
        pool = candidates[key] + [f for f in unique if f not in candidates[key]]
        scored = [(screen_strength(screened[f], word, cfg), f) for f in pool]
        finalists[key] = [f for s, f in sorted(scored, key=lambda sf: (-sf[0], pool.index(sf[1])))
                          if s > 0][:cfg.finalists]
    measured = sorted({f for fs in finalists.values() for f in fs})
    grid_items = subset(grid_images)
    grid_plain = answerer.answers(data, grid_items, [None])[0] if grid_items else []
    jobs = [(f, v) for f in measured for v in cfg.grid]
    grid: dict[int, dict[float, Tally]] = {f: {} for f in measured}
    step = 16
    for start in range(0, len(jobs), step):
        chunk = jobs[start:start + step]
        for (f, v), t in zip(chunk, tally_specs(answerer, data, grid_items, grid_plain, [clamp(f, v) for f, v in chunk]),
                             strict=True):
            grid[f][v] = t
        report("grid", min(start + step, len(jobs)), len(jobs))
    t_grid = time.perf_counter()

    tallies = {f: {cfg.screen_value: t} for f, t in screened.items()} | grid
    stages = {f: ("grid", len(grid_images)) if f in grid else ("screen", len(screen_images)) for f in tallies}
    features = effects_of(tallies, stages, candidates, cfg)
    return {"features": features, "candidates": candidates, "finalists": finalists, "stages": stages,
            "tallies": {f: {v: tally_json(t) for v, t in by_value.items()} for f, by_value in tallies.items()},
            "questions": {"screen": len(screen_items), "grid": len(grid_items)},
            "timing": {"candidates_s": round(t_candidates - t0, 1), "screen_s": round(t_screen - t_candidates, 1),
                       "grid_s": round(t_grid - t_screen, 1), "total_s": round(t_grid - t0, 1),
                       "clamps": len(unique) + len(jobs)}}


def catalog_row(feature: int, effect: dict, meta: dict) -> dict:
    """A catalog row (merged over the catalog by ``serve``): the measured effect, and where it steers
    to a word, the ``steer`` record concept steering reads."""
    out = {"value": effect["value"], "scope": SCOPE, "best": effect["word"] if effect["rate"] > 0 else None,
           "type": effect["type"], "rate": effect["rate"], "n": effect["n"], "kept_other": effect["kept_other"],
           "n_other": effect["n_other"], "kept_bound_met": effect["kept_bound_met"],
           "targets_met": effect["targets_met"], "says": effect["says"],
           "says_other": effect["says_other"], "grid": effect["grid"], "stage": effect["stage"],
           "scenes": effect["scenes"], **meta}
    row = {"feature": feature, "effect": out}
    if effect["rate"] > 0:
        row["steer"] = {"value": effect["value"], "scope": SCOPE, "source": "effects", "word": effect["word"],
                        "rate": effect["rate"], "kept_other": effect["kept_other"]}
    return row


def markdown(result: dict, rows: list[dict]) -> str:
    """Per value, the catalog row search ranks first for its word (``rows``: ``catalog_row``s, with
    their conditions where they have them) and the point it steers at."""
    lines = ["| value | feature | clamp | when | rate | n | other type kept | stage |",
             "|---|---|---|---|---|---|---|---|"]
    by_word: dict[str, list[dict]] = {}
    for row in rows:
        if "steer" in row:
            by_word.setdefault(row["steer"]["word"], []).append(row)
    for key in VALUE_KEYS:
        word = key.split(":", 1)[1]
        ranked = sorted(by_word.get(word, []),
                        key=lambda r: (tuple(-k for k in rank_key(r["effect"], r["steer"])), r["feature"]))
        if not ranked:
            lines.append(f"| {word} | none | | | | | | |")
            continue
        e, steer = ranked[0]["effect"], ranked[0]["steer"]
        lines.append(f"| {word} | {ranked[0]['feature']} | {steer['value']:g} | {steer.get('when', '')} | "
                     f"{steer['rate']:.2f} | {e['n']} | {steer['kept_other']:.2f} | {e['stage']} |")
    t = result["timing"]
    lines.append(f"\n{t['clamps']} clamps in {t['total_s']:.0f} s (candidates {t['candidates_s']:.0f} s, screen "
                 f"{t['screen_s']:.0f} s, grid {t['grid_s']:.0f} s).")
    return "\n".join(lines) + "\n"
