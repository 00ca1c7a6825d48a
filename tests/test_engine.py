import pytest
import torch
from PIL import Image
from reference import reference_generate

from lmm_steer.engine import (
    Engine,
    EngineConfig,
    EngineError,
    FeatureEdit,
    GenerationRequest,
    SamplingParams,
    SteeringSpec,
)
from lmm_steer.engine.hookpoint import HookpointError, resolve_layer_index
from lmm_steer.engine.steering import SteeringRow, SteeringTable, apply_steering, variant_for
from lmm_steer.models.builtin import TINY_MODELS
from lmm_steer.models.inputs import build_inputs
from lmm_steer.models.loader import load_model
from sae_weights import load_sae

HOOK = "model.layers.2"
N_TOKENS = 8


def _image(w=50, h=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _messages(lm, text="Tell me a story about Alice and Bob."):
    content = ([{"type": "image"}] if lm.is_multimodal else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _request(lm, text="Tell me a story about Alice and Bob.", steering=None, max_tokens=N_TOKENS, **sampling):
    return GenerationRequest(
        messages=_messages(lm, text), images=[_image()] if lm.is_multimodal else [], steering=steering,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True, **sampling),
    )


def _engine(lm, sae=None, max_batch=4, **cfg):
    return Engine(lm, sae, HOOK if sae is not None else None,
                  EngineConfig(max_batch=max_batch, max_seq_len=512, max_clamps=8, **cfg))


# -- identity -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_family_equals_plain_model_without_clamps(name):
    lm = load_model(name)
    sae = load_sae("builtin:random-topk", d_in=64)
    req = _request(lm)
    res = _engine(lm, sae).generate([req])[0]
    inputs = build_inputs(lm, req.messages, req.images or None)
    ref_tokens, ref_logprobs = reference_generate(lm, inputs, sae, 2, [], max_new_tokens=N_TOKENS)
    assert res.token_ids == ref_tokens
    assert len(set(ref_tokens)) > 2, "degenerate continuation would make this test meaningless"
    torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=1e-4)
    assert res.prompt_tokens == inputs["input_ids"].shape[1]


def test_sae_without_clamps_is_bit_identical_to_no_sae(llava):
    lm, sae = llava
    a = _engine(lm, None).generate([_request(lm)])[0]
    b = _engine(lm, sae).generate([_request(lm, steering=SteeringSpec())])[0]
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_clamp_at_natural_value_is_identity():
    sae = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64)
    h = torch.randn(6, 64) * 3
    z = sae.encode(h)
    active = z[0].nonzero()[:, 0].tolist()[:2]
    inactive = (z == 0).all(0).nonzero()[:, 0].tolist()[:2]
    feats = active + inactive
    table = SteeringTable(6, 4, "cpu", torch.float32)
    for r in range(6):
        spec = SteeringSpec([FeatureEdit(f, float(z[r, f])) for f in feats])
        table.write(r, SteeringRow.from_spec(spec), True)
    variant = variant_for([(SteeringRow.from_spec(SteeringSpec([FeatureEdit(feats[0], 1.0)])), True)])
    out = apply_steering(h, sae, table.ids, table.delta_a, table.delta_b, table.paper_c, table.paper_d,
                         table.paper, variant)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=0)
    # and a different value does move it, by exactly (v - z) W_dec[j]
    table.write(0, SteeringRow.from_spec(SteeringSpec([FeatureEdit(feats[0], float(z[0, feats[0]]) + 2)])), True)
    out = apply_steering(h, sae, table.ids, table.delta_a, table.delta_b, table.paper_c, table.paper_d,
                         table.paper, variant)
    torch.testing.assert_close(out[0], h[0] + 2 * sae.W_dec[feats[0]], atol=1e-5, rtol=0)


# -- steering semantics against the plain-PyTorch reference -----------------------------------

EDITS = {
    "clamp": [FeatureEdit(11, 25.0), FeatureEdit(40, 0.0)],
    "add": [FeatureEdit(7, 12.0, "add")],
    "scale": [FeatureEdit(3, 8.0, "scale"), FeatureEdit(90, 0.0, "scale")],
    "mixed": [FeatureEdit(11, 25.0), FeatureEdit(7, -9.0, "add"), FeatureEdit(3, 4.0, "scale")],
    "swap": [FeatureEdit(3, 0.0), FeatureEdit(11, 6.0, "transfer", 3)],  # source 3: replaced by an active one
    # gate 153 fires on a quarter of the mixed batch's gated prompt (the reference test picks its own gate)
    "gated": [FeatureEdit(11, 25.0, where=153), FeatureEdit(7, 12.0, "add", where=153), FeatureEdit(40, 0.0)],
}


def _natural_active_feature(lm, sae, req):
    """A feature that is active on the prompt, so scale/clamp-to-0 have something to act on."""
    inputs = build_inputs(lm, req.messages, req.images or None)
    with torch.no_grad():
        hs = lm.model(**inputs, output_hidden_states=True).hidden_states[3][0]
    return int(sae.encode(hs).gt(0).sum(0).argmax())


def _partly_active_feature(lm, sae, req):
    """A feature active on some of the prompt's positions but not most, so a gate on it opens and
    closes within one prompt."""
    inputs = build_inputs(lm, req.messages, req.images or None)
    with torch.no_grad():
        hs = lm.model(**inputs, output_hidden_states=True).hidden_states[3][0]
    share = sae.encode(hs).gt(0).float().mean(0)
    share[share == 0] = 2.0  # never a feature that is silent everywhere
    return int((share - 0.3).abs().argmin())


@pytest.mark.parametrize("scope", ["all", "prompt", "generated", "image"])
@pytest.mark.parametrize("kind", sorted(EDITS))
def test_delta_semantics_match_reference(llava, kind, scope):
    lm, sae = llava
    edits = list(EDITS[kind])
    if kind == "scale":
        f = _natural_active_feature(lm, sae, _request(lm))
        edits = [FeatureEdit(f, 8.0, "scale")]
    if kind == "swap":  # where the active feature fires, the model reads feature 11 instead
        f = _natural_active_feature(lm, sae, _request(lm))
        edits = [FeatureEdit(f, 0.0), FeatureEdit(11, 6.0, "transfer", f)]
    if kind == "gated":
        f = _partly_active_feature(lm, sae, _request(lm))
        edits = [FeatureEdit(11, 25.0, where=f), FeatureEdit(7, 12.0, "add", where=f), FeatureEdit(40, 0.0)]
    req = _request(lm, steering=SteeringSpec(edits, scope=scope))
    res = _engine(lm, sae).generate([req])[0]
    inputs = build_inputs(lm, req.messages, req.images)
    ref_tokens, ref_lp = reference_generate(lm, inputs, sae, 2, edits, scope=scope, max_new_tokens=N_TOKENS)
    assert res.token_ids == ref_tokens
    torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)
    if (kind, scope) not in (("scale", "generated"), ("swap", "generated"), ("gated", "generated")):  # silent there
        plain = _engine(lm, sae).generate([_request(lm)])[0]
        assert max(abs(a - b) for a, b in zip(res.logprobs, plain.logprobs, strict=True)) > 0.1


def test_a_gate_opens_where_its_feature_fires_and_closes_elsewhere(llava):
    """A gated clamp differs both from no edit (the gate opens somewhere) and from the same clamp
    ungated (it closes somewhere)."""
    lm, sae = llava
    f = _partly_active_feature(lm, sae, _request(lm))
    runs = {name: _engine(lm, sae).generate([_request(lm, steering=SteeringSpec(edits) if edits else None)])[0]
            for name, edits in (("plain", []), ("gated", [FeatureEdit(11, 25.0, where=f)]),
                                ("ungated", [FeatureEdit(11, 25.0)]))}
    for other in ("plain", "ungated"):
        gap = max(abs(a - b) for a, b in zip(runs["gated"].logprobs, runs[other].logprobs, strict=True))
        assert gap > 0.1, other


def test_steering_changes_the_output(llava):
    lm, sae = llava
    plain = _engine(lm, sae).generate([_request(lm)])[0]
    for kind in ("clamp", "add"):
        steered = _engine(lm, sae).generate([_request(lm, steering=SteeringSpec(EDITS[kind]))])[0]
        assert steered.token_ids != plain.token_ids, kind


@pytest.mark.parametrize("scope", [None, "all", "generated"])
def test_paper_semantics_match_reference(llava, scope):
    lm, sae = llava
    edits = [FeatureEdit(11, 30.0), FeatureEdit(7, 5.0, "add")]
    req = _request(lm, steering=SteeringSpec(edits, scope=scope, semantics="paper"))
    res = _engine(lm, sae).generate([req])[0]
    inputs = build_inputs(lm, req.messages, req.images)
    ref_tokens, ref_lp = reference_generate(lm, inputs, sae, 2, edits, scope=scope or "prompt",
                                            semantics="paper", max_new_tokens=N_TOKENS)
    assert res.token_ids == ref_tokens
    torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


# -- batching -------------------------------------------------------------------------------

def _mixed_requests(lm):
    return [
        _request(lm, "Tell me a story about Alice and Bob.", SteeringSpec(EDITS["clamp"])),
        _request(lm, "What is in this image?", None, max_tokens=5),
        _request(lm, "Describe the picture.", SteeringSpec(EDITS["add"], scope="generated"), max_tokens=11),
        _request(lm, "The weather is sunny.", SteeringSpec(EDITS["mixed"], semantics="paper")),
        _request(lm, "Bob likes books.", SteeringSpec(EDITS["scale"], scope="prompt"), max_tokens=3),
        _request(lm, "Alice reads.", SteeringSpec(EDITS["swap"]), max_tokens=4),
        _request(lm, "Bob and Alice.", SteeringSpec(EDITS["gated"]), max_tokens=6),
    ]


def test_rows_are_isolated_in_mixed_batches(llava):
    lm, sae = llava
    alone = [_engine(lm, sae, max_batch=1).generate([r])[0] for r in _mixed_requests(lm)]
    engine = _engine(lm, sae, max_batch=8)
    together = engine.generate(_mixed_requests(lm))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for a, t in zip(alone, together, strict=True):
        torch.testing.assert_close(torch.tensor(t.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=1e-5)
    assert engine.stats["prefills"] == 7


def test_join_and_leave_between_steps(llava):
    lm, sae = llava
    reqs = _mixed_requests(lm)
    alone = {i: _engine(lm, sae, max_batch=1).generate([r])[0].token_ids for i, r in enumerate(_mixed_requests(lm))}
    engine = _engine(lm, sae, max_batch=3)  # fewer rows than requests: later ones wait, then join
    results, ids, peak = {}, {}, 0
    for i, r in enumerate(reqs[:2]):
        ids[engine.submit(r)] = i
    step = 0
    while engine.has_work:
        if step == 2:
            for i, r in enumerate(reqs[2:], start=2):
                ids[engine.submit(r)] = i
        done = engine.step().finished
        peak = max(peak, len(engine.active))
        for res in done:
            results[ids[res.request_id]] = res.token_ids
        step += 1
    assert results == alone
    assert peak == 3


def test_seeded_sampling_reproduces_alone_and_batched(llava):
    lm, sae = llava
    def req(seed):
        return _request(lm, steering=SteeringSpec(EDITS["clamp"]), temperature=1.0, top_p=0.9, top_k=50, seed=seed,
                        max_tokens=10)
    a = _engine(lm, sae).generate([req(7)])[0].token_ids
    b = _engine(lm, sae).generate([req(7), req(8), _request(lm)])[0:2]
    assert b[0].token_ids == a
    assert b[1].token_ids != a


# -- limits and errors -------------------------------------------------------------------------

@pytest.mark.parametrize("edits,field,msg", [
    ([FeatureEdit(256, 1.0)], "steering.features[0].id", "feature 256 does not exist"),
    ([FeatureEdit(1, float("nan"))], "steering.features[0].value", "finite"),
    ([FeatureEdit(1, float("inf"))], "steering.features[0].value", "finite"),
    ([FeatureEdit(1, 1.0), FeatureEdit(1, 2.0)], "steering.features[1].id", "more than once"),
    ([FeatureEdit(1, 1.0, "multiply")], "steering.features[0].mode", "mode must be one of"),
    ([FeatureEdit(i, 1.0) for i in range(9)], "steering.features", "9 feature edits exceed the limit of 8"),
    ([FeatureEdit(1, 1.0), FeatureEdit(2, 1e308)], "steering.features[1].value", r"outside \[-10000, 10000\]"),
    ([FeatureEdit(1, -10000.5, "add")], "steering.features[0].value", "largest steering value"),
    ([FeatureEdit(1, 1.0, "transfer")], "steering.features[0].source", "needs a source feature"),
    ([FeatureEdit(1, 1.0, "transfer", 1)], "steering.features[0].source", "another feature"),
    ([FeatureEdit(1, 1.0, "transfer", 256)], "steering.features[0].source", "another feature"),
    ([FeatureEdit(1, 1.0, "clamp", 2)], "steering.features[0].source", "for mode 'transfer' only"),
    ([FeatureEdit(1, 1.0), FeatureEdit(2, 1.0, where=256)], "steering.features[1].where", "where must be a feature id"),
    ([FeatureEdit(1, 1.0, where=-1)], "steering.features[0].where", "where must be a feature id"),
])
def test_bad_steering_is_rejected_with_field(llava, edits, field, msg):
    lm, sae = llava
    engine = _engine(lm, sae)
    with pytest.raises(EngineError, match=msg) as info:
        engine.submit(_request(lm, steering=SteeringSpec(edits)))
    assert info.value.field == field
    assert not engine.has_work
    # the engine keeps serving
    assert len(engine.generate([_request(lm, max_tokens=2)])[0].token_ids) == 2


def test_steering_without_sae_and_bad_scope(llava):
    lm, sae = llava
    with pytest.raises(EngineError, match="no SAE is loaded"):
        _engine(lm, None).submit(_request(lm, steering=SteeringSpec([FeatureEdit(1, 1.0)])))
    with pytest.raises(EngineError, match="scope must be one of") as info:
        _engine(lm, sae).submit(_request(lm, steering=SteeringSpec([FeatureEdit(1, 1.0)], scope="everywhere")))
    assert info.value.field == "steering.scope"


def test_request_that_can_never_fit_is_rejected(llava):
    lm, sae = llava
    engine = _engine(lm, sae)
    assert engine.max_len == 512
    with pytest.raises(EngineError, match="needs .* positions; this engine holds at most 512") as info:
        engine.submit(_request(lm, max_tokens=500))
    assert info.value.field == "max_tokens"


def test_kv_budget_sizes_the_cache(llava):
    lm, _ = llava
    # tiny-llava-next: 4 layers x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 1 KiB per token
    engine = Engine(lm, None, None, EngineConfig(max_batch=4, kv_cache_bytes=4 * 300 * 1024))
    assert engine.max_len == 288  # 300 rounded down to a multiple of 16
    with pytest.raises(EngineError, match="fewer than 16 tokens"):
        Engine(lm, None, None, EngineConfig(max_batch=4, kv_cache_bytes=4 * 8 * 1024))


def test_stop_strings_and_eos(llava):
    lm, sae = llava
    full = _engine(lm, sae).generate([_request(lm, max_tokens=12)])[0]
    stop = full.text[3:6]
    assert stop and stop in full.text
    res = _engine(lm, sae).generate([_request(lm, max_tokens=12, stop=[stop])])[0]
    assert res.finish_reason == "stop" and res.text == full.text[: full.text.find(stop)]
    eos = full.token_ids[2]
    engine = _engine(lm, sae)
    engine.eos_ids = {eos}
    req = _request(lm, max_tokens=12)
    req.sampling.ignore_eos = False
    res = engine.generate([req])[0]
    assert res.finish_reason == "stop" and res.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]


def test_hookpoint_resolution(llava):
    lm, _ = llava
    for name in ("model.layers.2", "layers.2", "model.language_model.layers.2", "2"):
        assert resolve_layer_index(lm.model, name) == 2
    with pytest.raises(HookpointError, match="blocks 0..3"):
        resolve_layer_index(lm.model, "model.layers.4")
    with pytest.raises(HookpointError, match="not a decoder block"):
        resolve_layer_index(lm.model, "model.vision_tower")


def test_sae_width_must_match_model(llava):
    lm, _ = llava
    with pytest.raises(EngineError, match="does not match the model's hidden size 64"):
        Engine(lm, load_sae("builtin:random-topk", d_in=32), HOOK)


# -- clamp effect measurement -----------------------------------------------------------------

def test_measuring_step_reports_exact_activations_and_changes_nothing():
    sae = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64)
    h = torch.randn(4, 64) * 3
    specs = [SteeringSpec([FeatureEdit(11, 25.0), FeatureEdit(7, 5.0, "add")]),
             None,
             SteeringSpec([FeatureEdit(int(sae.encode(h)[2].argmax()), 0.5, "scale")]),
             SteeringSpec([FeatureEdit(40, 30.0)], semantics="paper", scope="all")]
    table = SteeringTable(4, 3, "cpu", torch.float32)
    rows = [SteeringRow.from_spec(s) for s in specs]
    for r, row in enumerate(rows):
        table.write(r, row, True)
    args = (h, sae, table.ids, table.delta_a, table.delta_b, table.paper_c, table.paper_d, table.paper)
    plain_variant = variant_for([(r, True) for r in rows])
    measuring = variant_for([(r, True) for r in rows], measure=True)
    assert measuring.measure and not plain_variant.measure
    effect = torch.full((2, 4, 3), float("nan"))
    out = apply_steering(*args, measuring, effect)
    assert torch.equal(out, apply_steering(*args, plain_variant))  # measuring never changes the output
    before, after = sae.encode(h).gather(-1, table.ids), sae.encode(out).gather(-1, table.ids)
    for r, row in enumerate(rows):
        n = len(row.ids)
        torch.testing.assert_close(effect[0, r, :n], before[r, :n])
        torch.testing.assert_close(effect[1, r, :n], after[r, :n])
    assert after[0, 0] > 5 * max(float(before[0, 0]), 1.0)  # the clamp to 25 moved feature 11 up


def test_engine_reports_clamp_effects_on_generated_tokens(llava):
    lm, sae = llava
    specs = [SteeringSpec([FeatureEdit(11, 25.0), FeatureEdit(7, 4.0, "add")]), None,
             SteeringSpec([FeatureEdit(11, 25.0)], scope="prompt")]

    def run(every):
        engine = _engine(lm, sae, clamp_effect_every=every)
        ids = [engine.submit(_request(lm, f"Story number {i}.", steering=s)) for i, s in enumerate(specs)]
        tokens, effects, steps = {i: [] for i in ids}, [], 0
        while engine.has_work:
            out = engine.step()
            steps += 1
            effects += out.clamp_effects
            for e in out.events:
                tokens[e.request_id].append(e.token_id)
        return [tokens[i] for i in ids], effects, engine.stats["decode_steps"]

    plain_tokens, none, _ = run(0)
    tokens, effects, decode_steps = run(2)
    assert tokens == plain_tokens and not none
    measured = (decode_steps + 1) // 2  # steps 0, 2, 4, ... while all three rows decode together
    assert len(effects) == 3 * measured  # two edits of the first request, one of the third, none of the second
    clamp_all = [e for e in effects if e.feature == 11 and e.target == 25.0]
    add = [e for e in effects if e.mode == "add"]
    prompt_only = [e for e in effects if e.feature == 11 and e not in clamp_all]
    assert len(clamp_all) == len(add) == len(prompt_only) == measured
    assert all(e.target == pytest.approx(e.before + 4.0) for e in add)
    # out of scope on generated tokens: nothing is edited, so after == before == target
    assert all(e.before == e.after == e.target for e in prompt_only)
    assert all(abs(e.after - 25.0) < abs(e.before - 25.0) for e in clamp_all)


def _clamp_effects(engine, reqs):
    """Every clamp effect a measuring engine reports while it serves ``reqs``."""
    for r in reqs:
        engine.submit(r)
    found = []
    while engine.has_work:
        found += engine.step().clamp_effects
    return found


def _assert_same_effects(want, got):
    assert want and len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        assert w.feature == g.feature and g.before == pytest.approx(w.before, abs=1e-3, rel=1e-3)
        assert g.after == pytest.approx(w.after, abs=1e-3, rel=1e-3)


def test_compiled_blocks_decode_what_eager_blocks_decode(llava):
    """--compile: the blocks' decode work and the steering edit through torch.compile give the
    eager step's tokens and log-probabilities, steered and unsteered, batched (rows joining and
    leaving) and alone; all blocks share the compiled graphs (a handful of shapes, never one per
    block)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from lmm_steer.engine.decode_step import block_step, steer_by_count

    lm, sae = llava
    eager = _engine(lm, sae, max_batch=8)
    compiled = _engine(lm, sae, max_batch=8, compile=True)
    for reqs in (_mixed_requests(lm), _mixed_requests(lm)[:1]):
        want, got = eager.generate(reqs), compiled.generate(reqs)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for g, w in zip(got, want, strict=True):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    # batch 1, a larger batch, then both dimensions symbolic: fewer graphs than the model has
    # blocks (4), so blocks share them instead of compiling one each
    assert 1 <= len(_debug_get_cache_entry_list(block_step.__code__)) < len(compiled.step_fn.blocks) == 4
    assert _debug_get_cache_entry_list(steer_by_count.__code__), "the steering edit ran compiled"
    assert compiled.stats["decode_tokens"] == eager.stats["decode_tokens"] > 0
    # measuring steps (a second encode inside the compiled edit) report what eager ones report
    _assert_same_effects(*(_clamp_effects(_engine(lm, sae, max_batch=8, clamp_effect_every=1, compile=c),
                                          _mixed_requests(lm)) for c in (False, True)))


# -- GPU ------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_equals_eager_greedy():
    lm = load_model("builtin:tiny-llava-next", device="cuda", dtype=torch.float32)
    sae = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64, device="cuda")
    reqs = lambda: _mixed_requests(lm)  # noqa: E731
    eager = _engine(lm, sae, max_batch=8, cuda_graphs=False).generate(reqs())
    graph_engine = _engine(lm, sae, max_batch=8, cuda_graphs=True)
    graphs = graph_engine.generate(reqs())
    assert [r.token_ids for r in graphs] == [r.token_ids for r in eager]
    assert graph_engine.stats["graph_replays"] > 0 and graph_engine.stats["eager_steps"] == 0
    # measuring steps (their own captured variants) report what eager steps report
    _assert_same_effects(*(_clamp_effects(_engine(lm, sae, max_batch=8, cuda_graphs=graphs_on,
                                                   clamp_effect_every=1), reqs())
                           for graphs_on in (False, True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_of_compiled_blocks_equal_eager_greedy():
    lm = load_model("builtin:tiny-llava-next", device="cuda", dtype=torch.float32)
    sae = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64, device="cuda")
    eager = _engine(lm, sae, max_batch=8, cuda_graphs=False).generate(_mixed_requests(lm))
    engine = _engine(lm, sae, max_batch=8, cuda_graphs=True, compile=True)
    got = engine.generate(_mixed_requests(lm))
    assert [r.token_ids for r in got] == [r.token_ids for r in eager]
    assert engine.stats["graph_replays"] > 0 and engine.stats["eager_steps"] == 0


def test_topk_membership_by_count_equals_by_threshold(monkeypatch):
    import lmm_steer.engine.steering as steering

    pre = torch.relu(torch.randn(5, 300))
    ids = torch.randint(0, 300, (5, 7))
    chosen = pre.gather(-1, ids)
    by_count = steering.topk_member(pre, chosen, 20)
    monkeypatch.setattr(steering, "_RANK_BY_COUNT_LIMIT", 0)
    by_threshold = steering.topk_member(pre, chosen, 20)
    dense = torch.zeros_like(pre).scatter(-1, pre.topk(20, dim=-1).indices, pre.topk(20, dim=-1).values)
    torch.testing.assert_close(by_count, dense.gather(-1, ids))
    torch.testing.assert_close(by_threshold, by_count)


class _NoBackend:
    """A tokenizer without a Rust backend (the windowed detokeniser's case)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)


@pytest.mark.parametrize("backend", [True, False])
def test_streamed_deltas_add_up_to_the_text(llava, backend):
    lm, sae = llava
    engine = _engine(lm, sae)
    if not backend:
        engine.loaded = type(lm)(lm.name, lm.family, lm.model, _NoBackend(lm.tokenizer), lm.processor)
    rid = engine.submit(_request(lm, max_tokens=20, temperature=1.0, seed=5))
    deltas, final = [], None
    while engine.has_work:
        out = engine.step()
        deltas += [e.text_delta for e in out.events if e.request_id == rid]
        final = out.finished[0] if out.finished else final
    assert "".join(deltas) == final.text == lm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert len(deltas) == 20


def test_abort_frees_the_row_and_others_continue(llava):
    lm, sae = llava
    reqs = _mixed_requests(lm)[:3]
    alone = [_engine(lm, sae, max_batch=1).generate([r])[0].token_ids for r in _mixed_requests(lm)[:3]]
    engine = _engine(lm, sae, max_batch=4)
    ids = [engine.submit(r) for r in reqs]
    engine.step()
    engine.step()
    assert len(engine.active) == 3
    assert engine.abort(ids[0]) and not engine.abort("no-such-request")
    assert len(engine.active) == 2
    results = {}
    while engine.has_work:
        for r in engine.step().finished:
            results[r.request_id] = r.token_ids
    assert ids[0] not in results
    assert [results[ids[1]], results[ids[2]]] == alone[1:]


def test_one_failing_request_does_not_stop_the_others(llava, monkeypatch):
    import lmm_steer.engine.engine as engine_mod

    lm, sae = llava
    real = engine_mod.run_prefill

    def flaky(model, inputs, **kw):
        if inputs["input_ids"].shape[1] == poisoned_len:
            raise RuntimeError("simulated device fault")
        return real(model, inputs, **kw)

    engine = _engine(lm, sae)
    bad = _request(lm, "What is in this image? " * 5)
    poisoned_len = engine.prepare(_request(lm, "What is in this image? " * 5)).prompt_len
    monkeypatch.setattr(engine_mod, "run_prefill", flaky)
    good = [engine.submit(_request(lm)), engine.submit(bad), engine.submit(_request(lm, "Bob likes books."))]
    finished, failed = {}, []
    while engine.has_work:
        out = engine.step()
        failed += out.failed
        finished.update({r.request_id: r for r in out.finished})
    assert [f.request_id for f in failed] == [good[1]] and "simulated device fault" in failed[0].message
    assert set(finished) == {good[0], good[2]}
    assert engine.step().failed == [] and len(engine.generate([_request(lm, max_tokens=2)])[0].token_ids) == 2


# -- isolation of bad rows, bounds ------------------------------------------------------------------

def _run(engine, reqs):
    ids = [engine.submit(r) for r in reqs]
    finished, failed = {}, []
    while engine.has_work:
        out = engine.step()
        failed += out.failed
        finished.update({r.request_id: r for r in out.finished})
    return ids, finished, failed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_gone_non_finite_fails_alone(llava, temperature):
    """A value that becomes infinity in the steering table (forced past validation here by lifting
    the engine's bound) fails its own request; its batch neighbours decode what they decode alone."""
    from lmm_steer.engine.engine import NON_FINITE_CODE

    lm, sae = llava
    engine = _engine(lm, sae)
    engine.max_steer_value = float("inf")
    poison = SteeringSpec([FeatureEdit(1, 1e308)], scope="generated")
    others = [_request(lm, seed=7, temperature=temperature),
              _request(lm, "Bob likes books.", SteeringSpec([FeatureEdit(5, 4.0)]), seed=8, temperature=temperature)]
    alone = [engine.generate([r])[0] for r in _fresh(others)]
    reqs = _fresh(others)
    ids, finished, failed = _run(engine, [reqs[0], _request(lm, steering=poison, temperature=temperature), reqs[1]])
    assert [f.request_id for f in failed] == [ids[1]] and failed[0].code == NON_FINITE_CODE
    assert "non-finite" in failed[0].message and "steering values" in failed[0].message
    assert [finished[ids[0]].token_ids, finished[ids[2]].token_ids] == [a.token_ids for a in alone]
    # prompt scope: the prefill's own logits are checked before the first token is drawn
    ids, finished, failed = _run(engine, [_request(lm, steering=SteeringSpec([FeatureEdit(1, 1e308)], scope="all"))])
    assert [f.code for f in failed] == [NON_FINITE_CODE] and not finished
    assert len(engine.generate([_request(lm, max_tokens=2)])[0].token_ids) == 2


def _fresh(reqs):
    import copy

    return [copy.deepcopy(r) for r in reqs]


def test_steer_value_bound_is_configurable_and_capped_by_the_table_dtype(llava):
    lm, sae = llava
    engine = _engine(lm, sae, max_steer_value=50)
    with pytest.raises(EngineError, match=r"outside \[-50, 50\]"):
        engine.submit(_request(lm, steering=SteeringSpec([FeatureEdit(1, 50.5)])))
    assert len(engine.generate([_request(lm, steering=SteeringSpec([FeatureEdit(1, 50.0)]), max_tokens=2)])) == 1
    half = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64, hookpoint=HOOK, dtype=torch.float16)
    assert _engine(lm, half, max_steer_value=1e30).max_steer_value == torch.finfo(torch.float16).max


def test_prompt_too_long_is_refused_by_its_length_before_tokenising(llava, monkeypatch):
    import lmm_steer.engine.engine as engine_mod

    lm, _ = llava
    engine = _engine(lm)
    calls = []
    monkeypatch.setattr(engine_mod, "build_inputs", lambda *a, **k: calls.append(1))
    with pytest.raises(EngineError, match="characters cannot fit") as info:
        engine.submit(_request(lm, "x" * (engine.max_prompt_chars + 1)))
    assert info.value.field == "messages" and calls == []
    # the bound is loose enough never to refuse what fits: one character per token fits it many times
    longest = max(len(t) for t in lm.tokenizer.get_vocab())
    assert engine.max_prompt_chars == 2 * engine.max_len * longest


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45])
def test_top_p_below_float32_keeps_the_top_token(llava, top_p):
    lm, _ = llava
    engine = _engine(lm)
    greedy = engine.generate([_request(lm)])[0].token_ids
    assert engine.generate([_request(lm, temperature=1.0, top_p=top_p, seed=3)])[0].token_ids == greedy


def test_temperature_near_zero_is_greedy(llava):
    lm, _ = llava
    engine = _engine(lm)
    greedy = engine.generate([_request(lm)])[0].token_ids
    assert engine.generate([_request(lm, temperature=1e-300, seed=3)])[0].token_ids == greedy


def test_an_unsteered_prefill_is_reused_exactly(llava):
    """Requests whose steering leaves the prompt alone share one prefill of the same text prompt;
    their tokens and log-probabilities equal those of an engine that prefills every time."""
    lm = load_model("builtin:tiny-llama")
    sae = load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64, hookpoint=HOOK)
    specs = [None, SteeringSpec([FeatureEdit(3, 9.0)], scope="generated"), SteeringSpec([FeatureEdit(5, 4.0)]),
             SteeringSpec([FeatureEdit(7, 6.0, "add")], scope="generated")]

    def run(budget):
        engine = _engine(lm, sae, prefill_cache_tokens=budget)
        out = engine.generate([_request(lm, steering=s, temperature=0.8, seed=i) for i, s in enumerate(specs)])
        return engine, [(r.token_ids, r.logprobs) for r in out]

    cached, with_reuse = run(2048)
    fresh, without = run(0)
    assert with_reuse == without
    # the unsteered and the two generated-scope requests share one prefill; scope "all" has its own
    assert (cached.stats["prefills"], cached.stats["prefill_reuses"]) == (2, 2)
    assert (fresh.stats["prefills"], fresh.stats["prefill_reuses"]) == (4, 0)


def test_a_gated_edit_needs_delta_semantics(llava):
    lm, sae = llava
    spec = SteeringSpec([FeatureEdit(11, 6.0, where=3)], semantics="paper")
    with pytest.raises(EngineError, match="delta semantics") as info:
        _engine(lm, sae).submit(_request(lm, steering=spec))
    assert info.value.field == "steering.features[0].where"


def test_a_transfer_needs_delta_semantics(llava):
    lm, sae = llava
    spec = SteeringSpec([FeatureEdit(3, 0.0), FeatureEdit(11, 6.0, "transfer", 3)], semantics="paper")
    with pytest.raises(EngineError, match="delta semantics") as info:
        _engine(lm, sae).submit(_request(lm, steering=spec))
    assert info.value.field == "steering.features[1].mode"
