"""``lmm-steer preset fit`` and ``eval fitted`` (issue #41): a planted confusion whose fix is known,
the answers the fit reads, the controls, and the commands end to end on a tiny model."""

import json
import random

import pytest
import torch

from lmm_steer.engine import SteeringSpec
from lmm_steer.eval.fitted import random_like, summary
from lmm_steer.eval.preset import tally
from lmm_steer.fit.candidates import build, confusions, mean_active, steering
from lmm_steer.fit.search import choose, screening_set
from lmm_steer.presets import load_presets
from lmm_steer.scenes.generate import generate

WIDTH = 32
CONFUSED = 7  # fires on the purple objects the planted model calls blue; suppressing it fixes them
HARMFUL = 9  # any edit of it breaks every answer
RIGHT = 3  # fires wherever the answer is right; amplifying it does nothing


def _items(n: int, seed: int) -> list[dict]:
    """Colour and shape questions; a third of the colour ones are purple objects read as blue."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"type": "colour", "answer": "purple", "question": "What colour is the star?", "image": "x",
                        "difficulty": ["near_colours"], "confused": True})
        elif i % 3 == 1:
            out.append({"type": "colour", "answer": rng.choice(["red", "green"]), "question": "What colour is the cross?",
                        "image": "x", "difficulty": [], "confused": False})
        else:
            out.append({"type": "shape", "answer": rng.choice(["star", "cross"]), "question": "What shape?",
                        "image": "x", "difficulty": [], "confused": False})
    return out


def _codes(items: list[dict], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(len(items), WIDTH, generator=g) * (torch.rand(len(items), WIDTH, generator=g) < 0.3)
    image[:, CONFUSED] = torch.tensor([3.0 if q["confused"] else 0.0 for q in items])
    image[:, RIGHT] = torch.tensor([0.0 if q["confused"] else 2.0 for q in items])
    return {"image": image, "text": torch.rand(len(items), WIDTH, generator=g) * 0.1,
            "residual": torch.randn(len(items), 8, generator=g)}


def _planted(items: list[dict], spec: SteeringSpec | None) -> list[str]:
    """The stand-in model: blue for a confused purple object unless its feature is suppressed on
    the image; every answer wrong under any edit of the harmful feature; random features do nothing."""
    edits = {e.feature: e for e in (spec.edits if spec else [])}
    fix = CONFUSED in edits and spec.scope in ("image", "all") and (
        (edits[CONFUSED].mode == "scale" and edits[CONFUSED].value < 1) or
        (edits[CONFUSED].mode == "clamp" and edits[CONFUSED].value == 0))
    out = []
    for q in items:
        if HARMFUL in edits:
            out.append("gray")
        elif q["confused"]:
            out.append("purple" if fix else "blue")
        else:
            out.append(q["answer"])
    return out


def _answer(items: list[dict], steerings: list) -> list[list[str]]:
    """The planted model under each steering, as ``fit.answers.SplitAnswers`` answers."""
    return [_planted(items, s) for s in steerings]


def test_a_planted_confusion_is_found_fixed_on_held_out_questions_and_random_features_do_not_fix_it():
    fit, select, test = _items(90, 0), _items(60, 1), _items(60, 2)
    answers = _planted(fit, None)
    assert confusions(fit, answers)[0] == ("colour", "purple", "blue", 30)
    codes = _codes(fit, 0)
    candidates = build(codes, fit, answers, c=1.0, top=4)
    assert [c.family for c in candidates] == ["probe"]  # one truth only: the confusion's probe has one class
    assert candidates[0].down[0] == CONFUSED and candidates[0].up[0] == RIGHT
    chosen = choose(_answer, select, candidates, mean_active(codes))
    trial = chosen["chosen"]
    assert trial is not None and any(e.feature == CONFUSED for e in trial.spec.edits)
    base = _planted(test, None)
    held_out = tally(test, base, _planted(test, trial.spec))
    assert held_out["all"]["fixed"] == 20 and held_out["all"]["broken"] == 0
    control = tally(test, base, _planted(test, random_like(trial.spec, [f for f in range(WIDTH) if f != HARMFUL],
                                                           random.Random(0))))
    assert control["all"]["net"] == 0
    assert summary(held_out)["all"]["error_reduction"] == 1.0


def test_the_random_control_can_draw_features_that_fire_as_often_as_the_presets():
    from lmm_steer.engine import FeatureEdit

    density = {f: 10 ** (-6 + f / 20) for f in range(100)}  # 1e-6 (feature 0) up to ~1e-1 (feature 99)
    spec = SteeringSpec(edits=[FeatureEdit(90, 2.0, "scale"), FeatureEdit(91, 0.5, "scale"),
                               FeatureEdit(30, 2.0, "scale")])
    for seed in range(5):
        drawn = random_like(spec, list(range(100)), random.Random(seed), density, near=6)
        features = [e.feature for e in drawn.edits]
        assert len(set(features)) == 3 and not {90, 91, 30} & set(features)
        assert all(abs(f - e.feature) <= 6 for f, e in zip(features, spec.edits, strict=True))  # within the 6 nearest
        assert [(e.value, e.mode) for e in drawn.edits] == [(2.0, "scale"), (0.5, "scale"), (2.0, "scale")]
    # a feature edited in two slots (two conditions) gets one stand-in, in both
    twice = SteeringSpec(edits=[FeatureEdit(90, 2.0, "scale", when=5), FeatureEdit(30, 2.0, "scale"),
                                FeatureEdit(90, 2.0, "scale", when=6)])
    drawn = random_like(twice, list(range(100)), random.Random(0), density, near=6).edits
    assert drawn[0].feature == drawn[2].feature != drawn[1].feature and [e.when for e in drawn] == [5, None, 6]
    unmatched = {e.feature for s in range(5) for e in random_like(spec, list(range(100)), random.Random(s)).edits}
    assert any(abs(f - 90) > 12 and abs(f - 30) > 12 for f in unmatched)  # without rates: anywhere in the pool


def test_a_point_that_breaks_a_type_beyond_the_bound_is_never_chosen():
    fit = _items(90, 0)
    answers = _planted(fit, None)
    codes = _codes(fit, 0)
    harmful = build(codes, fit, answers, c=1.0, top=4)[0]
    harmful.up, harmful.down = [HARMFUL], []
    assert choose(_answer, _items(60, 1), [harmful], mean_active(codes))["chosen"] is None


COLOUR_PROMPTS = 21  # the condition feature of the planted model: it fires on colour questions' prompts alone


def _planted_side_effect(items: list[dict], spec: SteeringSpec | None) -> list[str]:
    """A planted model where suppressing the confused feature fixes the purple objects but, on a shape
    question, makes it say gray: unless the edit is conditioned on colour prompts, where it never acts
    on a shape question."""
    out = []
    for q in items:
        acting = {e.feature for e in (spec.edits if spec else [])
                  if e.when is None or (e.when == COLOUR_PROMPTS and q["type"] == "colour")}
        if CONFUSED in acting and q["type"] == "shape":
            out.append("gray")
        elif q["confused"]:
            out.append("purple" if CONFUSED in acting else "blue")
        else:
            out.append(q["answer"])
    return out


def test_a_confusion_candidate_conditioned_on_its_question_type_keeps_the_other_types():
    from lmm_steer.fit.candidates import Candidate
    from lmm_steer.fit.search import grid_points

    fit, select, test = _items(90, 0), _items(60, 1), _items(60, 2)
    typical = mean_active(_codes(fit, 0))
    cands = [Candidate("confusion:colour:purple->blue", [], [CONFUSED]), Candidate("probe", [RIGHT], [CONFUSED])]
    grid = {"k": (1,), "mode": ("scale",), "strength": (2.0,), "scope": ("image",), "condition": ("none", "type")}
    points = grid_points(cands, typical, grid, {"colour": COLOUR_PROMPTS})
    assert [(p.family, p.when) for p in points] == [("confusion:colour:purple->blue", None),
                                                    ("confusion:colour:purple->blue", COLOUR_PROMPTS), ("probe", None)]
    assert all(e.when == COLOUR_PROMPTS for e in points[1].spec.edits)
    answer = lambda items, steerings: [_planted_side_effect(items, s) for s in steerings]  # noqa: E731
    chosen = choose(answer, select, cands[:1], typical, grid=grid, conditions={"colour": COLOUR_PROMPTS})["chosen"]
    assert chosen is not None and chosen.when == COLOUR_PROMPTS  # unconditioned it breaks every shape answer
    base = _planted_side_effect(test, None)
    held_out = tally(test, base, _planted_side_effect(test, chosen.spec))
    assert held_out["all"]["fixed"] == 20 and held_out["all"]["broken"] == 0
    unconditioned = tally(test, base, _planted_side_effect(test, points[0].spec))
    assert unconditioned["shape"]["broken"] == 20
    assert choose(answer, select, cands[:1], typical, grid={**grid, "condition": ("none",)})["chosen"] is None


VALUES = {"star": 20, "cross": 21}  # the shape values' best-measured features (the catalog's effect rows)
SHAPE_PROMPTS = 30  # fires on shape questions' prompts alone


def _planted_misread(items: list[dict], spec: SteeringSpec | None) -> list[str]:
    """``_planted``, and a shape misread (``misread``) answered right only where the shape values'
    features are amplified at least twofold."""
    loud = {e.feature for e in (spec.edits if spec else []) if e.mode == "scale" and e.value >= 2}
    return [q["answer"] if q.get("misread") and loud >= set(VALUES.values()) else
            ("circle" if q.get("misread") else said) for q, said in zip(items, _planted(items, spec), strict=True)]


def test_the_values_family_amplifies_each_values_feature_on_its_types_prompts_and_adds_to_another_family():
    from lmm_steer.fit.candidates import Candidate, from_values, question_type
    from lmm_steer.fit.search import grid_points
    from sae_weights import FeatureCatalog, FeatureEntry

    def row(word, kind, rate):
        return {"effect": {"best": word, "type": kind, "rate": rate, "n": 20, "kept_other": 1.0, "stage": "grid"},
                "steer": {"value": 100.0, "scope": "image", "word": word}}

    catalog = FeatureCatalog([FeatureEntry(20, extras=row("star", "shape", 0.9)),
                              FeatureEntry(21, extras=row("cross", "shape", 0.8)),
                              FeatureEntry(22, extras=row("star", "shape", 0.5)),  # star's weaker feature
                              FeatureEntry(23, extras=row("red", "colour", 0.9)),
                              FeatureEntry(24, "star")])  # explained, nothing measured
    values = from_values(catalog, ("colour", "shape"))
    assert [(c.family, c.up, c.down) for c in values] == [("values:colour", [23], []), ("values:shape", [20, 21], [])]
    assert values[1].why["values"] == {"cross": 21, "star": 20} and question_type("values:shape") == "shape"
    assert from_values(catalog, ("exist",)) == [] and from_values(FeatureCatalog(), ("shape",)) == []
    select = [{**q, "misread": q["type"] == "shape" and i % 2 == 0} for i, q in enumerate(_items(60, 1))]
    typical = mean_active(_codes(select, 1))
    grid = {"k": (4,), "mode": ("scale", "add"), "strength": (2.0,), "scope": ("all",), "condition": ("none", "type"),
            "value_strength": (2.0, 4.0)}
    points = grid_points(values[1:], typical, grid, {"shape": SHAPE_PROMPTS})
    assert [(p.k, p.mode, p.strength, p.when) for p in points] == [(2, "scale", 2.0, SHAPE_PROMPTS),
                                                                    (2, "scale", 4.0, SHAPE_PROMPTS)]
    assert all(e.mode == "scale" and e.when == SHAPE_PROMPTS for p in points for e in p.spec.edits)
    assert [p.when for p in grid_points(values[1:], typical, grid, {})] == [None, None]  # no condition for shapes
    confusion = Candidate("confusion:colour:purple->blue", [], [CONFUSED])
    answer = lambda items, steerings: [_planted_misread(items, s) for s in steerings]  # noqa: E731
    got = choose(answer, select, [confusion, values[1]], typical, grid=grid, confirm=2,
                 conditions={"shape": SHAPE_PROMPTS})
    chosen = got["chosen"]
    assert chosen.family == "confusion:colour:purple->blue+values:shape"  # each family's best confirmed, then added
    assert (chosen.result["all"]["fixed"], chosen.result["all"]["broken"]) == (30, 0)
    assert {e.feature: e.when for e in chosen.spec.edits if e.feature in (20, 21)} == {20: SHAPE_PROMPTS,
                                                                                      21: SHAPE_PROMPTS}
    assert len({t["family"] for t in got["trials"]}) == 2  # one point a family, not two of the confusion's


def test_screening_takes_every_question_about_a_seeded_sample_of_images():
    items = [{**q, "image": f"{i % 10}.png"} for i, q in enumerate(_items(60, 3))]
    screen = screening_set(items, images=4)
    images = {items[i]["image"] for i in screen}
    assert len(images) == 4 and screen == [i for i, q in enumerate(items) if q["image"] in images]
    assert screening_set(items, images=4) == screen and screening_set(items, images=4, seed=1) != screen
    assert screening_set(items, images=50) == list(range(60))


def test_screened_points_are_confirmed_on_the_whole_split():
    fit = [{**q, "image": f"{i % 10}.png"} for i, q in enumerate(_items(90, 0))]
    select = [{**q, "image": f"{i % 10}.png"} for i, q in enumerate(_items(60, 1))]
    codes = _codes(fit, 0)
    asked = []

    def answer(items, steerings):
        asked.append((len(items), len(steerings)))
        return _answer(items, steerings)

    chosen = choose(answer, select, build(codes, fit, _planted(fit, None), c=1.0, top=4), mean_active(codes),
                    screen_images=3)
    assert asked[0] == (60, 1) and asked[1][0] == 18 and asked[2][0] == 60  # base, screen (3 images), confirm
    assert chosen["chosen"].result["all"]["n"] == 60 and chosen["chosen"].result["all"]["fixed"] == 20


def test_steering_modes_and_scopes():
    fit = _items(30, 0)
    codes = _codes(fit, 0)
    cand = build(codes, fit, _planted(fit, None), c=1.0, top=4)[0]
    typical = mean_active(codes)
    scale = steering(cand, 1, "scale", 2.0, "image", typical)
    add = steering(cand, 1, "add", 2.0, "all", typical)
    assert scale.scope == "image" and add.scope == "all"
    assert [(e.mode, e.value) for e in scale.edits if e.feature == CONFUSED] == [("scale", 0.5)]
    assert [(e.mode, e.value) for e in add.edits if e.feature == CONFUSED] == [("clamp", 0.0)]
    up = cand.up[0]
    assert [e.value for e in add.edits if e.feature == up] == [round(float(2.0 * typical[up]), 4)]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    for name, seed, n in (("fit", 31, 2), ("select", 32, 1), ("test", 33, 1)):
        generate(root / name, n=n, seed=seed)
    return root


def test_the_fit_reads_the_answers_the_engine_gives(splits):
    from lmm_steer.engine import EngineConfig
    from lmm_steer.engine.factory import engine_for
    from lmm_steer.fit.answers import SplitAnswers, ask
    from lmm_steer.fit.codes import answers_and_codes, image_answers_and_codes, pooled_codes
    from lmm_steer.fit.examples import load_examples
    from lmm_steer.models.loader import load_model

    engine = engine_for(load_model("builtin:tiny-llava-next"), "builtin:random-topk:latents=64,k=8",
                        config=EngineConfig(max_batch=8, max_seq_len=1024))
    root, items = load_examples(splits / "fit", 2)
    answers, codes = answers_and_codes(engine, root, items, batch=4)
    assert answers == ask(engine, root, items, None)
    one = pooled_codes(engine, root, items)  # one at a time, unpadded: the same pools
    split = SplitAnswers(engine, root)
    assert split.fast is not None  # the per-image path: each image's prefix once
    fast_answers, fast = image_answers_and_codes(split.fast, root, items)
    assert fast_answers == answers and not split.fast.images  # each image's work dropped once read
    for pool in ("image", "text", "last", "residual"):
        assert torch.allclose(codes[pool], one[pool], atol=1e-4) and torch.allclose(fast[pool], one[pool], atol=1e-4)
    assert codes["image"].shape == (len(items), 64)
    assert (codes["image"] > 0).any() and (codes["text"] > 0).any()


def test_every_steering_the_fit_tries_gets_the_engines_answers_on_the_fast_path(splits):
    from lmm_steer.engine import EngineConfig, FeatureEdit
    from lmm_steer.engine.factory import engine_for
    from lmm_steer.eval.fitted import LOOK_CAREFULLY
    from lmm_steer.fit.answers import SplitAnswers, ask
    from lmm_steer.fit.codes import batched_answers
    from lmm_steer.fit.examples import load_examples
    from lmm_steer.models.loader import load_model

    engine = engine_for(load_model("builtin:tiny-llava-next"), "builtin:random-topk:latents=64,k=8",
                        hookpoint="model.layers.1",  # not the last block: an image edit reaches the answer
                        config=EngineConfig(max_batch=8, max_seq_len=1024))
    root, items = load_examples(splits / "fit", 2)
    scale = SteeringSpec([FeatureEdit(3, 8.0, "scale"), FeatureEdit(5, 0.0, "scale")], scope="image")
    add = SteeringSpec([FeatureEdit(3, 20.0, "add"), FeatureEdit(5, 0.0)], scope="image")
    vector = torch.randn(engine.model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 20
    fast = SplitAnswers(engine, root)(items, [None, scale, add, vector])
    slow = SplitAnswers(engine, root, fast=False)
    assert fast[:3] == [ask(engine, root, items, s) for s in (None, scale, add)]
    assert fast[3] == batched_answers(engine, root, items, add_on_image=vector) == slow(items, [vector])[0]
    assert fast[1] != fast[0] and fast[2] != fast[0] and fast[3] != fast[0]  # every steering changes some answer
    prompted = SplitAnswers(engine, root, system=LOOK_CAREFULLY)(items, [None])[0]
    assert prompted == ask(engine, root, items, None, system=LOOK_CAREFULLY)
    # edits whose scope reaches the question's text and the decoded tokens, a gated one among them
    edits = [FeatureEdit(3, 8.0, "scale"), FeatureEdit(5, 20.0, "add", where=3)]
    scoped = [SteeringSpec(edits, scope=scope) for scope in ("prompt", "generated", "all")]
    fast = SplitAnswers(engine, root)(items, scoped)
    assert fast == [ask(engine, root, items, s) for s in scoped]
    assert len({tuple(f) for f in fast}) > 1  # the scopes differ in what they change


def test_conditioned_steerings_get_the_engines_answers_on_the_fast_path(splits):
    """``when``: the fast path decides each question's conditions on its own prompt, as the engine's
    prefill does; with a condition that fires on some questions' prompts and not others', the answers
    are the engine's, and differ from both the unsteered and the unconditioned ones."""
    from lmm_steer.engine import EngineConfig, FeatureEdit
    from lmm_steer.engine.factory import engine_for
    from lmm_steer.fit.answers import SplitAnswers, ask
    from lmm_steer.fit.examples import load_examples
    from lmm_steer.models.loader import load_model

    engine = engine_for(load_model("builtin:tiny-llava-next"), "builtin:random-topk:latents=512,k=8",
                        hookpoint="model.layers.1", config=EngineConfig(max_batch=8, max_seq_len=1024))
    root, items = load_examples(splits / "fit", 2)
    split = SplitAnswers(engine, root)
    fired = []
    for image in dict.fromkeys(q["image"] for q in items):
        asked = [q for q in items if q["image"] == image]
        entry = split.fast.prepare(root, image, asked)
        fired += [split.fast.prompt_peaks(entry, k) > 0 for k in range(len(asked))]
    share = torch.stack(fired).float().mean(0)
    some = ((share > 0.2) & (share < 0.8)).nonzero().flatten()
    assert len(some), "no feature fires on some prompts and not others: pick another SAE"
    condition = int(some[0])
    edits = [FeatureEdit(3, 8.0, "scale"), FeatureEdit(5, 20.0, "add")]
    specs = [SteeringSpec([FeatureEdit(e.feature, e.value, e.mode, when=condition) for e in edits], scope=scope)
             for scope in ("image", "all")]
    mixed = SteeringSpec([FeatureEdit(3, 8.0, "scale", when=condition), FeatureEdit(5, 20.0, "add")], scope="all")
    # read on the text alone, with the same feature also edited under a second condition
    on_text = SteeringSpec([FeatureEdit(3, 8.0, "scale", when=condition, when_on="text"),
                            FeatureEdit(3, 0.5, "scale", when=int(some[-1])), FeatureEdit(5, 20.0, "add")], scope="all")
    fast = split(items, [None, *specs, mixed, SteeringSpec(edits, scope="all"), on_text])
    assert fast[1:4] + fast[5:] == [ask(engine, root, items, s) for s in (*specs, mixed, on_text)]
    assert fast[2] != fast[0] and fast[2] != fast[4]  # the condition opens on some questions and closes on others


def test_preset_fit_and_eval_fitted_end_to_end_on_a_tiny_model(splits, tmp_path, capsys):
    from lmm_steer.cli import main

    model = ["--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8"]
    out, trials = tmp_path / "p.json", tmp_path / "trials.json"
    code = main(["preset", "fit", "--data", str(splits / "fit"), "--select", str(splits / "select"), "--out", str(out),
                 "--json", str(trials), "--k", "2", "--modes", "scale", "--scopes", "image", "--diffmean-strengths", "2",
                 "--fit-cache", str(tmp_path / "fit-pass.safetensors"), *model])
    said = capsys.readouterr()
    assert "read from" not in said.err and (tmp_path / "fit-pass.safetensors").exists()
    record = json.loads(trials.read_text())
    assert record["fit_questions"] > 0 and record["select_questions"] > 0
    assert 0 <= record["select_base"]["all"] <= 1
    assert sum(e["n"] for e in record["fit_errors"]) <= record["fit_questions"] - record["fit_right"]
    assert record["diffmean"]["vector"] and record["diffmean"]["block"].startswith("model.layers.")
    assert record["command"].startswith("lmm-steer preset fit --data")
    assert set(record["conditions"]) <= {"colour", "shape", "exist"} and record["conditions"]  # read on the fit split
    if code == 1:
        # a random tiny model may answer nothing right, or its SAE offer nothing that helps: no
        # preset, and the run says why; the controls are still measured, on a preset written here
        assert not out.exists() and json.loads(said.out.splitlines()[-1])["chosen"] is None
        out.write_text(json.dumps({"name": "fitted", "description": "two scaled features", "fit": record,
                                   "steering": {"features": [{"id": 1, "value": 2.0, "mode": "scale"},
                                                             {"id": 2, "value": 0.5, "mode": "scale"}],
                                                "scope": "image"}}))
    else:
        assert code == 0 and record["candidates"][0]["family"] == "probe" and record["screened"]
        written = json.loads(out.read_text())
        assert "{" not in written["description"] and f"on {record['select_questions']} questions" in written["description"]
        chosen = written["fit"]["chosen"]
        assert all(f.get("when") == chosen["when"] for f in written["steering"]["features"])
    preset = load_presets(out)["fitted"]
    assert preset.fit["select"] == str(splits / "select") and preset.steering.features
    report = tmp_path / "eval.json"
    assert main(["eval", "fitted", "--presets", str(out), "--preset", "fitted", "--data", str(splits / "test"),
                 "--json", str(report), *model]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert set(rows) == {"preset", "random", "random-2", "random-3", "prompting", "diffmean"}
    drawn = json.loads(report.read_text())["random_features"]
    assert len({tuple(v) for v in drawn.values()}) == 3  # three draws of other features, same edits
    mean = json.loads(report.read_text())["random_mean"]["all"]  # the control's expected effect, beside each draw
    draws = [rows[n]["all"] for n in ("random", "random-2", "random-3")]
    assert mean["draws"] == 3 and mean["accuracy_after"] == pytest.approx(sum(d["accuracy_after"] for d in draws) / 3,
                                                                          abs=1e-4)
    assert mean["net"] == pytest.approx(sum(d["net"] for d in draws) / 3, abs=0.01)
    assert all(r["all"]["n"] == rows["preset"]["all"]["n"] for r in rows.values())


def test_the_fit_pass_is_read_back_only_for_the_same_model_and_questions(tmp_path):
    from lmm_steer.fit.cache import cache_key, load_pass, save_pass

    items = _items(6, 0)
    codes = _codes(items, 0)
    key = cache_key("builtin:scenes-llava-next", None, None, None, items)
    save_pass(tmp_path / "pass.safetensors", key, ["a"] * 6, codes)
    answers, got = load_pass(tmp_path / "pass.safetensors", key)
    assert answers == ["a"] * 6 and all(torch.equal(got[k], codes[k]) for k in codes)
    other_questions = cache_key("builtin:scenes-llava-next", None, None, None, items[:5])
    other_sae = cache_key("builtin:scenes-llava-next", None, "builtin:random-topk", None, items)
    assert load_pass(tmp_path / "pass.safetensors", other_questions) is None
    assert load_pass(tmp_path / "pass.safetensors", other_sae) is None
    assert load_pass(tmp_path / "absent.safetensors", key) is None


def test_bad_splits_are_refused_by_name(splits, tmp_path, capsys):
    from lmm_steer.cli import main

    same = ["preset", "fit", "--data", str(splits / "fit"), "--select", str(splits / "fit"), "--out", str(tmp_path / "p")]
    assert main(same) == 2 and "--data and --select are the same" in capsys.readouterr().err
    for bad in ("2,-1", "2,x"):
        for flag in ("--value-strengths", "--spotlight-strengths"):
            assert main(same[:5] + [str(splits / "select"), *same[6:], flag, bad]) == 2
            assert flag in capsys.readouterr().err
    (tmp_path / "p.json").write_text(json.dumps({"name": "p", "description": "d", "steering": {
        "features": [{"id": 1, "value": 2.0, "mode": "scale"}]}, "fit": {"data": str(splits / "test")}}))
    assert main(["eval", "fitted", "--presets", str(tmp_path / "p.json"), "--preset", "p",
                 "--data", str(splits / "test")]) == 2
    assert "fitted or chosen on" in capsys.readouterr().err


def test_a_fitted_preset_serves_and_a_stock_openai_client_gets_the_engines_own_answer(splits, tmp_path):
    import base64

    from openai import OpenAI
    from servers import Server

    from lmm_steer.engine import EngineConfig
    from lmm_steer.engine.factory import engine_for
    from lmm_steer.fit.answers import ask
    from lmm_steer.fit.examples import load_examples
    from lmm_steer.models.loader import load_model
    from lmm_steer.presets import feature_spec

    sae = "builtin:random-topk:latents=64,k=8"
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "fitted.json").write_text(json.dumps({
        "name": "fitted", "description": "fitted by preset fit", "fit": {"data": "fit", "candidates": [{"up": [1]}]},
        "steering": {"features": [{"id": 1, "value": 4.0, "mode": "scale"}, {"id": 2, "value": 0.0}], "scope": "image"}}))
    preset = load_presets(tmp_path / "presets")["fitted"]
    assert preset.fit["candidates"] == [{"up": [1]}]  # the record round-trips
    root, items = load_examples(splits / "test", 1, ("colour",))
    item = items[0]
    engine = engine_for(load_model("builtin:tiny-llava-next"), sae, config=EngineConfig(max_batch=2, max_seq_len=1024))
    own, plain = (ask(engine, root, [item], spec)[0] for spec in (feature_spec(preset.steering), None))
    server = Server("--model", "builtin:tiny-llava-next", "--sae", sae, "--presets", str(tmp_path / "presets"))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert "builtin:tiny-llava-next:fitted" in [m.id for m in client.models.list().data]
        image = base64.b64encode((root / item["image"]).read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                   {"type": "text", "text": item["question"]}]
        reply = client.chat.completions.create(model="builtin:tiny-llava-next:fitted", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": content}],
                                               extra_body={"return_unsteered": True})
    finally:
        server.stop()
    assert reply.choices[0].message.content == own and reply.model_extra["unsteered"]["content"] == plain
    assert [f["id"] for f in reply.model_extra["steering"]["features"]] == [1, 2]


def test_the_spotlight_names_each_questions_object_and_merges_beside_a_conditioned_preset():
    from lmm_steer.engine import FeatureEdit
    from lmm_steer.fit.candidates import Candidate
    from lmm_steer.fit.search import merged
    from lmm_steer.fit.spotlight import label, named_value, steering

    vocabulary = {"colour": {"red", "green"}, "shape": {"star", "cross"}}
    assert named_value("What colour is the star? Answer in a word.", vocabulary["shape"]) == "star"
    assert named_value("What colour is the starfish?", vocabulary["shape"]) is None  # words, not substrings
    assert label({"type": "shape", "question": "What shape is the green object?"}, vocabulary) == "shape about green"
    assert label({"type": "exist", "question": "Is there a red star?"}, vocabulary) == "exist"
    lit = Candidate("spotlight", [], [], {"slots": [{"asked": [1, 2], "where": 10, "when": 20},
                                                    {"asked": [1, 2], "where": 11, "when": 21},
                                                    {"asked": [3], "where": 1, "when": 22}]})
    spec = steering(lit, 2.0, "all")
    assert [(e.feature, e.where, e.when, e.when_on) for e in spec.edits] == [
        (1, 10, 20, "text"), (2, 10, 20, "text"), (1, 11, 21, "text"), (2, 11, 21, "text"), (3, 1, 22, "text")]
    spec.validate(64, len(spec.edits))  # feature 1 twice, each slot its own gate and condition: the engine takes it
    # beside a preset conditioned on the question type, a feature both edit is kept in both; beside
    # an unconditioned edit of it, the spotlight's edits of that feature are left out
    preset = SteeringSpec([FeatureEdit(1, 0.5, "scale", when=30), FeatureEdit(2, 0.5, "scale")], scope="all")
    both = merged(preset, spec)
    assert [(e.feature, e.when) for e in both.edits] == [(1, 30), (2, None), (1, 20), (1, 21), (3, 22)]
    both.validate(64, len(both.edits))


def test_the_spotlight_is_read_on_a_fit_split_and_answers_as_the_engine(splits, monkeypatch):
    """On a tiny model whose 4x4 patches localise few values, every value is given a localised
    feature; the slots are then the named values whose condition read on the text is usable, each
    condition fires on the text of every fit prompt naming its value, and the fast path answers
    under the spotlight as the engine does."""
    from lmm_steer.effects.conditions import MAX_LEAK, MIN_RECALL, prompt_peaks
    from lmm_steer.engine import EngineConfig
    from lmm_steer.engine.factory import engine_for
    from lmm_steer.fit import spotlight
    from lmm_steer.fit.answers import SplitAnswers, ask
    from lmm_steer.fit.examples import load_examples
    from lmm_steer.models.loader import load_model

    engine = engine_for(load_model("builtin:tiny-llava-next"), "builtin:random-topk:latents=512,k=8",
                        hookpoint="model.layers.1", config=EngineConfig(max_batch=8, max_seq_len=1024, max_clamps=256))
    root, items = load_examples(splits / "fit", None, ("colour", "shape", "exist"))
    values = sorted({f"{q['type']}:{q['answer']}" for q in items if q["type"] in ("colour", "shape")})
    monkeypatch.setattr(spotlight, "choose_features", lambda fired, truth: {v: 100 + i for i, v in enumerate(values)})
    fast = SplitAnswers(engine, root).fast
    lit = spotlight.candidate(fast, root, items, prompt_peaks(fast, root, items, text=True))
    assert lit is not None and lit.why["slots"]
    for slot in lit.why["slots"]:
        cond = lit.why["conditions"][slot["label"]]
        assert cond["usable"] and cond["recall"] >= MIN_RECALL and cond["leak"] <= MAX_LEAK
        asked, named = slot["label"].split(" about ")
        assert slot["where"] == 100 + values.index(f"{spotlight.OTHER[asked]}:{named}")
        assert slot["asked"] == sorted(100 + i for i, v in enumerate(values) if v.startswith(asked + ":"))
    spec = spotlight.steering(lit, 4.0, "all")
    fast_said = SplitAnswers(engine, root)(items, [spec])[0]
    assert fast_said == ask(engine, root, items, spec)
