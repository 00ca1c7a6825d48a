"""Steering by naming a concept: search by meaning, calibration arithmetic, concept resolution and
its echo, the steering benchmark's counting, and a concept-steered completion through the
official openai client."""

import json

import httpx
import pytest
import torch
from servers import Server

from lmm_steer.concepts.calibrate import CalibrationConfig, completion_logprobs, summarise_feature
from lmm_steer.concepts.embedder import default_embedder
from lmm_steer.concepts.semantic import SemanticIndex, feature_text
from lmm_steer.eval.measures import degenerate, shows
from lmm_steer.eval.steer import Judge, Record, markdown, summarise
from sae_weights import FeatureCatalog, FeatureEntry
from sae_weights.default import TEXT_CATALOG

# -- search by meaning --------------------------------------------------------------------------------


def test_search_by_meaning_finds_the_sea_without_the_word_ocean():
    catalog = FeatureCatalog.load(TEXT_CATALOG)
    index = SemanticIndex(catalog, default_embedder(), TEXT_CATALOG)
    hits = index.search("the ocean", 5)

    def contexts(e):
        return " ".join(c["text"] for c in e.extras["top_contexts"]).lower()

    sea_without_ocean = [e.feature for e, _ in hits if "ocean" not in contexts(e) and "sea" in feature_text(e)]
    assert sea_without_ocean, [(e.feature, feature_text(e)) for e, _ in hits]
    # words alone do not find them: they are not among BM25's top hits for the query
    lexical = [e.feature for e, _ in catalog.search("the ocean", 20)]
    assert not set(sea_without_ocean) & set(lexical)


def test_the_index_is_cached_by_catalog_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LMM_STEER_CACHE", str(tmp_path))
    catalog = FeatureCatalog([FeatureEntry(1, "a lighthouse by the sea"), FeatureEntry(2, "tax law")])
    embedder = default_embedder()
    first = SemanticIndex(catalog, embedder)
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 1
    calls = []
    real = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda texts, **k: calls.append(len(texts)) or real(texts, **k))
    again = SemanticIndex(catalog, embedder)
    assert calls == [] and torch.allclose(again.vectors, first.vectors.half().float())
    assert [e.feature for e, _ in again.search("waves on the coast", 2)] == [1, 2]
    SemanticIndex(FeatureCatalog([FeatureEntry(1, "a lighthouse by the sea"), FeatureEntry(2, "tax rules")]), embedder)
    assert calls == [1, 2]  # the query; then the other catalog, embedded anew


# -- calibration ----------------------------------------------------------------------------------------

CFG = CalibrationConfig(multiples=(1.0, 2.0, 3.0, 5.0), onset_gain=0.05, fluency_drop=2.5)


@pytest.mark.parametrize("gains,fluency,degenerate_shares,want", [
    # shows from 2x, breaks (fluency) at 5x: steer at 3x the maximum
    ([0.0, 0.06, 0.2, 0.3], [-2.0, -2.5, -3.0, -6.0], [0, 0, 0, 0], (2.0, 5.0, 3.0)),
    # shows from 1x, degenerate from 3x: steer at 2x
    ([0.1, 0.2, 0.3, 0.3], [-2.0, -2.1, -2.2, -2.3], [0, 0, 0.5, 1], (1.0, 3.0, 2.0)),
    # breaks before it shows: no value
    ([0.0, 0.01, 0.02, 0.2], [-2.0, -5.0, -6.0, -7.0], [0, 0, 0, 0], (5.0, 2.0, None)),
    # never shows: no value
    ([0.0] * 4, [-2.0] * 4, [0] * 4, (None, None, None)),
])
def test_calibration_arithmetic(gains, fluency, degenerate_shares, want):
    rec = summarise_feature(CFG.multiples, gains, fluency, degenerate_shares, base_fluency=-2.0, max_activation=10.0,
                            cfg=CFG)
    scaled = tuple(None if w is None else w * 10.0 for w in want)
    assert (rec["onset"], rec["limit"], rec["value"]) == scaled
    assert rec["multiples"] == list(CFG.multiples) and rec["gain"] == gains


def test_fluency_is_the_plain_models_log_probability():
    from lmm_steer.models.inputs import build_inputs
    from lmm_steer.models.loader import load_model

    lm = load_model("builtin:tiny-llama")
    prompts = ["hello there", "tell me", "hello there"]
    completions = [[5, 9, 13, 2], [7, 7, 7, 7], [100, 3, 4, 50]]
    got = completion_logprobs(lm, prompts, completions, batch=2)
    for p, c, value in zip(prompts, completions, got, strict=True):
        ids = build_inputs(lm, [{"role": "user", "content": p}])["input_ids"][0].tolist()
        full = torch.tensor([ids + c])
        with torch.inference_mode():
            logp = torch.log_softmax(lm.model(input_ids=full).logits[0, :-1].float(), -1)
        want = logp[torch.arange(len(ids) - 1, len(ids) - 1 + len(c)), torch.tensor(c)].mean()
        assert value == pytest.approx(float(want), abs=1e-4)


# -- concept steering through the server ------------------------------------------------------------------

CATALOG_ROWS = [
    {"feature": 3, "explanation": "red apples and other fruit", "max_activation": 4.0,
     "steer": {"onset": 4.0, "limit": 8.0, "value": None}},  # calibrated: no usable value
    {"feature": 7, "explanation": "dogs, puppies and their barking", "max_activation": 5.0,
     "steer": {"onset": 5.0, "limit": 20.0, "value": 15.0}},
    {"feature": 11, "explanation": "written text on street signs", "max_activation": 6.0},  # never calibrated
    {"feature": 20, "explanation": "fresh fruit juice", "max_activation": 2.0,
     "steer": {"onset": 2.0, "limit": 8.0, "value": 4.0}},
]


@pytest.fixture(scope="module")
def concept_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("cat") / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CATALOG_ROWS))
    s = Server("--model", "builtin:tiny-llama", "--sae", "builtin:random-topk", "--max-seq-len", "512",
               "--catalog", str(path))
    yield s
    s.stop()


def _chat(server, steering, **kw):
    return server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}],
                                                "max_tokens": 8, "temperature": 0, "steering": steering, **kw})


def test_a_concept_resolves_to_its_calibrated_feature_and_is_echoed(concept_server):
    r = _chat(concept_server, {"concepts": [{"text": "puppies", "strength": 1.5}]})
    assert r.status_code == 200, r.text
    applied = r.json()["steering"]
    assert applied["features"] == [{"id": 7, "value": 22.5, "mode": "clamp",
                                    "explanation": "dogs, puppies and their barking", "concept": "puppies"}]
    assert applied["concepts"] == [{"text": "puppies", "strength": 1.5, "features": [7]}]
    assert applied["scope"] == "generated"  # where calibration measured the values
    same = _chat(concept_server, {"features": [{"id": 7, "value": 22.5}], "scope": "generated"})
    assert same.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    # negative strength pushes against it
    neg = _chat(concept_server, {"concepts": [{"text": "puppies", "strength": -1}]}).json()["steering"]
    assert neg["features"][0]["value"] == -15.0


def test_calibration_decides_which_feature_a_concept_gets(concept_server):
    # fruit: feature 3 is nearer but calibration found no usable value for it; 20 has one
    r = _chat(concept_server, {"concepts": [{"text": "apples and fruit"}]}).json()["steering"]
    assert [f["id"] for f in r["features"]] == [20] and r["features"][0]["value"] == 4.0
    # an uncalibrated feature falls back to the README's recipe: 3 x its largest activation
    r = _chat(concept_server, {"concepts": [{"text": "text on a street sign"}]}).json()["steering"]
    assert r["features"][0]["id"] == 11 and r["features"][0]["value"] == 18.0
    # a concept and an explicit edit of the same feature do not collide: the concept takes another
    r = _chat(concept_server, {"features": [{"id": 7, "value": 1.0}], "concepts": [{"text": "puppies"}]})
    assert r.status_code == 200 and 7 not in r.json()["steering"]["concepts"][0]["features"]


def test_suggest_lists_candidates_without_generating(concept_server):
    before = concept_server.metric("lmm_steer:generation_tokens_total")
    r = concept_server.post("/v1/steering/suggest", {"text": "apples and fruit", "limit": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == body["concept"] == "apples and fruit"
    assert body["edits"][0]["id"] == 20 and body["edits"][0]["value"] == 4.0
    by_id = {c["id"]: c for c in body["candidates"]}
    assert by_id[3]["value"] is None and by_id[3]["calibrated"] is True and len(body["candidates"]) == 3
    assert concept_server.metric("lmm_steer:generation_tokens_total") == before
    bad = concept_server.post("/v1/steering/suggest", {"text": "", "limit": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text"
    missing = concept_server.post("/v1/steering/suggest", {"limit": 3})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "text"
    # the field's earlier name still works (deprecated), with the same answer
    old = concept_server.post("/v1/steering/suggest", {"concept": "apples and fruit", "limit": 3})
    assert old.status_code == 200 and old.json()["edits"] == body["edits"]
    assert old.json()["candidates"] == body["candidates"]


def test_concept_steering_through_the_openai_client(concept_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{concept_server.url}/v1", api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model="builtin:tiny-llama", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me a story"}])
    steered = client.chat.completions.create(
        model="builtin:tiny-llama", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Tell me a story"}],
        extra_body={"steering": {"concepts": [{"text": "dogs", "strength": 2}]}})
    assert steered.model_extra["steering"]["concepts"][0]["features"] == [7]
    assert steered.choices[0].message.content != plain.choices[0].message.content


def test_the_sdk_and_cli_build_concept_steering():
    from lmm_steer_client import Steering
    from lmm_steer_client.cli import _concept

    s = Steering().clamp(3, 2.0).concept("the ocean", -0.5, max_features=2)
    assert s.to_dict()["concepts"] == [{"text": "the ocean", "strength": -0.5, "max_features": 2}]
    with pytest.raises(ValueError, match="strength"):
        Steering().concept("war", 9)
    assert _concept("the ocean=0.5") == ("the ocean", 0.5) and _concept("x=y") == ("x=y", 1.0)


# -- the benchmark's counting -------------------------------------------------------------------------------


def test_degenerate_and_shown():
    assert degenerate("and and and then")
    assert degenerate("the earth, the earth, the earth is round")
    assert degenerate("words\u00a0\u00a0\u00a0here")
    assert degenerate("a b a b a b a b c d")  # over 8 words, under half distinct
    assert not degenerate("The sea was calm, and the gulls circled over the harbour at dawn.")
    assert shows("Waves broke on the Beach.", ["beach"]) and not shows("beaches", ["beach"])


def _rec(concept, condition, shown_word, bad=False, fluency=-2.0, similarity=0.5, judge=None):
    text = f"a text about {shown_word}" if shown_word else "a plain text"
    if bad:
        text = "and and and"
    return Record(concept, condition, "p", text, shown=bool(shown_word), degenerate=bad, fluency=fluency,
                  similarity=similarity, judge=judge)


def test_benchmark_counting_on_constructed_outputs():
    records = [
        # ocean: unsteered shows it once; steered 3 of 3 -> success; recipe 2 of 3 but one degenerate
        _rec("ocean", "unsteered", "sea"), _rec("ocean", "unsteered", None), _rec("ocean", "unsteered", None),
        _rec("ocean", "concept", "sea"), _rec("ocean", "concept", "waves"), _rec("ocean", "concept", "sea"),
        _rec("ocean", "recipe", "sea"), _rec("ocean", "recipe", "sea"), _rec("ocean", "recipe", None, bad=True),
        # war: unsteered already shows it 2 of 3 -> steered 2 of 3 is not more often: no success
        _rec("war", "unsteered", "war"), _rec("war", "unsteered", "war"), _rec("war", "unsteered", None),
        _rec("war", "concept", "war"), _rec("war", "concept", "battle"), _rec("war", "concept", None),
        _rec("war", "recipe", "war", judge={"concept": 2, "fluency": 0}), _rec("war", "recipe", "war"),
        _rec("war", "recipe", "war", fluency=-5.0),
    ]
    summary = summarise(records)
    per = summary["per_concept"]
    assert per["ocean"]["concept"]["success"] and per["ocean"]["recipe"]["success"]
    assert not per["war"]["concept"]["success"] and per["war"]["recipe"]["success"]
    assert not per["ocean"]["unsteered"]["success"]
    overall = summary["overall"]
    assert (overall["concept"]["succeeded"], overall["concept"]["concepts"]) == (1, 2)
    assert overall["recipe"]["degenerate"] == 1 and overall["recipe"]["degenerate_share"] == pytest.approx(1 / 6, abs=1e-4)
    assert overall["recipe"]["fluency"] == pytest.approx((-2.0 * 5 - 5.0) / 6, abs=1e-4)
    assert overall["recipe"]["judge"] == 0.0  # harmonic mean: a concept without fluency scores 0
    table = markdown(summary)
    assert "| concept | 1/2 (50%) | 5/6 |" in table and "| ocean |" in table


def test_the_judge_reads_axbench_scores():
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Concept: 2, Fluency: 1"}}]})

    judge = Judge("http://judge/v1", "m", "key", transport=httpx.MockTransport(handler))
    assert judge.score("the ocean", "Tell me a story.", "The waves...") == {"concept": 2, "fluency": 1}
    assert seen[0]["model"] == "m" and seen[0]["temperature"] == 0 and "the ocean" in seen[0]["messages"][0]["content"]


def test_without_the_embedding_model_concepts_are_a_clear_400_and_search_uses_words():
    from fastapi.testclient import TestClient

    from lmm_steer.api.app import ServerSettings, create_app
    from lmm_steer.engine import Engine, EngineConfig
    from lmm_steer.models.loader import load_model
    from lmm_steer.service import SteeringService
    from sae_weights import load_sae

    lm = load_model("builtin:tiny-llama")
    catalog = FeatureCatalog([FeatureEntry(7, "dogs and puppies"), FeatureEntry(9, "tax law")])
    service = SteeringService(Engine(lm, load_sae("builtin:random-topk", d_in=64), "model.layers.2",
                                     EngineConfig(max_batch=2, max_seq_len=128)), catalog=catalog)
    service.start()  # service.concepts stays None: what serve does when the model is not installed
    try:
        with TestClient(create_app(service, ServerSettings())) as client:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "steering": {"concepts": [{"text": "dogs"}]}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "concepts_unavailable"
            assert r.json()["error"]["param"] == "steering.concepts"
            r = client.post("/v1/steering/suggest", json={"text": "dogs"})  # the request is fine: the server lacks it
            assert r.status_code == 501 and r.json()["error"]["code"] == "concepts_unavailable"
            assert "embedding model" in r.json()["error"]["message"]
            hits = client.get("/v1/features", params={"q": "dogs"}).json()["data"]
            assert [h["id"] for h in hits] == [7]  # words only: the tax feature scores 0 and is left out
    finally:
        service.stop()
