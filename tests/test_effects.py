"""Concepts by measured effect (``lmm-steer sae effects``): calibration ranks a planted causal
feature first and picks its value, the fast answers equal the engine's, search and concept steering
rank by measured effect and use the measured value and scope, and the shipped effects file is
what concept steering uses on the scenes model."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmm_steer.concepts.resolve import CALIBRATED_SCOPE, resolve_concept
from lmm_steer.concepts.semantic import SemanticIndex
from lmm_steer.effects.clamps import EngineAnswers, ImageAnswers
from lmm_steer.effects.measure import EffectConfig, Tally, catalog_row, measure_effects, word_effect
from lmm_steer.effects.rank import lower_bound, named_words, strength
from lmm_steer.engine import FeatureEdit, SteeringSpec
from lmm_steer.scenes.generate import COLOURS, SHAPES, generate
from sae_weights import FeatureCatalog, FeatureEntry

WORDS = [*COLOURS, *SHAPES]


class WordEmbedder:
    """A stand-in sentence embedder: a bag of words hashed into 64 dimensions, unit length."""

    name, dim = "test-bag-of-words", 64

    def encode(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, sum(map(ord, word)) % self.dim] += 1.0
        return torch.nn.functional.normalize(out + 1e-6, dim=-1)


def _truth(data):
    from PIL import Image

    from lmm_steer.scenes.evaluate import questions

    return {(q["question"], Image.open(data / q["image"]).convert("RGB").tobytes()): q["answer"]
            for q in questions(data, None, ("colour", "shape"))}


class PlantedModel:
    """A stand-in engine that answers every question right, except under clamps on scope ``image``:
    feature 40 at 100 or more makes it call any object red (and leaves shapes alone); feature 41 at
    50 or more also calls objects red but answers shape questions "red" too; feature 0, which search
    ranks first for "red", moves nothing."""

    def __init__(self, truth):
        self.truth = truth

    def generate(self, reqs):
        out = []
        for r in reqs:
            question = r.messages[0]["content"][1]["text"]
            said = self.truth[question, r.images[0].tobytes()]
            for e in (r.steering.edits if r.steering and r.steering.scope == "image" else []):
                if e.feature == 40 and e.value >= 100 and "colour" in question:
                    said = "red"
                if e.feature == 41 and e.value >= 50:
                    said = "red"
            out.append(SimpleNamespace(text=said))
        return out


def _catalog():
    rows = [FeatureEntry(0, "red", extras={"max_activation": 5.0}),
            FeatureEntry(40, "small marks", extras={"max_activation": 2.0}),
            FeatureEntry(41, "red and brown things", extras={"max_activation": 2.0})]
    rows += [FeatureEntry(i, f"{w} objects", extras={"max_activation": 1.0}) for i, w in enumerate(WORDS, start=1)]
    return FeatureCatalog(rows)


def test_calibration_ranks_the_planted_causal_feature_first_at_its_smallest_working_value(tmp_path):
    generate(tmp_path, 12, seed=25)
    catalog = _catalog()
    cfg = EffectConfig(grid=(50.0, 100.0, 250.0), screen_value=150.0, hits=3, localised=0, screen_scenes=3,
                       finalists=2, grid_scenes=6, keys=("colour:red",))
    answers = EngineAnswers(PlantedModel(_truth(tmp_path)))
    result = measure_effects(answers, catalog, tmp_path, cfg, localised={"colour:red": [40]})
    assert catalog.search("red", 1)[0][0].feature == 0  # search by words alone ranks the do-nothing feature first
    assert result["candidates"]["colour:red"][-1] == 40 and result["finalists"]["colour:red"][0] in (40, 41)
    planted, breaker = result["features"][40], result["features"][41]
    assert (planted["word"], planted["value"], planted["rate"], planted["kept_other"]) == ("red", 100.0, 1.0, 1.0)
    assert planted["says"] == {"red": 1.0} and planted["kept_bound_met"] and planted["stage"] == "grid"
    assert [g["rate"] for g in planted["grid"]] == [0.0, 1.0, 1.0]  # the smallest value reaching the best rate
    assert breaker["word"] == "red" and breaker["rate"] == 1.0 and breaker["kept_other"] == 0.0
    assert not breaker["kept_bound_met"] and strength(breaker) < strength(planted)
    assert result["features"][0]["rate"] == 0.0
    rows = [catalog_row(f, e, {"data": "test", "command": "test", "date": "2026-12-07"})
            for f, e in result["features"].items()]
    by_id = {r["feature"]: r for r in rows}
    assert by_id[40]["steer"] == {"value": 100.0, "scope": "image", "source": "effects", "word": "red", "rate": 1.0,
                                  "kept_other": 1.0}
    assert "steer" not in by_id[0] and by_id[0]["effect"]["best"] is None  # measured: no effect
    for row in rows:
        catalog.add(FeatureEntry(row["feature"], extras={k: v for k, v in row.items() if k != "feature"}))
    index = SemanticIndex(catalog, WordEmbedder())
    assert [e.feature for e, _ in index.search("red", 3)] == [40, 41, 0]
    edit, = resolve_concept(index, "red")
    assert (edit.feature, edit.value, edit.scope, edit.calibrated) == (40, 100.0, "image", True)


def test_finalists_come_from_every_screened_candidate_and_a_condition_spares_what_a_clamp_breaks(tmp_path):
    generate(tmp_path, 10, seed=25)
    answers = EngineAnswers(PlantedModel(_truth(tmp_path)))
    base = dict(grid=(100.0, 250.0), screen_value=150.0, hits=3, localised=0, screen_scenes=3, finalists=2,
                grid_scenes=4, keys=("colour:red", "shape:star"))
    # 40 is a candidate for "star" alone (by its patches); it turns colours red, so it is a red finalist
    result = measure_effects(answers, _catalog(), tmp_path, EffectConfig(**base), localised={"shape:star": [40]})
    assert 40 not in result["candidates"]["colour:red"] and 41 in result["candidates"]["colour:red"]
    assert result["finalists"]["colour:red"] == [40]  # 41 breaks every shape answer: not worth the grid
    assert result["features"][40]["stage"] == "grid" and result["features"][40]["word"] == "red"
    # rows conditioned on colour questions whose condition fires on no shape prompt: 41's breakage is spared
    spared = measure_effects(answers, _catalog(), tmp_path, EffectConfig(**base, leaks={"colour": 0.0}),
                             localised={"shape:star": [40]})
    assert sorted(spared["finalists"]["colour:red"]) == [40, 41] and spared["features"][41]["stage"] == "grid"


def test_a_conditioned_row_ranks_by_the_point_it_steers_at_and_what_its_condition_spares():
    from lmm_steer.effects.rank import kept_under, rank_key

    plain = {"best": "red", "rate": 0.9, "n": 20, "kept_other": 0.95, "stage": "grid"}
    breaker = {"best": "red", "rate": 0.6, "n": 20, "kept_other": 0.2, "stage": "grid"}

    def steer(leak):
        return {"value": 250.0, "rate": 1.0, "kept_other": 0.1, "when": 7, "condition": {"feature": 7, "leak": leak}}

    assert kept_under(0.1, 0.0) == 1.0 and kept_under(0.1, 1.0) == pytest.approx(0.1)
    assert rank_key(breaker) < rank_key(plain) < rank_key(breaker, steer(0.0))  # the condition spares its breakage
    assert rank_key(breaker, steer(0.5)) < rank_key(plain)  # one that fires on half the others' prompts does not
    assert rank_key(breaker, {"value": 250.0, "rate": 1.0, "kept_other": 0.1}) == rank_key(breaker)  # unconditioned
    catalog = FeatureCatalog([
        FeatureEntry(1, "red", extras={"effect": plain, "steer": {"value": 100.0, "scope": "image"}}),
        FeatureEntry(2, "red", extras={"effect": breaker, "steer": {**steer(0.0), "scope": "image"}}),
    ])
    assert [e.feature for e, _ in SemanticIndex(catalog, WordEmbedder()).search("red", 2)] == [2, 1]
    edit, = resolve_concept(SemanticIndex(catalog, WordEmbedder()), "red")
    assert (edit.feature, edit.value, edit.when) == (2, 250.0, 7)


def test_tallies_and_the_choice_of_value():
    def tally(colour_said, shape_said):
        t = Tally()
        for plain, got in colour_said:
            t.add({"type": "colour", "answer": plain}, plain, got)
        for truth, got in shape_said:
            t.add({"type": "shape", "answer": truth}, truth, got)
        return t

    shapes_kept = [("star", "star")] * 10
    shapes_broken = [("star", "red")] * 5 + [("star", "star")] * 5
    weak = tally([("blue", "red"), ("red", "red"), ("green", "green"), ("gray", "gray")], shapes_kept)
    strong = tally([("blue", "red"), ("red", "red"), ("green", "red"), ("gray", "red")], shapes_kept)
    too_strong = tally([("blue", "red"), ("red", "red"), ("green", "red"), ("gray", "red")], shapes_broken)
    assert strong.rate("red") == (1.0, 3) and weak.rate("red") == (pytest.approx(1 / 3), 3)
    assert strong.kept("shape") == (1.0, 10) and too_strong.kept("shape") == (0.5, 10)
    assert strong.says("colour") == {"red": 1.0}
    effect = word_effect({50.0: weak, 150.0: strong, 250.0: too_strong}, "red", kept_bound=0.9)
    assert (effect["value"], effect["rate"], effect["kept_other"], effect["n"]) == (150.0, 1.0, 1.0, 3)
    assert word_effect({250.0: too_strong}, "red", 0.9)["kept_bound_met"] is False
    assert lower_bound(1.0, 3) < lower_bound(0.9, 30) < lower_bound(1.0, 30) and lower_bound(0.5, 0) == 0.0
    assert named_words("make the circles red", {"red", "circle", "cross"}) == ["circle", "red"]
    assert named_words("grey crosses", {"gray", "cross"}) == ["gray", "cross"]


def test_search_and_concepts_rank_by_measured_effect_and_take_its_value_and_scope():
    def effect(word, rate, n, kept, stage="grid"):
        return {"best": word, "rate": rate, "n": n, "kept_other": kept, "value": 150.0, "scope": "image",
                "stage": stage}

    catalog = FeatureCatalog([
        FeatureEntry(1, "red", extras={"max_activation": 4.0}),  # nearest by meaning, no measured effect
        FeatureEntry(2, "large red", extras={"max_activation": 19.0, "effect": effect("red", 0.9, 20, 0.95),
                                             "steer": {"value": 150.0, "scope": "image"}}),
        FeatureEntry(3, "yellow", extras={"max_activation": 3.0, "effect": effect("red", 1.0, 2, 1.0),
                                          "steer": {"value": 250.0, "scope": "image"}}),  # few questions: ranks lower
        FeatureEntry(4, "blue", extras={"max_activation": 3.0, "effect": effect("red", 0.0, 20, 1.0)}),
        FeatureEntry(5, "dogs", extras={"max_activation": 5.0, "steer": {"value": 15.0}}),  # `sae calibrate`'s row
        FeatureEntry(6, "red things", extras={"max_activation": 3.0, "effect": effect("red", 1.0, 40, 1.0, "screen"),
                                              "steer": {"value": 100.0, "scope": "image"}}),  # only screened
    ])
    index = SemanticIndex(catalog, WordEmbedder())
    hits = index.search("red", 4)
    assert [e.feature for e, _ in hits] == [2, 3, 6, 1] and hits[0][1] > hits[1][1] > 3 > hits[2][1] > 2 > hits[3][1]
    assert [e.feature for e, _ in SemanticIndex(catalog, WordEmbedder(), measured=False).search("red", 1)] == [1]
    edit, = resolve_concept(index, "the colour red", strength=0.5)
    assert (edit.feature, edit.value, edit.scope) == (2, 75.0, "image")
    dogs, = resolve_concept(index, "dogs")
    assert (dogs.feature, dogs.value, dogs.scope) == (5, 15.0, CALIBRATED_SCOPE)

    # the server's resolution: a request naming the concept and no scope gets the measured scope
    from lmm_steer.api.schemas import ChatCompletionRequest
    from lmm_steer.api.steering_request import resolve_steering

    service = SimpleNamespace(concepts=index)

    def resolved(steering):
        body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                     "steering": steering})
        return resolve_steering(body, service).spec

    spec = resolved({"concepts": [{"text": "red"}]})
    assert spec.scope == "image" and spec.edits == [FeatureEdit(2, 150.0)]
    assert resolved({"concepts": [{"text": "dogs"}]}).scope == "generated"  # the text model's calibration
    assert resolved({"concepts": [{"text": "red"}], "scope": "all"}).scope == "all"  # a given scope stays


@pytest.fixture(scope="module")
def tiny_engine():
    from lmm_steer.engine import EngineConfig
    from lmm_steer.engine.factory import build_engine

    return build_engine("builtin:tiny-llava-next", "builtin:random-topk:latents=64,k=8", hookpoint="model.layers.1",
                        dtype="float32", device="cpu", config=EngineConfig(max_batch=8, max_seq_len=1024))


def test_the_fast_answers_are_the_engines(tiny_engine, tmp_path):
    from lmm_steer.scenes.evaluate import questions

    generate(tmp_path, 2, seed=26)
    items = questions(tmp_path, None, ("colour", "shape"))
    assert ImageAnswers.supported(tiny_engine)
    specs = [None, SteeringSpec([FeatureEdit(3, 40.0)], scope="image"),
             SteeringSpec([FeatureEdit(9, 400.0)], scope="image"),
             SteeringSpec([FeatureEdit(5, 0.0), FeatureEdit(7, 25.0, "add")], scope="image")]
    fast = ImageAnswers(tiny_engine, max_tokens=4, batch=3).answers(tmp_path, items, specs)
    engine = EngineAnswers(tiny_engine, max_tokens=4).answers(tmp_path, items, specs)
    assert fast == engine
    assert len({tuple(a) for a in fast}) > 1  # the clamps changed something: the comparison is not vacuous


def test_the_command_writes_rows_serve_merges(tmp_path, capsys):
    from lmm_steer.cli import main

    generate(tmp_path / "split", 6, seed=27)
    rows = [{"feature": i, "explanation": f"{w} objects", "max_activation": 2.0} for i, w in enumerate(WORDS)]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "effects.jsonl"
    assert main(["sae", "effects", "--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
                 "--hookpoint", "model.layers.1", "--catalog", str(catalog), "--data", str(tmp_path / "split"),
                 "--out", str(out), "--values", "red,star", "--hits", "2", "--localised", "1", "--localise-scenes", "2",
                 "--neighbours", "1", "--screen-scenes", "1", "--finalists", "1", "--grid-scenes", "1", "--grid", "50,400",
                 "--json", str(tmp_path / "effects.json")]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written and len({r["feature"] for r in written}) == len(written)
    for row in written:
        _check_row(row, data="seed 27")
    merged = FeatureCatalog.load(catalog)
    merged.merge(FeatureCatalog.load(out))
    assert merged.get(0).explanation == f"{WORDS[0]} objects"  # effect rows add to the catalog's, never replace
    assert "| value | feature |" in capsys.readouterr().out
    assert main(["sae", "effects", "--data", str(tmp_path / "split"), "--out", str(out), "--grid", "0,5"]) == 2
    assert main(["sae", "effects", "--data", str(tmp_path / "split"), "--out", str(out), "--values", "red,pink"]) == 2
    assert "--values" in capsys.readouterr().err


def _check_row(row, data="seed 34"):
    assert set(row) <= {"feature", "effect", "steer"} and isinstance(row["feature"], int)
    e = row["effect"]
    assert e["scope"] == "image" and e["type"] in ("colour", "shape") and e["stage"] in ("screen", "grid")
    assert data in e["data"] and e["command"].startswith("lmm-steer sae effects") and e["date"]
    assert 0 <= e["rate"] <= 1 and 0 <= e["kept_other"] <= 1 and e["n"] >= 0 and e["value"] > 0
    assert all(0 < s <= 1 for s in e["says"].values())
    assert e["value"] in [g["value"] for g in e["grid"]]
    if e["rate"] > 0:
        assert e["best"] in WORDS
        steer = row["steer"]
        chosen = steer.get("unconditioned", steer)  # a conditioned row may steer at another grid value
        assert chosen["value"] == e["value"] and steer["scope"] == "image"
        assert steer["value"] in [g["value"] for g in e["grid"]]
        if "unconditioned" in steer:
            assert "when" in steer and steer["rate"] == max(g["rate"] for g in e["grid"])
        assert row["steer"]["word"] == e["best"]
    else:
        assert e["best"] is None and "steer" not in row


SCENES_EFFECTS = Path(__file__).resolve().parents[1] / "sae_weights" / "scenes-llava-next" / "effects.jsonl"


@pytest.mark.skipif(not SCENES_EFFECTS.exists(), reason="no effects file shipped in this checkout")
def test_the_shipped_effects_are_what_concept_steering_uses_on_the_scenes_model():
    from lmm_steer.concepts.embedder import default_embedder
    from lmm_steer.effects.rank import measured_word, rank_key
    from sae_weights.default import SHIPPED, sources_for

    shipped = SHIPPED["builtin:scenes-llava-next"]
    sources = sources_for("builtin:scenes-llava-next")
    assert sources.catalogs[-1] == str(SCENES_EFFECTS) == str(shipped.effects)
    rows = [json.loads(line) for line in SCENES_EFFECTS.read_text().splitlines()]
    assert len({r["feature"] for r in rows}) == len(rows) > 15
    for row in rows:
        _check_row(row)
    # each steering row carries its question type's condition (`sae conditions`), one per type
    when = {(r["effect"]["type"], r["steer"]["when"]) for r in rows if "steer" in r}
    assert sorted(t for t, _ in when) == ["colour", "shape"] and len({w for _, w in when}) == 2
    merged = FeatureCatalog.load_all(sources.catalogs)
    index = SemanticIndex(merged, default_embedder(), list(sources.catalogs))
    assert index.vectors.shape[0] == 4096
    best = {}
    for row in rows:
        word = measured_word(row)
        key = rank_key(row["effect"], row.get("steer"))  # a conditioned row by its conditioned point
        if word is not None and key > best.get(word, (None, (-1, -1.0)))[1]:
            best[word] = (row, key)
    assert len(best) >= 10
    for word, (row, _) in best.items():
        top, _ = index.search(word, 1)[0]
        assert top.feature == row["feature"], word
        edit, = resolve_concept(index, word)
        assert (edit.feature, edit.value, edit.scope, edit.when) == (row["feature"], row["steer"]["value"], "image",
                                                                     row["steer"]["when"])
