"""`lmm-steer eval preset` (issue #18): a preset's strength chosen on one split, measured on another."""

import json

from lmm_steer.engine import FeatureEdit, SteeringSpec
from lmm_steer.eval.preset import calibrated_preset, choose, markdown, scaled, tally
from lmm_steer.presets import load_presets
from lmm_steer.scenes.generate import generate

PRESET = {"name": "red-not-brown", "description": "amplify 3, suppress 5",
          "steering": {"features": [{"id": 3, "value": 40.0}, {"id": 5, "value": 0.0}], "scope": "image"}}


def _item(kind, answer):
    return {"type": kind, "answer": answer, "image": "x.png", "question": "?"}


def test_outcomes_are_counted_per_type_with_net_and_accuracies():
    items = [_item("shape", "cross"), _item("shape", "square"), _item("colour", "red"), _item("colour", "blue")]
    plain = ["square", "square", "red", "brown"]
    steered = ["Cross.", "cross", "red", "brown"]  # fixed, broken, kept right, kept wrong
    t = tally(items, plain, steered)
    assert t["all"] == {"kept right": 1, "fixed": 1, "broken": 1, "kept wrong": 1, "n": 4, "net": 0,
                        "accuracy_before": 0.5, "accuracy_after": 0.5}
    assert (t["shape"]["fixed"], t["shape"]["broken"], t["colour"]["kept right"]) == (1, 1, 1)


def test_the_factor_with_most_fixed_minus_broken_wins_the_smallest_on_a_tie_none_if_none_helps():
    def cells(net):
        return {"all": {"net": net}}

    assert choose({0.1: cells(2), 0.5: cells(5), 1.0: cells(-40)}) == 0.5
    assert choose({0.1: cells(3), 0.2: cells(3), 1.0: cells(1)}) == 0.1
    assert choose({0.1: cells(0), 1.0: cells(-3)}) is None
    assert choose({}) is None


def test_scaling_multiplies_amplifications_and_keeps_suppressions_at_zero():
    spec = SteeringSpec([FeatureEdit(3, 40.0), FeatureEdit(5, 0.0, "clamp")], scope="image")
    half = scaled(spec, 0.5)
    assert [(e.feature, e.value, e.mode) for e in half.edits] == [(3, 20.0, "clamp"), (5, 0.0, "clamp")]
    assert half.scope == "image" and half.semantics == "delta" and spec.edits[0].value == 40.0


def test_the_written_preset_is_servable_and_says_where_its_factor_was_chosen(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(PRESET))
    preset = load_presets(tmp_path / "p.json")["red-not-brown"]
    cell = {"kept right": 50, "fixed": 4, "broken": 1, "kept wrong": 5, "n": 60, "net": 3,
            "accuracy_before": 51 / 60, "accuracy_after": 54 / 60}
    result = {"select": "/x/scenes-sel15", "data": "/x/scenes-test16", "types": ["colour"], "select_questions": 60,
              "questions": 70, "scales": {"0.2": {"all": cell}}, "chosen": 0.2, "test": {"as found (x1)": {"all": cell}}}
    written = calibrated_preset(preset, 0.2, result, "red-not-brown-calibrated")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c.json").write_text(json.dumps(written))
    loaded = load_presets(tmp_path / "out")["red-not-brown-calibrated"]
    assert [(f.id, f.value) for f in loaded.steering.features] == [(3, 8.0), (5, 0.0)]
    assert loaded.steering.scope == "image" and "scenes-sel15" in loaded.description and "4 fixed" in loaded.description
    table = markdown(result)
    assert "| x0.2 (60) | 50 | 4 | 1 | 5 | +3 | 0.850 -> 0.900 |" in table and "Chosen factor: x0.2" in table


def test_the_command_chooses_on_one_split_and_measures_on_another(tmp_path, capsys):
    from lmm_steer.cli import main

    generate(tmp_path / "select", 3, seed=23)
    generate(tmp_path / "test", 2, seed=24)
    (tmp_path / "p.json").write_text(json.dumps(PRESET))
    out = tmp_path / "preset.json"
    common = ["eval", "preset", "--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
              "--hookpoint", "model.layers.1", "--presets", str(tmp_path / "p.json"), "--preset", "red-not-brown"]
    assert main([*common, "--select", str(tmp_path / "select"), "--data", str(tmp_path / "test"),
                 "--scales", "0.5,1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["scales"]) == {"0.5", "1"} and result["select_questions"] > 0 and result["questions"] > 0
    for cells in [*result["scales"].values(), *result["test"].values()]:
        cell = cells["all"]
        assert sum(cell[k] for k in ("kept right", "fixed", "broken", "kept wrong")) == cell["n"]
    assert all(c["all"]["n"] == result["select_questions"] for c in result["scales"].values())
    assert result["test"]["as found (x1)"]["all"]["n"] == result["questions"]
    assert "Chosen factor" in capsys.readouterr().out
    # bad input is named
    assert main([*common, "--select", str(tmp_path / "test"), "--data", str(tmp_path / "test")]) == 2
    assert "--select and --data" in capsys.readouterr().err
    assert main([*common[:-1], "nope", "--select", str(tmp_path / "select"), "--data", str(tmp_path / "test")]) == 2
    assert "--preset: no preset 'nope'" in capsys.readouterr().err
    assert main([*common, "--select", str(tmp_path / "select"), "--data", str(tmp_path / "test"), "--scales", "0,1"]) == 2
    assert "--scales" in capsys.readouterr().err
