"""Conditions by question type (``effects.conditions``, ``lmm-steer sae conditions``): the feature
firing on one type's prompts alone, written into effect rows, and taken by concept steering."""

import json
from types import SimpleNamespace

import torch

from lmm_steer.concepts.resolve import resolve_concept
from lmm_steer.concepts.semantic import SemanticIndex
from lmm_steer.effects.conditions import Condition, by_type, with_conditions
from lmm_steer.engine import FeatureEdit
from sae_weights import FeatureCatalog, FeatureEntry


def test_each_type_gets_the_feature_that_fires_on_its_prompts_alone():
    items = [{"type": t} for t in ["colour"] * 4 + ["shape"] * 4 + ["exist"] * 2]
    peaks = torch.zeros(10, 6)
    peaks[:, 0] = 5.0  # fires everywhere: tells nothing
    peaks[:4, 1] = torch.tensor([3.0, 2.0, 4.0, 1.0])  # colour alone, weakest 1.0
    peaks[:4, 2] = torch.tensor([3.0, 2.0, 4.0, 2.5])  # colour alone, weakest 2.0: wins the tie
    peaks[4:7, 3] = 6.0  # three of the four shape prompts
    peaks[4:8, 4] = 1.0
    peaks[0, 4] = 1.0  # every shape prompt, and one colour prompt
    found = by_type(items, peaks)
    assert found["colour"] == Condition("colour", 2, 1.0, 0.0, 4, 6, 2.0) and found["colour"].usable
    shape = found["shape"]
    assert shape.feature in (3, 4) and not shape.usable  # 0.75 recall, or a leak of 1 in 6: neither is exact
    exist = found["exist"]  # nothing fires on its prompts alone: the best tells them apart no better than chance
    assert exist.recall - exist.leak == 0.0 and not exist.usable
    assert by_type([{"type": "colour"}] * 3, torch.ones(3, 4)) == {}  # one type: nothing to tell apart


def test_rows_get_their_types_condition_and_lose_a_stale_one():
    conditions = {"colour": Condition("colour", 7, 1.0, 0.0, 10, 30, 3.0),
                  "shape": Condition("shape", 9, 0.8, 0.0, 10, 30, 3.0)}  # not usable
    grid = [{"value": 50.0, "rate": 0.5, "kept_other": 0.9}, {"value": 75.0, "rate": 0.8, "kept_other": 0.9},
            {"value": 100.0, "rate": 1.0, "kept_other": 0.5}, {"value": 150.0, "rate": 1.0, "kept_other": 0.1}]
    rows = [{"feature": 1, "effect": {"type": "colour", "grid": grid},
             "steer": {"value": 75.0, "scope": "image", "rate": 0.8, "kept_other": 0.9}},
            {"feature": 2, "effect": {"type": "shape", "grid": grid[:1]},
             "steer": {"value": 50.0, "scope": "image", "when": 4}},
            {"feature": 3, "effect": {"type": "colour"}}]
    out = with_conditions(rows, conditions, {"data": "seed 34"})
    first = out[0]["steer"]
    assert first["when"] == 7 and first["condition"]["data"] == "seed 34"
    # conditioned, the other type's answers are kept by the condition: the smallest value of the best rate
    assert (first["value"], first["rate"], first["kept_other"]) == (100.0, 1.0, 0.5)
    assert first["unconditioned"] == {"value": 75.0, "rate": 0.8, "kept_other": 0.9}
    assert "when" not in out[1]["steer"] and out[2] == rows[2]
    assert "when" not in rows[0]["steer"]  # the input rows are left as they were
    # read again without a usable condition, a row is restored to its unconditioned record
    again = with_conditions(out, {}, {})
    assert again[0]["steer"] == rows[0]["steer"] and with_conditions(out, conditions, {"data": "seed 34"}) == out


def test_a_concept_takes_its_rows_condition_unless_the_request_turns_it_off():
    from test_effects import WordEmbedder

    from lmm_steer.api.schemas import ChatCompletionRequest
    from lmm_steer.api.steering_request import resolve_steering

    catalog = FeatureCatalog([FeatureEntry(2, "red", extras={
        "max_activation": 19.0, "effect": {"best": "red", "rate": 0.9, "n": 20, "kept_other": 0.9, "value": 75.0,
                                           "scope": "image", "stage": "grid"},
        "steer": {"value": 75.0, "scope": "image", "when": 11}})])
    index = SemanticIndex(catalog, WordEmbedder())
    edit, = resolve_concept(index, "red")
    assert (edit.feature, edit.value, edit.when) == (2, 75.0, 11)
    service = SimpleNamespace(concepts=index)

    def resolved(concept):
        body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                     "steering": {"concepts": [concept]}})
        return resolve_steering(body, service).spec

    assert resolved({"text": "red"}).edits == [FeatureEdit(2, 75.0, when=11)]
    assert resolved({"text": "red", "condition": False}).edits == [FeatureEdit(2, 75.0)]


def test_the_command_writes_each_rows_condition_as_read_on_the_split(tmp_path, capsys):
    from lmm_steer.cli import main
    from lmm_steer.scenes.generate import generate

    generate(tmp_path / "split", 3, seed=27)
    rows = [{"feature": 1, "effect": {"type": "colour"}, "steer": {"value": 50.0, "scope": "image"}},
            {"feature": 2, "effect": {"type": "shape"}, "steer": {"value": 50.0, "scope": "image", "when": 0}}]
    effects = tmp_path / "effects.jsonl"
    effects.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "conditioned.jsonl"
    assert main(["sae", "conditions", "--model", "builtin:tiny-llava-next", "--sae",
                 "builtin:random-topk:latents=512,k=8", "--hookpoint", "model.layers.1", "--data",
                 str(tmp_path / "split"), "--effects", str(effects), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    found = report["conditions"]
    assert {"colour", "shape", "exist"} <= set(found)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for row in written:
        c = found[row["effect"]["type"]]
        assert row["steer"].get("when") == (c["feature"] if c["usable"] else None)
        assert ("condition" in row["steer"]) == c["usable"]
    assert report["rows_conditioned"] == sum(found[t]["usable"] for t in ("colour", "shape"))
    assert effects.read_text().count("\n") == 2 and json.loads(effects.read_text().splitlines()[1])["steer"]["when"] == 0
    assert main(["sae", "conditions", "--data", str(tmp_path / "nowhere"), "--effects", str(effects)]) == 2
