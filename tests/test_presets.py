"""Steering presets: loading, the merge rule, and serving them as models to a stock OpenAI client."""

import json
import subprocess
import sys

import pytest
from servers import Server

from lmm_steer.presets import PresetError, check_presets, load_presets, table_width

MODEL = "builtin:tiny-llama"
CATALOG_ROWS = [
    {"feature": 7, "explanation": "dogs, puppies and their barking", "max_activation": 9.0,
     "steer": {"onset": 5.0, "limit": 20.0, "value": 15.0}},
    {"feature": 20, "explanation": "fresh fruit juice", "max_activation": 2.0,
     "steer": {"onset": 2.0, "limit": 8.0, "value": 4.0}},
]
PRESETS = [
    {"name": "push-3", "description": "feature 3 high, dogs down",
     "steering": {"features": [{"id": 3, "value": 40.0}, {"id": 7, "value": -5.0}]}},
    {"name": "puppies", "description": "toward puppies, by concept", "steering": {"concepts": [{"text": "puppies"}]}},
    {"name": "paper-3", "description": "feature 3 in paper semantics",
     "steering": {"features": [{"id": 3, "value": 30.0}], "semantics": "paper"}},
]


def _write(path, rows, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


# -- loading --------------------------------------------------------------------------------------------------


def test_a_file_a_list_a_jsonl_and_a_directory_load_by_name(tmp_path):
    one = _write(tmp_path / "one.json", PRESETS[0])
    assert list(load_presets(one)) == ["push-3"]
    assert list(load_presets(_write(tmp_path / "many.json", PRESETS[1:]))) == ["puppies", "paper-3"]
    folder = tmp_path / "dir"
    folder.mkdir()
    _write(folder / "a.jsonl", PRESETS[:2], jsonl=True)
    _write(folder / "b.json", PRESETS[2])
    (folder / "notes.txt").write_text("not a preset")
    loaded = load_presets(folder)
    assert sorted(loaded) == ["paper-3", "puppies", "push-3"]
    assert loaded["paper-3"].steering.semantics == "paper" and loaded["push-3"].steering.features[1].value == -5.0


@pytest.mark.parametrize(("rows", "message"), [
    ([PRESETS[0], PRESETS[0]], "'push-3' is defined twice"),
    ([{**PRESETS[0], "name": "has space"}], "name: String should match pattern"),
    ([{"name": "x", "description": "d", "steering": {"features": [{"id": 1, "value": "big"}]}}],
     "steering.features[0].value"),
    ([{"name": "x", "description": "d", "steering": {"preset": "push-3", "features": [{"id": 1, "value": 1.0}]}}],
     "cannot name another preset"),
    ([{"name": "x", "description": "d", "steering": {}}], "needs features or concepts"),
    ([{"name": "x", "steering": PRESETS[0]["steering"]}], "description: Field required"),
])
def test_a_bad_preset_is_refused_naming_its_file_and_field(tmp_path, rows, message):
    path = _write(tmp_path / "bad.json", rows)
    with pytest.raises(PresetError, match="bad.json") as e:
        load_presets(path)
    assert message in str(e.value)


def test_presets_are_checked_against_the_sae_and_the_limits(tmp_path):
    presets = load_presets(_write(tmp_path / "p.json", PRESETS))
    check_presets(presets, 64, 8, "topk", 1e4, has_concepts=True)
    with pytest.raises(PresetError, match=r"preset 'push-3': steering.features\[0\].id: feature 3 does not exist"):
        check_presets(presets, 3, 8, "topk", 1e4, has_concepts=True)
    with pytest.raises(PresetError, match=r"'push-3': steering.features\[0\].value"):
        check_presets(presets, 64, 8, "topk", 10.0, has_concepts=True)
    with pytest.raises(PresetError, match="'puppies': steering.concepts: concept steering needs search by meaning"):
        check_presets(presets, 64, 8, "topk", 1e4, has_concepts=False)
    with pytest.raises(PresetError, match="no such file"):
        load_presets(tmp_path / "missing.json")


def test_the_edit_table_widens_to_hold_the_largest_preset(tmp_path):
    """A preset may carry more edits than a request's default limit (one slot per named object, each
    with its own condition read on the text): the server's table widens to hold it, concepts counted
    at their most features."""
    wide = {"name": "spotlight", "description": "one feature lit per named object",
            "steering": {"features": [{"id": f, "value": 2.0, "mode": "scale", "where": 40 + c, "when": 50 + c,
                                       "when_on": "text"} for c in range(5) for f in range(8)],
                         "concepts": [{"text": "puppies", "max_features": 3}]}}
    presets = load_presets(_write(tmp_path / "p.json", [*PRESETS, wide]))
    assert table_width(presets, 32) == 43 and table_width(presets, 64) == 64
    with pytest.raises(PresetError, match="'spotlight': steering.features: 40 feature edits exceed the limit of 32"):
        check_presets(presets, 64, 32, "topk", 1e4, has_concepts=True)
    check_presets(presets, 64, table_width(presets, 32), "topk", 1e4, has_concepts=True)
    assert {f.when_on for f in presets["spotlight"].steering.features} == {"text"}


def test_the_server_refuses_to_start_with_a_preset_its_sae_cannot_apply(tmp_path):
    bad = _write(tmp_path / "bad.json", {**PRESETS[0], "steering": {"features": [{"id": 10**6, "value": 1.0}]}})
    r = subprocess.run([sys.executable, "-m", "lmm_steer.cli", "serve", "--model", MODEL, "--sae", "builtin:random-topk",
                        "--presets", str(bad), "--port", "9"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--presets preset 'push-3': steering.features[0].id: feature 1000000 does not exist" in r.stderr


# -- serving --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preset_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    catalog = _write(root / "catalog.jsonl", CATALOG_ROWS, jsonl=True)
    _write(root / "presets.json", PRESETS)
    s = Server("--model", MODEL, "--sae", "builtin:random-topk", "--max-seq-len", "512", "--catalog", str(catalog),
               "--presets", str(root / "presets.json"))
    yield s
    s.stop()


def _chat(server, steering=None, model=None, **kw):
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8, "temperature": 0, **kw}
    if steering is not None:
        body["steering"] = steering
    if model is not None:
        body["model"] = model
    return server.post("/v1/chat/completions", body)


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_models_lists_each_preset_under_its_model(preset_server):
    cards = preset_server.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL, f"{MODEL}:paper-3", f"{MODEL}:puppies", f"{MODEL}:push-3"]
    assert cards[0].get("parent") is None and all(c["parent"] == MODEL for c in cards[1:])
    push = cards[3]["preset"]
    assert push["description"] == "feature 3 high, dogs down"
    assert push["steering"]["features"] == [{"id": 3, "value": 40.0, "mode": "clamp"},
                                            {"id": 7, "value": -5.0, "mode": "clamp"}]


def test_a_stock_openai_client_steers_by_choosing_the_preset_as_its_model(preset_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{preset_server.url}/v1", api_key="unused", max_retries=0)
    ask = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Tell me a story"}]}
    plain = client.chat.completions.create(model=MODEL, **ask)
    steered = client.chat.completions.create(model=f"{MODEL}:push-3", **ask)
    inline = _text(_chat(preset_server, PRESETS[0]["steering"]))
    assert steered.model == f"{MODEL}:push-3" and plain.model == MODEL
    assert steered.choices[0].message.content == inline != plain.choices[0].message.content
    assert steered.model_extra["steering"]["preset"] == "push-3"
    streamed = client.chat.completions.create(model=f"{MODEL}:push-3", stream=True, **ask)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == inline
    assert {c.model for c in chunks} == {f"{MODEL}:push-3"}


def test_a_preset_named_in_steering_equals_its_edits_sent_inline(preset_server):
    by_name = _chat(preset_server, {"preset": "puppies"})
    inline = _chat(preset_server, PRESETS[1]["steering"])
    assert _text(by_name) == _text(inline)
    applied, sent = by_name.json()["steering"], inline.json()["steering"]
    assert applied["preset"] == "puppies" and sent["preset"] is None
    assert applied["features"] == sent["features"] and applied["features"][0]["id"] == 7
    assert applied["scope"] == sent["scope"] == "generated"
    assert by_name.json()["model"] == MODEL


def test_request_edits_apply_on_top_of_a_preset_by_the_documented_rule(preset_server):
    # an edit of a feature the preset edits replaces the preset's; the preset's others stay
    r = _chat(preset_server, {"preset": "push-3", "features": [{"id": 3, "value": 0.0}, {"id": 9, "value": 2.0}]})
    edits = [(f["id"], f["value"]) for f in r.json()["steering"]["features"]]
    assert edits == [(3, 0.0), (9, 2.0), (7, -5.0)]
    same = _chat(preset_server, {"features": [{"id": 3, "value": 0.0}, {"id": 9, "value": 2.0}, {"id": 7, "value": -5.0}]})
    assert _text(r) == _text(same)
    # clamps count as request edits too, and concepts add to the preset's edits
    both = _chat(preset_server, {"preset": "push-3", "concepts": [{"text": "juice"}]}, clamps={"7": 1.0})
    assert [(f["id"], f["value"]) for f in both.json()["steering"]["features"]] == [(7, 1.0), (3, 40.0), (20, 4.0)]
    # scope and semantics stand unless the request gives its own
    assert _chat(preset_server, {"preset": "paper-3"}).json()["steering"]["semantics"] == "paper"
    mixed = _chat(preset_server, {"preset": "paper-3", "semantics": "delta", "scope": "generated"}).json()["steering"]
    assert (mixed["semantics"], mixed["scope"]) == ("delta", "generated")


def test_unknown_and_conflicting_presets_are_clear_errors(preset_server):
    r = _chat(preset_server, model=f"{MODEL}:nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "preset 'nope' is not loaded here (presets: paper-3, puppies, push-3)" in r.json()["error"]["message"]
    r = _chat(preset_server, {"preset": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "steering.preset"
    assert r.json()["error"]["code"] == "preset_not_found"
    r = _chat(preset_server, {"preset": "puppies"}, model=f"{MODEL}:push-3")
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.preset"
    assert _chat(preset_server, {"preset": "push-3"}, model=f"{MODEL}:push-3").status_code == 200
    assert _chat(preset_server, model="other-model").json()["error"]["code"] == "model_not_found"
    inspect = {"messages": [{"role": "user", "content": "Tell me a story"}], "top_k": 2}
    plain = preset_server.post("/v1/inspect", {**inspect, "model": MODEL})
    as_preset = preset_server.post("/v1/inspect", {**inspect, "model": f"{MODEL}:push-3"})
    assert as_preset.status_code == 200 and as_preset.json()["positions"] == plain.json()["positions"]
    assert preset_server.post("/v1/inspect", {**inspect, "model": f"{MODEL}:nope"}).status_code == 404


def test_metrics_count_requests_per_preset(preset_server):
    def count(preset):
        return preset_server.metric(f'lmm_steer:preset_requests_total{{model_name="{MODEL}",preset="{preset}"}}')

    before = count("paper-3")
    for _ in range(3):
        _text(_chat(preset_server, model=f"{MODEL}:paper-3"))
    assert count("paper-3") == before + 3


def test_the_sdk_and_its_cli_choose_a_preset(preset_server):
    from lmm_steer_client import Client, Steering

    inline = _text(_chat(preset_server, PRESETS[0]["steering"]))
    with Client(preset_server.url) as client:
        assert client.chat(prompt="Tell me a story", preset="push-3", max_tokens=8, temperature=0).text == inline
        on_top = client.chat(prompt="Tell me a story", steering=Steering().clamp(3, 0.0).preset("push-3"),
                             max_tokens=8, temperature=0)
        assert [f["id"] for f in on_top.steering["features"]] == [3, 7] and on_top.steering["preset"] == "push-3"
        assert [m["id"] for m in client.models()][1:] == [f"{MODEL}:paper-3", f"{MODEL}:puppies", f"{MODEL}:push-3"]
    cli = [sys.executable, "-m", "lmm_steer_client.cli", "--base-url", preset_server.url]
    r = subprocess.run([*cli, "chat", "Tell me a story", "--preset", "push-3", "--no-stream", "--max-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == inline + "\n"
    listed = subprocess.run([*cli, "models"], capture_output=True, text=True)
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()][-1] == f"{MODEL}:push-3"
