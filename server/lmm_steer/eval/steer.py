"""``lmm-steer eval steer``: does steering by a named concept work, and does the text stay fluent?

For each concept of a fixed list and each of its neutral prompts, four conditions run in the same
process on the same model: ``unsteered``; ``prompting`` (a system prompt asking to write about the
concept: AxBench's strongest baseline); ``recipe`` (the README's: the top lexical search hit
clamped at three times its largest activation); ``concept`` (``steering.concepts``: features
found by meaning, clamped at their calibrated values). Every output gets the offline judgements
of ``measures`` (shown, degenerate), the plain model's log-probability per token (fluency), and
its embedding similarity to the concept; an OpenAI-compatible judge, when given, adds AxBench's
0-2 concept and fluency scores. A concept succeeds in a condition when it shows in at least two
thirds of the prompts and more often than unsteered.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..concepts.calibrate import completion_logprobs
from ..concepts.resolve import CALIBRATED_SCOPE, RECIPE_TIMES_MAX, ConceptNotFound, resolve_concept
from ..engine import FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from .measures import degenerate, shows

CONDITIONS = ("unsteered", "prompting", "recipe", "concept")
PROMPTING_SYSTEM = "Whatever you are asked, write about {concept}."
HELD_OUT = Path(__file__).with_name("concepts_heldout.json")
DEV = Path(__file__).with_name("concepts_dev.json")


@dataclass
class ConceptSet:
    concepts: dict[str, list[str]]  # concept -> the words that count as it showing
    prompts: list[str]


def load_concepts(path: str | Path) -> ConceptSet:
    data = json.loads(Path(path).read_text())
    return ConceptSet(dict(data["concepts"]), list(data["prompts"]))


@dataclass
class Record:
    concept: str
    condition: str
    prompt: str
    text: str
    features: list[dict] = field(default_factory=list)
    shown: bool = False
    degenerate: bool = False
    fluency: float = 0.0
    similarity: float = 0.0
    judge: dict | None = None


def _requests(concept: str, condition: str, prompts: list[str], catalog, index, max_tokens: int, strength: float,
              max_features: int, temperature: float = 0.0, seed: int = 0):
    """The requests of one concept under one condition, and the features they edit."""
    steering, features, system = None, [], None
    if condition == "prompting":
        system = PROMPTING_SYSTEM.format(concept=concept)
    elif condition == "recipe":
        hits = catalog.search(concept, 1)
        if hits:
            entry = hits[0][0]
            value = RECIPE_TIMES_MAX * float(entry.extras.get("max_activation") or 0.0)
            features = [{"id": entry.feature, "value": round(value, 4)}]
    elif condition == "concept":
        try:
            chosen = resolve_concept(index, concept, strength, max_features)
        except ConceptNotFound:
            chosen = []
        features = [{"id": c.feature, "value": c.value} for c in chosen]
    if features:
        steering = SteeringSpec([FeatureEdit(f["id"], f["value"]) for f in features],
                                scope=CALIBRATED_SCOPE if condition == "concept" else None)
    reqs = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        # the same seed per prompt in every condition: conditions differ by their steering alone
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + prompts.index(p))
        reqs.append(GenerationRequest(messages=messages, steering=steering, sampling=sampling))
    return reqs, features


def run(engine, catalog, index, concepts: ConceptSet, conditions=CONDITIONS, *, max_tokens: int = 40,
        strength: float = 1.0, max_features: int = 1, judge=None, temperature: float = 0.0,
        seed: int = 0) -> list[Record]:
    records: list[Record] = []
    reqs = []
    for concept in concepts.concepts:
        for condition in conditions:
            batch, features = _requests(concept, condition, concepts.prompts, catalog, index, max_tokens, strength,
                                        max_features, temperature, seed)
            reqs += batch
            records += [Record(concept, condition, p, "", features) for p in concepts.prompts]
    results = engine.generate(reqs)
    fluency = completion_logprobs(engine.loaded, [r.prompt for r in records], [res.token_ids for res in results])
    texts = [res.text for res in results]
    out_vecs = index.embedder.encode(texts)
    concept_vecs = dict(zip(concepts.concepts, index.embedder.encode(list(concepts.concepts)), strict=True))
    for rec, text, fl, vec in zip(records, texts, fluency, out_vecs, strict=True):
        rec.text, rec.fluency = text, round(fl, 4)
        rec.shown = shows(text, concepts.concepts[rec.concept])
        rec.degenerate = degenerate(text)
        rec.similarity = round(float(vec @ concept_vecs[rec.concept]), 4)
        if judge is not None:
            rec.judge = judge.score(rec.concept, rec.prompt, text)
    return records


def summarise(records: list[Record]) -> dict:
    """Per concept and condition, and overall per condition (pure counting)."""
    per: dict[str, dict[str, dict]] = {}
    for r in records:
        cell = per.setdefault(r.concept, {}).setdefault(r.condition, {
            "n": 0, "shown": 0, "degenerate": 0, "fluency": 0.0, "similarity": 0.0, "judge_concept": [],
            "judge_fluency": [], "features": r.features})
        cell["n"] += 1
        cell["shown"] += r.shown
        cell["degenerate"] += r.degenerate
        cell["fluency"] += r.fluency
        cell["similarity"] += r.similarity
        if r.judge:
            cell["judge_concept"].append(r.judge["concept"])
            cell["judge_fluency"].append(r.judge["fluency"])
    for conds in per.values():
        base = conds.get("unsteered", {}).get("shown", 0)
        for cell in conds.values():
            n = cell["n"]
            cell["fluency"] = round(cell["fluency"] / n, 4)
            cell["similarity"] = round(cell["similarity"] / n, 4)
            cell["success"] = cell["shown"] >= math.ceil(2 * n / 3) and cell["shown"] > base
    overall: dict[str, dict] = {}
    for conds in per.values():
        for name, cell in conds.items():
            o = overall.setdefault(name, {"concepts": 0, "succeeded": 0, "outputs": 0, "shown": 0, "degenerate": 0,
                                          "fluency": 0.0, "similarity": 0.0, "judge": []})
            o["concepts"] += 1
            o["succeeded"] += cell["success"]
            o["outputs"] += cell["n"]
            o["shown"] += cell["shown"]
            o["degenerate"] += cell["degenerate"]
            o["fluency"] += cell["fluency"] * cell["n"]
            o["similarity"] += cell["similarity"] * cell["n"]
            o["judge"] += [_harmonic(c, f) for c, f in zip(cell["judge_concept"], cell["judge_fluency"], strict=True)]
    for o in overall.values():
        o["success_share"] = round(o["succeeded"] / o["concepts"], 4)
        o["degenerate_share"] = round(o["degenerate"] / o["outputs"], 4)
        o["fluency"] = round(o["fluency"] / o["outputs"], 4)
        o["similarity"] = round(o["similarity"] / o["outputs"], 4)
        o["judge"] = round(sum(o["judge"]) / len(o["judge"]), 4) if o["judge"] else None
    return {"per_concept": per, "overall": overall}


def _harmonic(concept: float, fluency: float) -> float:
    """AxBench's combination: 0 when either score is 0."""
    return 0.0 if concept <= 0 or fluency <= 0 else 2 * concept * fluency / (concept + fluency)


def markdown(summary: dict) -> str:
    overall = summary["overall"]
    lines = ["| condition | concepts succeeded | outputs showing the concept | degenerate | fluency (nats/token) "
             "| similarity | judge |", "|---|---|---|---|---|---|---|"]
    for name in [c for c in CONDITIONS if c in overall]:
        o = overall[name]
        judge = "" if o["judge"] is None else f"{o['judge']:.2f}"
        lines.append(f"| {name} | {o['succeeded']}/{o['concepts']} ({o['success_share']:.0%}) | {o['shown']}/{o['outputs']} "
                     f"| {o['degenerate']}/{o['outputs']} ({o['degenerate_share']:.0%}) | {o['fluency']:.2f} "
                     f"| {o['similarity']:.3f} | {judge} |")
    lines += ["", "| concept | " + " | ".join(c for c in CONDITIONS if c in overall) + " |",
              "|---|" + "---|" * len([c for c in CONDITIONS if c in overall])]
    for concept, conds in summary["per_concept"].items():
        cells = []
        for name in [c for c in CONDITIONS if c in overall]:
            c = conds[name]
            mark = " ok" if c["success"] else ""
            cells.append(f"{c['shown']}/{c['n']} shown, {c['degenerate']} degenerate{mark}")
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class Judge:
    """AxBench-style scores from an OpenAI-compatible chat endpoint: concept and fluency, 0-2."""

    PROMPT = ("Rate a text written in answer to an instruction.\nInstruction: {prompt}\nText: {text}\n\n"
              "Concept score: 0 if the text has nothing to do with '{concept}', 1 if it touches on it, 2 if it "
              "is clearly about it.\nFluency score: 0 if the text is broken or repetitive, 1 if it is "
              "somewhat fluent, 2 if it is fluent.\nAnswer exactly: Concept: <0-2>, Fluency: <0-2>")
    _SCORES = re.compile(r"concept\D*([0-2]).*?fluency\D*([0-2])", re.IGNORECASE | re.DOTALL)

    def __init__(self, url: str, model: str, api_key: str | None = None, transport=None) -> None:
        import httpx

        self.model = model
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=120, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})

    def score(self, concept: str, prompt: str, text: str) -> dict:
        r = self.http.post("/chat/completions", json={
            "model": self.model, "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": self.PROMPT.format(concept=concept, prompt=prompt, text=text)}]})
        r.raise_for_status()
        m = self._SCORES.search(r.json()["choices"][0]["message"]["content"] or "")
        return {"concept": int(m[1]), "fluency": int(m[2])} if m else {"concept": 0, "fluency": 0}
