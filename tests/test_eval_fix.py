"""``lmm-steer eval fix``: targets, counting and controls on constructed cases, and one run end to end."""

import json
import random

import pytest

from lmm_steer.engine import FeatureEdit
from lmm_steer.eval.fix import (
    Case,
    Target,
    asked_gates,
    outcome,
    pair_collateral,
    random_edits,
    search_edits,
    summarise,
    targets,
    transferred,
)
from lmm_steer.eval.tested import VALUE_KEYS, effect_rates, pick
from lmm_steer.scenes.generate import generate
from sae_weights import FeatureCatalog
from sae_weights.catalog import FeatureEntry


def _q(kind, question, answer, difficulty=()):
    return {"image": "images/000000.png", "type": kind, "question": question, "answer": answer,
            "difficulty": list(difficulty)}


@pytest.mark.parametrize(("item", "got", "want"), [
    (_q("colour", "What colour is the star?", "red"), "Brown.", [("colour:red", 1), ("colour:brown", -1)]),
    (_q("colour", "What colour is the star?", "red"), "a star", [("colour:red", 1)]),
    (_q("shape", "What shape is the red object?", "star"), "cross", [("shape:star", 1), ("shape:cross", -1)]),
    (_q("exist", "Is there a red hexagon?", "yes"), "no", [("colour:red", 1), ("shape:hexagon", 1)]),
    (_q("exist", "Is there a blue star?", "no"), "yes", [("colour:blue", -1), ("shape:star", -1)]),
    (_q("count", "How many crosses are there?", "three"), "two", [("shape:cross", 1)]),
    (_q("count", "How many circles are there?", "one"), "two", [("shape:circle", -1)]),
    (_q("count", "How many purple objects are there?", "zero"), "lots", [("colour:purple", -1)]),
])
def test_what_a_misrecognition_asks_to_amplify_and_suppress(item, got, want):
    assert [(t.key, t.sign) for t in targets(item, got)] == want


def test_outcomes_and_the_table_count_each_case_once_per_key():
    red = _q("colour", "What colour is the star?", "red", ["near_colours", "small"])
    star = _q("shape", "What shape is the red object?", "star")
    cases = [Case(red, "brown", [Target("colour:red", 1)], answers={"search": "Red.", "random": "brown"}),
             Case(star, "cross", [Target("shape:star", 1)], answers={"search": "square", "random": "cross"})]
    assert outcome(red, "brown", "red") == "fixed" and outcome(star, "cross", "Cross.") == "unchanged"
    assert outcome(star, "cross", "square") == "other_wrong"
    blue = _q("colour", "What colour is the circle?", "blue")
    result = summarise([red, star], cases, ["search", "random", "oracle"],
                       {"search": [(blue, "green")], "oracle": [(blue, "Blue."), (blue, "blue")]})
    search, rand, oracle = (result["methods"][m] for m in ("search", "random", "oracle"))
    assert search["all"] == {"n": 2, "fixed": 1, "unchanged": 0, "other_wrong": 1, "no_edit": 0, "fixed_share": 0.5}
    assert search["tag:near_colours"]["fixed"] == 1 and search["tag:none"]["other_wrong"] == 1
    assert rand["all"]["unchanged"] == 2 and oracle["all"]["no_edit"] == 2  # no oracle answer: no edit made
    assert result["collateral"] == {
        "search": {"n": 1, "turned_wrong": 1, "share": 1.0, "by_type": {"colour": {"n": 1, "turned_wrong": 1}}},
        "oracle": {"n": 2, "turned_wrong": 0, "share": 0.0, "by_type": {"colour": {"n": 2, "turned_wrong": 0}}}}


def test_random_control_draws_other_features_at_the_same_values():
    like = [FeatureEdit(3, 12.0), FeatureEdit(5, 0.0)]
    for seed in range(20):
        drawn = random_edits(like, list(range(10)), random.Random(seed))
        assert [e.value for e in drawn] == [12.0, 0.0] and not {e.feature for e in drawn} & {3, 5}
        assert len({e.feature for e in drawn}) == 2


def test_a_transfer_moves_the_wrong_values_feature_to_the_right_ones_and_its_control_keeps_the_pairing():
    catalog = FeatureCatalog([FeatureEntry(1, "red", extras={"max_activation": 4.0}),
                              FeatureEntry(2, "brown", extras={"max_activation": 2.0})])
    swap = transferred([FeatureEdit(1, 12.0), FeatureEdit(2, 0.0)], catalog, strength=1.5)
    # red written where brown fired, at 1.5 x brown's activation times the ratio of their peaks (4 / 2)
    assert swap == [FeatureEdit(1, 3.0, "transfer", 2), FeatureEdit(2, 0.0)]
    assert transferred([FeatureEdit(1, 12.0)], catalog) == []  # nothing to move from: no edit
    for seed in range(10):
        drawn = random_edits(swap, list(range(3, 12)), random.Random(seed))
        assert [(e.value, e.mode) for e in drawn] == [(3.0, "transfer"), (0.0, "clamp")]
        assert drawn[0].source == drawn[1].feature != drawn[0].feature and not {e.feature for e in drawn} & {1, 2}


def test_collateral_pairs_each_case_with_a_right_answer_of_its_type_cycling():
    cases = [Case(_q("colour", "q", "red"), "x", []) for _ in range(3)] + [Case(_q("count", "q", "one"), "x", [])]
    right = [_q("colour", "a", "blue"), _q("shape", "b", "star"), _q("colour", "c", "green")]
    pairs = pair_collateral(cases, right)
    assert [item["question"] for _, item in pairs] == ["a", "c", "a"]  # no right count question: unpaired


def test_search_takes_each_words_top_hits_at_their_steering_values():
    catalog = FeatureCatalog([
        FeatureEntry(1, "red things", extras={"max_activation": 4.0}),
        FeatureEntry(2, "red and brown", extras={"max_activation": 2.0, "steer": {"value": 7.5}}),
        FeatureEntry(3, "brown wood", extras={"max_activation": 1.0}),
    ])
    edits = search_edits(catalog, catalog, [Target("colour:red", 1), Target("colour:brown", -1)], per_value=1)
    top_red = catalog.search("red", 1)[0][0].feature
    assert edits[0].feature == top_red and edits[0].value == {1: 12.0, 2: 7.5}[top_red]
    assert len(edits) == 2 and edits[1].feature != top_red and edits[1].value == 0.0  # suppress: clamp at 0
    stronger = search_edits(catalog, catalog, [Target("colour:red", 1), Target("colour:brown", -1)], per_value=1,
                            strength=3.0)
    assert [(e.feature, e.value) for e in stronger] == [(edits[0].feature, 3 * edits[0].value), (edits[1].feature, 0.0)]
    scaled = search_edits(catalog, catalog, [Target("colour:red", 1), Target("colour:brown", -1)], per_value=1,
                          strength=4.0, amplify="scale")  # the feature's own activation times 4; suppression as before
    assert [(e.feature, e.value, e.mode) for e in scaled] == [(edits[0].feature, 4.0, "scale"),
                                                              (edits[1].feature, 0.0, "clamp")]


def test_a_tested_hit_is_scored_on_the_answers_it_changed_and_the_best_is_kept():
    unsteered = ["red", "blue", "Green."]  # the first already says red: not counted for anyone
    said = [["red", "blue", "green"], ["red", "Red.", "red"], ["red", "red", "green"]]
    assert effect_rates(said, unsteered, "red") == [0.0, 1.0, 0.5]
    assert effect_rates(said, ["red", "red", "red"], "red") == [0.0, 0.0, 0.0]  # nothing left to turn
    assert pick([7, 8, 9], [0.0, 1.0, 0.5]) == 8
    assert pick([7, 8, 9], [0.5, 0.5, 0.0]) == 7  # a tie goes to the better-ranked hit
    assert pick([7, 8], [0.0, 0.0]) == 7  # no effect anywhere: plain search's top hit
    assert pick([], []) is None


def test_the_command_runs_every_row_on_a_real_engine(tmp_path, capsys):
    from lmm_steer.cli import main

    generate(tmp_path / "select", 10, seed=21)
    generate(tmp_path / "test", 2, seed=22)
    words = ["red", "blue", "green", "yellow", "circle", "square", "star", "cross", "purple", "brown"]
    rows = [{"feature": i, "explanation": f"{w} objects", "max_activation": 2.0 + i} for i, w in enumerate(words)]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fix.json"
    assert main(["eval", "fix", "--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
                 "--hookpoint", "model.layers.1", "--catalog", str(catalog), "--data", str(tmp_path / "test"),
                 "--select", str(tmp_path / "select"), "--test-hits", "2", "--test-questions", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["misrecognitions"] > 0
    assert set(result["methods"]) == {"search", "search-tested", "search-paper", "random", "oracle"}
    assert set(result["collateral"]) == {"search", "search-tested", "oracle"}
    # every colour and shape value was tested, its choice one of the hits it tried, at the rate it scored
    assert set(result["tested"]) == set(VALUE_KEYS)
    for choice in result["tested"].values():
        tried = {f: r for f, s, r in choice["tried"]}
        assert choice["feature"] in tried and tried[choice["feature"]] == choice["rate"]
        assert set(tried) <= set(range(len(words))) and all(0 <= r <= 1 for r in tried.values())
        assert choice["strength"] == 1.0 and {s for _, s, _ in choice["tried"]} == {1.0}  # --strength alone
    for table in result["methods"].values():
        cell = table["all"]
        assert cell["n"] == result["misrecognitions"]
        assert cell["fixed"] + cell["unchanged"] + cell["other_wrong"] + cell["no_edit"] == cell["n"]
    for case in result["cases"]:
        search = {e["id"] for e in case["edits"]["search"]}
        assert search <= set(range(len(words))) and not search & {e["id"] for e in case["edits"]["random"]}
        assert all(0 <= e["id"] < 64 for e in case["edits"]["oracle"])
        chosen = {result["tested"][key]["feature"] for key, sign in case["targets"]}
        assert {e["id"] for e in case["edits"]["search-tested"]} == chosen
    assert any(case["edits"]["oracle"] for case in result["cases"])
    assert "Collateral" in capsys.readouterr().out
    # hits tried under the localised gates at a grid of strengths: each value's edit takes its pair
    assert main(["eval", "fix", "--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
                 "--hookpoint", "model.layers.1", "--catalog", str(catalog), "--data", str(tmp_path / "test"),
                 "--select", str(tmp_path / "select"), "--test-hits", "2", "--test-questions", "2",
                 "--gate", "localised", "--test-gated", "--test-strengths", "1,4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for choice in result["tested"].values():
        assert {(f, s) for f, s, _ in choice["tried"]} >= {(choice["feature"], 1.0), (choice["feature"], 4.0)}
    for case in result["cases"]:
        seen = set()  # two values with one chosen feature make one edit, the first value's
        for key, sign in case["targets"]:
            choice = result["tested"][key]
            if choice["feature"] in seen:
                continue
            seen.add(choice["feature"])
            edit = next(e for e in case["edits"]["search-tested"] if e["id"] == choice["feature"])
            want = 0.0 if sign < 0 else choice["strength"] * rows[choice["feature"]]["max_activation"] * 3
            assert edit["value"] == pytest.approx(want)


class _SwapOnlyModel:
    """A stand-in engine that calls every object brown (or a square) unsteered and gives the right
    answer only to a transfer into the right value's feature: ``run`` must count that as fixed,
    and the random control (transfers between other features) as unchanged."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, reqs):
        from types import SimpleNamespace

        out = []
        for r in reqs:
            question = r.messages[0]["content"][1]["text"]
            truth = self.truth[question, r.images[0].tobytes()]
            said = ("brown" if truth != "brown" else "red") if "colour" in question else ("square" if truth != "square" else "star")
            edits = r.steering.edits if r.steering else []
            if any(e.mode == "transfer" and e.feature == self.ids.get(truth) and e.source == self.ids.get(said) for e in edits):
                said = truth
            out.append(SimpleNamespace(text=said))
        return out


def _value_catalog():
    """Every colour and shape word with a feature of its own (explained as "<word> objects"), and
    25 unexplained ones for the random control."""
    words = ["red", "blue", "green", "yellow", "purple", "brown", "gray", "cyan",
             "circle", "square", "star", "cross", "triangle", "diamond", "hexagon"]
    return words, FeatureCatalog([FeatureEntry(i, f"{w} objects", extras={"max_activation": 2.0 + i})
                                  for i, w in enumerate(words)] + [FeatureEntry(i, "", extras={"max_activation": 1.0})
                                                                   for i in range(len(words), 40)])


def _truth(data, types):
    """(question, image bytes) -> the right answer, for a stand-in model to look up."""
    from PIL import Image

    from lmm_steer.scenes.evaluate import questions

    return {(q["question"], Image.open(data / q["image"]).convert("RGB").tobytes()): q["answer"]
            for q in questions(data, None, types)}


def test_a_run_with_transfers_counts_a_swap_that_fixes_and_a_random_one_that_does_not(tmp_path):
    from lmm_steer.eval.fix import run

    generate(tmp_path, 3, seed=22)
    words, catalog = _value_catalog()
    model = _SwapOnlyModel({w: i for i, w in enumerate(words)})
    model.truth = _truth(tmp_path, ("colour", "shape"))
    result = run(model, catalog, catalog, tmp_path, types=("colour", "shape"), amplify="transfer", strength=2.0)
    assert set(result["methods"]) == {"search", "random"} and result["amplify"] == "transfer"
    n = result["misrecognitions"]
    assert n == len(model.truth) > 0
    assert result["methods"]["search"]["all"]["fixed"] == n  # each was a swap from the said value to the truth
    assert result["methods"]["random"]["all"]["unchanged"] == n
    for case in result["cases"]:
        swap, ablate = case["edits"]["search"]
        right, value, source, wrong, zero = swap["id"], swap["value"], swap["source"], ablate["id"], ablate["value"]
        assert swap["mode"] == "transfer" and "mode" not in ablate
        assert (words[right], words[source], zero) == (case["answer"], case["got"], 0.0) and wrong == source
        assert value == pytest.approx(2.0 * (2.0 + right) / (2.0 + wrong))


@pytest.mark.parametrize(("item", "got", "want"), [
    # the asked object is picked out by the question's value of the other attribute
    (_q("colour", "What colour is the star?", "red"), "brown", {"colour:red": "shape:star", "colour:brown": "shape:star"}),
    (_q("shape", "What shape is the red object?", "star"), "cross", {"shape:star": "colour:red", "shape:cross": "colour:red"}),
    (_q("exist", "Is there a red hexagon?", "yes"), "no", {"colour:red": "shape:hexagon", "shape:hexagon": "colour:red"}),
    (_q("count", "How many red crosses are there?", "three"), "two", {"shape:cross": "colour:red", "colour:red": "shape:cross"}),
    (_q("count", "How many crosses are there?", "three"), "two", {}),  # nothing else named: ungated
])
def test_a_gate_is_the_feature_of_the_questions_other_named_value(item, got, want):
    features = {key: i for i, key in enumerate(VALUE_KEYS)}
    gates = asked_gates(item, targets(item, got), features.get)
    assert gates == {k: features[v] for k, v in want.items()}
    assert asked_gates(item, targets(item, got), lambda key: None) == {}  # no feature for the word: ungated


class _GatedOnlyModel:
    """A stand-in engine that gets every colour question about a star wrong (says brown) and the rest
    right, and answers a star's colour right only to a clamp of the right colour's feature gated by
    the star feature; an ungated colour clamp makes it say that colour about any object (so gating
    keeps right answers right)."""

    def __init__(self, ids, truth, star_gate=None):
        self.ids, self.truth = ids, truth
        self.star_gate = ids["star"] if star_gate is None else star_gate  # the feature that finds stars

    def generate(self, reqs):
        from types import SimpleNamespace

        out = []
        for r in reqs:
            question = r.messages[0]["content"][1]["text"]
            truth = self.truth[question, r.images[0].tobytes()]
            said = "brown" if "star" in question and truth != "brown" else truth
            for e in r.steering.edits if r.steering else []:
                colour = next((w for w, i in self.ids.items() if i == e.feature and e.value > 0), None)
                if colour is None:
                    continue
                if e.where is None:
                    said = colour
                elif e.where == self.star_gate and "star" in question:
                    said = colour
            out.append(SimpleNamespace(text=said))
        return out


def test_a_gated_run_fixes_on_the_asked_object_and_leaves_right_answers_alone(tmp_path):
    from lmm_steer.eval.fix import run

    generate(tmp_path, 40, seed=23)
    words, catalog = _value_catalog()
    model = _GatedOnlyModel({w: i for i, w in enumerate(words)}, _truth(tmp_path, ("colour",)))
    results = {gate: run(model, catalog, catalog, tmp_path, types=("colour",), gate=gate) for gate in ("none", "asked")}
    gated, plain = results["asked"], results["none"]
    n = gated["misrecognitions"]
    assert n > 0 and gated["gate"] == "asked"
    assert "search-paper" not in gated["methods"] and "search-paper" in plain["methods"]
    for result in (gated, plain):
        assert result["methods"]["search"]["all"]["fixed"] == n  # the right colour, on the star
        assert result["methods"]["random"]["all"]["fixed"] == 0
    assert gated["collateral"]["search"]["turned_wrong"] == 0  # gated: only the star's patches
    assert plain["collateral"]["search"]["turned_wrong"] > 0  # ungated: the colour painted on every object
    for case in gated["cases"]:
        assert {e.get("where") for e in case["edits"]["search"]} == {words.index("star")}
        assert all(e["where"] != words.index("star") for e in case["edits"]["random"])


def test_localised_gates_are_the_oracles_features_on_every_row(tmp_path):
    """Stars are found by another feature than search's "star" (here the one search calls "cross");
    the oracle's choice names it, and with gate "localised" every row is gated by it, so search's
    colour clamps fix the stars they missed when gated by search's own star feature."""
    from lmm_steer.eval.fix import run

    generate(tmp_path, 40, seed=23)
    words, catalog = _value_catalog()
    ids = {w: i for i, w in enumerate(words)}
    model = _GatedOnlyModel(ids, _truth(tmp_path, ("colour",)), star_gate=ids["cross"])
    oracle = {key: ids[key.split(":")[1]] for key in VALUE_KEYS} | {"shape:star": ids["cross"]}
    asked = run(model, catalog, catalog, tmp_path, types=("colour",), gate="asked", oracle=oracle)
    localised = run(model, catalog, catalog, tmp_path, types=("colour",), gate="localised", oracle=oracle)
    n = localised["misrecognitions"]
    assert n > 0 and localised["gate"] == "localised"
    assert asked["methods"]["search"]["all"]["fixed"] == 0  # gated by search's star feature: never opens here
    assert localised["methods"]["search"]["all"]["fixed"] == localised["methods"]["oracle"]["all"]["fixed"] == n
    assert localised["collateral"]["search"]["turned_wrong"] == 0
    for case in localised["cases"]:
        assert {e.get("where") for e in case["edits"]["search"]} == {ids["cross"]}
        # the control draws other features for the same patches
        assert {e.get("where") for e in case["edits"]["random"]} == {ids["cross"]}
        assert not {e["id"] for e in case["edits"]["random"]} & ({e["id"] for e in case["edits"]["search"]} | {ids["cross"]})
    assert localised["methods"]["random"]["all"]["fixed"] == 0
    with pytest.raises(ValueError, match="oracle"):
        run(model, catalog, catalog, tmp_path, types=("colour",), gate="localised")


class _ObjectClampModel:
    """A stand-in engine that answers every colour question right, and says "red" only to a clamp of
    feature 40 at at least ``threshold`` gated by the asked shape's feature: the "red" feature that
    search ranks first (0) moves nothing, and neither does any clamp on every token."""

    def __init__(self, truth, shape_ids, threshold):
        self.truth, self.shape_ids, self.threshold = truth, shape_ids, threshold

    def generate(self, reqs):
        from types import SimpleNamespace

        out = []
        for r in reqs:
            question = r.messages[0]["content"][1]["text"]
            said = self.truth[question, r.images[0].tobytes()]
            shape = next(s for s in self.shape_ids if s in question)
            for e in r.steering.edits if r.steering else []:
                if e.feature == 40 and e.value >= self.threshold and e.where == self.shape_ids[shape]:
                    said = "red"
            out.append(SimpleNamespace(text=said))
        return out


def test_hits_tried_gated_at_each_strength_keep_the_pair_that_works_on_the_object(tmp_path):
    from lmm_steer.eval.fix import Target, asked_gates
    from lmm_steer.eval.tested import tested_choice

    generate(tmp_path, 20, seed=24)
    words, catalog = _value_catalog()
    catalog = FeatureCatalog([*(catalog.get(f) for f in catalog.ids()),
                              FeatureEntry(40, "red paint", extras={"max_activation": 1.0})])
    shape_ids = {w: i for i, w in enumerate(words) if i >= 8}
    value = catalog.get(40).extras["max_activation"] * 3  # its steering value: three times its peak
    model = _ObjectClampModel(_truth(tmp_path, ("colour",)), shape_ids, threshold=2.5 * value)
    oracle = {f"shape:{w}": i for w, i in shape_ids.items()}

    def gate_for(item, key):
        return asked_gates(item, [Target(key, +1)], oracle.get).get(key)

    keys = ("colour:red",)
    gated = tested_choice(model, catalog, catalog, tmp_path, candidates=3, per_type=8, keys=keys,
                          strengths=(1.0, 3.0, 10.0), gate_for=gate_for)["colour:red"]
    assert (gated["feature"], gated["strength"]) == (40, 3.0)  # the smaller factor that works
    tried = {(f, s): r for f, s, r in gated["tried"]}
    assert tried[40, 10.0] == tried[40, 3.0] == gated["rate"] > 0 and tried[40, 1.0] == 0
    assert all(r == 0 for (f, _), r in tried.items() if f != 40)
    plain = tested_choice(model, catalog, catalog, tmp_path, candidates=3, per_type=8, keys=keys,
                          strengths=(1.0, 3.0, 10.0))["colour:red"]
    # ungated, nothing moves the answer: the top hit at the first strength, rate 0
    assert plain["rate"] == 0 and plain["strength"] == 1.0 and plain["feature"] == catalog.search("red", 1)[0][0].feature


def test_the_command_names_bad_input(tmp_path, capsys):
    from lmm_steer.cli import main

    assert main(["eval", "fix", "--data", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    generate(tmp_path / "t", 1, seed=3)
    assert main(["eval", "fix", "--data", str(tmp_path / "t"), "--types", "colour,size"]) == 2
    assert "--types" in capsys.readouterr().err
    assert main(["eval", "fix", "--data", str(tmp_path / "t"), "--gate", "localised"]) == 2
    assert "--gate localised" in capsys.readouterr().err
    assert main(["eval", "fix", "--data", str(tmp_path / "t"), "--test-gated"]) == 2
    assert "--test-gated" in capsys.readouterr().err
    for bad in ("1,x", "0,3"):
        assert main(["eval", "fix", "--data", str(tmp_path / "t"), "--test-strengths", bad]) == 2
        assert "--test-strengths" in capsys.readouterr().err
