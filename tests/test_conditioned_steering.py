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
