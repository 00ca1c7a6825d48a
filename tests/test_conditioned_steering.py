"""Edits conditioned on the request (``when``): an edit acts on a request only if its condition
feature fires somewhere in the prompt's unedited hook-block output, and then exactly as the same
edit without a condition would; otherwise the request is the plain model's, bit for bit."""

import pytest
import torch
from test_engine import _engine

from lmm_steer.engine import EngineError, FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from lmm_steer.models.inputs import build_inputs

PROMPTS = ("Tell me a story about Alice and Bob.", "What colour is the sky over the sea?")


def _request(lm, text, steering=None, max_tokens=6):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy())
    return GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                             images=[image], steering=steering,
                             sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True))


def _fires(lm, sae, text) -> torch.Tensor:
    """Per feature, whether it fires at some position of the prompt's hook-block output."""
    req = _request(lm, text)
    inputs = build_inputs(lm, req.messages, req.images)
    with torch.no_grad():
        hs = lm.model(**inputs, output_hidden_states=True).hidden_states[3][0]
    return sae.encode(hs).gt(0).any(0)


@pytest.fixture(scope="module")
def condition(llava):
    """A feature that fires somewhere in the first prompt and nowhere in the second."""
    lm, sae = llava
    only_first = _fires(lm, sae, PROMPTS[0]) & ~_fires(lm, sae, PROMPTS[1])
    assert only_first.any(), "the two prompts share every feature: pick others"
    return int(only_first.nonzero()[0])


EDITS = [FeatureEdit(11, 25.0), FeatureEdit(7, 12.0, "add")]


def _conditioned(c):
    return [FeatureEdit(e.feature, e.value, e.mode, when=c) for e in EDITS]


@pytest.mark.parametrize("scope", ["all", "prompt", "generated", "image"])
def test_an_edit_acts_where_its_condition_fires_and_nowhere_else(llava, condition, scope):
    lm, sae = llava
    engine = _engine(lm, sae)
    plain = [engine.generate([_request(lm, t)])[0] for t in PROMPTS]
    ungated = engine.generate([_request(lm, PROMPTS[0], SteeringSpec(EDITS, scope=scope))])[0]
    opened, closed = (engine.generate([_request(lm, t, SteeringSpec(_conditioned(condition), scope=scope))])[0]
                      for t in PROMPTS)
    # the condition holds on the first prompt: the edit is the unconditioned one, bit for bit
    assert opened.token_ids == ungated.token_ids and opened.logprobs == ungated.logprobs
    assert max(abs(a - b) for a, b in zip(opened.logprobs, plain[0].logprobs, strict=True)) > 0.1
    assert opened.idle_features == []
    # it fails on the second: the plain model's answer, bit for bit, and the result says which edits idled
    assert closed.token_ids == plain[1].token_ids and closed.logprobs == plain[1].logprobs
    assert closed.idle_features == [11, 7]


def test_conditions_are_decided_per_request_in_a_batch(llava, condition):
    """Two requests with the same conditioned edits share decode steps; each gets what it gets alone,
    and a request whose slot is conditioned beside an unconditioned one keeps the latter."""
    lm, sae = llava
    mixed = [FeatureEdit(11, 25.0, when=condition), FeatureEdit(7, 12.0, "add")]
    reqs = [lambda: _request(lm, PROMPTS[0], SteeringSpec(_conditioned(condition))),
            lambda: _request(lm, PROMPTS[1], SteeringSpec(_conditioned(condition)), max_tokens=9),
            lambda: _request(lm, PROMPTS[1], SteeringSpec(mixed)),
            lambda: _request(lm, PROMPTS[1])]
    alone = [_engine(lm, sae).generate([make()])[0] for make in reqs]
    together = _engine(lm, sae).generate([make() for make in reqs])
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    only_add = _engine(lm, sae).generate([_request(lm, PROMPTS[1], SteeringSpec([FeatureEdit(7, 12.0, "add")]))])[0]
    assert alone[2].token_ids == only_add.token_ids and alone[2].idle_features == [11]
    assert alone[1].token_ids[:6] == alone[3].token_ids  # closed: the plain model's (longer) answer


@pytest.mark.parametrize("edit, semantics, message", [
    (FeatureEdit(1, 1.0, when=256), "delta", "when must be a feature id"),
    (FeatureEdit(1, 1.0, when=-2), "delta", "when must be a feature id"),
    (FeatureEdit(1, 1.0, when=3), "paper", "delta semantics"),
])
def test_a_bad_condition_is_refused_by_name(llava, edit, semantics, message):
    lm, sae = llava
    with pytest.raises(EngineError, match=message) as err:
        _engine(lm, sae).prepare(_request(lm, PROMPTS[0], SteeringSpec([edit], semantics=semantics)))
    assert err.value.field == "steering.features[0].when"


def _fires_on_image_only(lm, sae, text) -> int:
    """A feature that fires on the prompt's image tokens and at none of its text positions."""
    from lmm_steer.engine.prefill import image_token_id

    req = _request(lm, text)
    inputs = build_inputs(lm, req.messages, req.images)
    with torch.no_grad():
        hs = lm.model(**inputs, output_hidden_states=True).hidden_states[3][0]
    fires = sae.encode(hs).gt(0)
    is_image = inputs["input_ids"][0] == image_token_id(lm.model)
    only = fires[is_image].any(0) & ~fires[~is_image].any(0)
    assert only.any(), "every feature firing on the image also fires on the text: pick another SAE"
    return int(only.nonzero()[0])


def test_a_condition_read_on_the_text_ignores_the_image(llava):
    """``when_on="text"``: a feature firing on the image alone opens a condition read on the whole
    prompt and leaves one read on the text closed (the plain model's answer, bit for bit)."""
    lm, sae = llava
    engine = _engine(lm, sae)
    on_image = _fires_on_image_only(lm, sae, PROMPTS[0])
    plain = engine.generate([_request(lm, PROMPTS[0])])[0]
    whole, text = (engine.generate([_request(lm, PROMPTS[0], SteeringSpec(
        [FeatureEdit(e.feature, e.value, e.mode, when=on_image, when_on=on) for e in EDITS]))])[0]
        for on in ("prompt", "text"))
    assert whole.idle_features == [] and whole.logprobs != plain.logprobs
    assert text.idle_features == [11, 7] and text.idle_edits == [0, 1]
    assert text.token_ids == plain.token_ids and text.logprobs == plain.logprobs


def test_a_feature_edited_again_under_another_condition_acts_where_each_opens(llava, condition):
    """A feature may carry one slot per condition (e.g. one per named object): only the slots whose
    condition holds act, and the request equals the steering of those slots alone."""
    lm, sae = llava
    never = _fires_on_image_only(lm, sae, PROMPTS[0])
    twice = SteeringSpec([FeatureEdit(11, 25.0, when=condition), FeatureEdit(11, -9.0, "add", when=never, when_on="text"),
                          FeatureEdit(7, 12.0, "add")])
    got = _engine(lm, sae).generate([_request(lm, PROMPTS[0], twice)])[0]
    alone = _engine(lm, sae).generate([_request(lm, PROMPTS[0], SteeringSpec([FeatureEdit(11, 25.0),
                                                                              FeatureEdit(7, 12.0, "add")]))])[0]
    assert got.token_ids == alone.token_ids and got.logprobs == alone.logprobs
    assert got.idle_edits == [1] and got.idle_features == [11]


@pytest.mark.parametrize("edits, field, message", [
    ([FeatureEdit(1, 1.0, when=3), FeatureEdit(1, 2.0, when=3)], "steering.features[1].id", "more than once"),
    ([FeatureEdit(1, 1.0), FeatureEdit(1, 2.0, when=3)], "steering.features[1].id", "another gate or condition"),
    ([FeatureEdit(1, 1.0, where=4), FeatureEdit(1, 2.0)], "steering.features[1].id", "more than once"),
    ([FeatureEdit(1, 1.0, when_on="text")], "steering.features[0].when_on", "has none"),
    ([FeatureEdit(1, 1.0, when=3, when_on="image")], "steering.features[0].when_on", "must be one of"),
])
def test_a_repeated_feature_or_a_bad_when_on_is_refused_by_name(llava, edits, field, message):
    lm, sae = llava
    with pytest.raises(EngineError, match=message) as err:
        _engine(lm, sae).prepare(_request(lm, PROMPTS[0], SteeringSpec(edits)))
    assert err.value.field == field
    SteeringSpec([FeatureEdit(1, 1.0, when=3), FeatureEdit(1, 2.0, when=3, when_on="text"),
                  FeatureEdit(1, 3.0, where=4)]).validate(256, 8)  # each its own condition or gate: taken


def test_a_gated_edit_whose_condition_fails_leaves_the_plain_model(llava):
    """Gated and conditioned, with the condition failing on the prompt: every slot idles (a=b=0)
    and the request is the plain model's (this once recursed without end deciding the step)."""
    lm, sae = llava
    never = _fires_on_image_only(lm, sae, PROMPTS[0])
    engine = _engine(lm, sae)
    plain = engine.generate([_request(lm, PROMPTS[0])])[0]
    gated = engine.generate([_request(lm, PROMPTS[0], SteeringSpec(
        [FeatureEdit(11, 4.0, "scale", where=7, when=never, when_on="text")]))])[0]
    assert gated.token_ids == plain.token_ids and gated.logprobs == plain.logprobs and gated.idle_edits == [0]
