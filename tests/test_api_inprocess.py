"""The HTTP app in-process (for failure injection a real process cannot offer)."""

import asyncio
import io

import pytest
from fastapi.testclient import TestClient

from lmm_steer.api.app import ServerSettings, create_app
from lmm_steer.api.errors import APIError
from lmm_steer.api.images import ImageLimits, fetch_image
from lmm_steer.engine import Engine, EngineConfig
from lmm_steer.metrics import Metrics
from lmm_steer.models.loader import load_model
from lmm_steer.service import SteeringService


@pytest.fixture(scope="module")
def plain_app():
    """A server with no SAE."""
    lm = load_model("builtin:tiny-llama")
    # no prefill cache: a repeated prompt must reach run_prefill (the failure test patches it)
    service = SteeringService(Engine(lm, None, None, EngineConfig(max_batch=2, max_seq_len=256, prefill_cache_tokens=0)))
    service.metrics = Metrics(service.model_name, service)
    service.start()
    with TestClient(create_app(service, ServerSettings(), service.metrics)) as client:
        yield client, service
    service.stop()


def test_one_failing_request_gives_500_and_the_server_keeps_serving(plain_app, monkeypatch):
    import lmm_steer.engine.engine as engine_mod

    client, service = plain_app
    real = engine_mod.run_prefill
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    before = client.post("/v1/chat/completions", json=body)
    assert before.status_code == 200

    def broken(*a, **k):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(engine_mod, "run_prefill", broken)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "simulated CUDA error" in r.json()["error"]["message"]
    monkeypatch.setattr(engine_mod, "run_prefill", real)
    ok = client.post("/v1/chat/completions", json=body)
    # served as before the failure: the same greedy answer (a random tiny model may end before max_tokens)
    assert ok.status_code == 200 and 1 <= ok.json()["usage"]["completion_tokens"] <= 3
    assert ok.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]
    assert ok.json()["usage"] == before.json()["usage"]


def test_steering_without_sae_is_refused(plain_app):
    client, _ = plain_app
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "clamps": {"1": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "clamps"
    assert client.get("/v1/features/1").status_code == 404
    r = client.post("/v1/inspect", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no SAE" in r.json()["error"]["message"]


def test_image_urls_disabled_by_default():
    with pytest.raises(APIError, match="image URLs are disabled") as info:
        asyncio.run(fetch_image("http://example.com/cat.png", "messages[0].content[0].image_url.url", ImageLimits()))
    assert info.value.status == 400 and info.value.param == "messages[0].content[0].image_url.url"


@pytest.mark.parametrize("address,public", [("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False),
                                            ("::1", False), ("::ffff:192.168.0.1", False), ("fe80::1", False),
                                            ("8.8.8.8", True), ("2606:4700::1111", True)])
def test_private_addresses_are_refused(address, public):
    from lmm_steer.api.images import _public

    assert _public(address) is public


def test_metrics_after_steered_and_unsteered_requests():
    from sae_weights import load_sae

    lm = load_model("builtin:tiny-llava-next")
    sae = load_sae("builtin:random-topk", d_in=64)
    service = SteeringService(Engine(lm, sae, "model.layers.2", EngineConfig(max_batch=2, max_seq_len=256,
                                                                         clamp_effect_every=1)))
    service.metrics = Metrics(service.model_name, service, top_features=2)
    service.start()
    try:
        with TestClient(create_app(service, ServerSettings(), service.metrics)) as client:
            msgs = [{"role": "user", "content": "hi"}]
            for clamps in (None, {"3": 5.0}, {"3": 2.0, "9": 1.0}, {"3": 1.0, "9": 2.0, "40": 3.0}, {"77": 1.0}):
                r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "ignore_eos": True,
                                                              **({"clamps": clamps} if clamps else {})})
                assert r.status_code == 200
            text = client.get("/metrics").text
    finally:
        service.stop()

    def value(name, **labels):
        want = ",".join(f'{k}="{v}"' for k, v in {"model_name": service.model_name, **labels}.items())
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name}{{") and all(
            f'{k}="{v}"' in ln for k, v in {"model_name": service.model_name, **labels}.items()))
        assert want.split(",")[0] in line
        return float(line.rsplit(" ", 1)[1])

    assert value("lmm_steer:steered_requests_total") == 4 and value("lmm_steer:unsteered_requests_total") == 1
    assert value("lmm_steer:clamps_per_request_count") == 5 and value("lmm_steer:clamps_per_request_sum") == 7
    # top 2 features by use: 3 (three requests) and 9 (two); 40 and 77 once each -> other = 2
    assert value("lmm_steer:feature_clamps_total", feature="3") == 3
    assert value("lmm_steer:feature_clamps_total", feature="9") == 2
    assert value("lmm_steer:feature_clamps_total", feature="other") == 2
    assert value("lmm_steer:generation_tokens_total") == 20
    assert value("lmm_steer:inter_token_latency_seconds_count") == 15  # 3 gaps per 4-token request
    assert value("lmm_steer:request_queue_time_seconds_count") == 5
    assert value("lmm_steer:decode_steps", kind="eager") > 0 and value("lmm_steer:decode_steps", kind="cuda_graph") == 0
    assert 0 <= value("lmm_steer:kv_cache_usage_perc") <= 1
    assert value("lmm_steer:request_success_total", finished_reason="length") == 5
    # clamp effect, measured at every decode step (3 per 4-token request, one request at a time):
    # feature 3 in three requests -> 9 observations aiming at 3 * (5 + 2 + 1); 9 -> 6; 40, 77 -> other
    effect = "lmm_steer:clamp_effect_activation"
    assert value(f"{effect}_count", feature="3", when="target") == 9
    assert value(f"{effect}_sum", feature="3", when="target") == pytest.approx(24)
    assert value(f"{effect}_sum", feature="9", when="target") == pytest.approx(9)
    assert value(f"{effect}_count", feature="other", when="after") == 6
    assert value(f"{effect}_count", feature="3", when="before") == value(f"{effect}_count", feature="3", when="after") == 9
    assert value("lmm_steer:clamp_effect_abs_error_count") == 21


def test_a_feature_pages_image_links_serve_the_images_they_name(tmp_path):
    """Top images without a patch grid are not shown; the links the page gives and the PNG route
    number the shown ones alike, so a grid-less image ahead of a shown one shifts neither."""
    from PIL import Image

    from sae_weights import FeatureCatalog, FeatureEntry, load_sae

    for name, size in (("wide.png", (48, 32)), ("tall.png", (24, 40))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    grid = [[1.0, 0.0], [0.0, 1.0]]
    top = [{"image": str(tmp_path / "wide.png"), "activation": 3.0},  # no grid: not shown
           {"image": str(tmp_path / "tall.png"), "activation": 2.0, "grid": grid}]
    catalog = FeatureCatalog([FeatureEntry(4, "red", extras={"top_images": top})])
    lm = load_model("builtin:tiny-llama")
    service = SteeringService(Engine(lm, load_sae("builtin:random-topk", d_in=64), "model.layers.2",
                                     EngineConfig(max_batch=2, max_seq_len=128)), catalog=catalog)
    service.start()
    try:
        with TestClient(create_app(service, ServerSettings())) as client:
            shown = client.get("/v1/features/4").json()["top_images"]
            # 2.0 is neither the grid's mean (0.5) nor its peak (1.0): its example's strongest token
            assert shown == [{"url": "/v1/features/4/images/0.png", "activation": 2.0, "peak_patch": 1.0,
                              "mean_patch": 0.5, "patches": 4, "ranked_by": "strongest_token"}]
            png = client.get(shown[0]["url"])
            assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (24, 40)
            assert client.get("/v1/features/4/images/1.png").status_code == 404
    finally:
        service.stop()


def test_a_feature_page_says_where_its_numbers_come_from_and_proposes_a_value(tmp_path):
    """GET /v1/features/{id} on a multimodal model: a calibrated feature proposes its calibrated value;
    an image feature (its top images' peak patch near its maximum) a value for the image's tokens,
    drawn from the residual stream's norm there; a text feature three times its maximum. Top images
    say what their activation is; contexts mark the chat template's text; model cards say the model
    takes images."""
    from PIL import Image

    from lmm_steer.api.routes.features import NORM_SHARE, template_chars
    from sae_weights import FeatureCatalog, FeatureEntry, load_sae

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    grid = [[0.0, 3.0], [1.0, 0.0]]
    catalog = FeatureCatalog([
        FeatureEntry(1, "red", extras={"max_activation": 3.0, "steer": {"value": 7.5, "scope": "image"}}),
        FeatureEntry(2, "red things", extras={"max_activation": 3.0, "top_images": [
            {"image": str(tmp_path / "red.png"), "activation": 1.0, "grid": grid}]}),  # ranked by the mean
        FeatureEntry(3, "", extras={"max_activation": 5.0, "top_contexts": [{"text": "a «red» ball", "activation": 5.0}]}),
        FeatureEntry(4, "", extras={"max_activation": 5.0, "steer": {"value": 9.0, "scope": "somewhere else"}}),
    ])
    lm = load_model("builtin:tiny-llava-next")
    service = SteeringService(Engine(lm, load_sae("builtin:random-topk", d_in=64), "model.layers.1",
                                     EngineConfig(max_batch=2, max_seq_len=512)), catalog=catalog)
    service.start()
    try:
        with TestClient(create_app(service, ServerSettings())) as client:
            assert client.get("/v1/models").json()["data"][0]["multimodal"] is True
            calibrated = client.get("/v1/features/1").json()["proposal"]
            assert (calibrated["value"], calibrated["scope"], calibrated["calibrated"]) == (7.5, "image", True)
            image = client.get("/v1/features/2").json()
            assert image["max_activation_over"] == "top_image_patches"  # 3.0 is the grid's peak
            assert image["top_images"][0]["ranked_by"] == "mean_patch"
            p = image["proposal"]
            assert (p["scope"], p["calibrated"], p["population"]) == ("image", False, "image")
            norm = float(p["basis"].split("norm there (")[1].split(",")[0])
            assert p["value"] == pytest.approx(max(9.0, NORM_SHARE * norm / image["decoder_norm"]), abs=0.5)
            assert client.get("/v1/features/4").json()["proposal"]["scope"] is None  # not a scope a request takes
            text = client.get("/v1/features/3").json()
            assert text["max_activation_over"] == "any_token" and text["top_images"] == []
            assert (text["proposal"]["value"], text["proposal"]["scope"], text["proposal"]["population"]) == (15.0, None, "text")
            assert text["contexts"] == [{"text": "a «red» ball", "activation": 5.0, "template_chars": 0}]
    finally:
        service.stop()
    prefix = "system You are a helpful AI assistant named SmolLM, trained by Hugging Face user "
    assert template_chars(", trained by Hugging Face user t«resp»ass on the", prefix) == 31
    assert template_chars("system You are a helpful« AI» assistant named Sm", prefix) == 48  # all of it
    assert template_chars("user genus Thiobacillus: a genus of« bacteria» thi", prefix) == 5  # the role name
    assert template_chars("the ace used «x»", prefix) == 0


def test_the_queue_bound_counts_admitted_requests_not_their_timing():
    # --max-batch 1 --max-queue 2: three requests are admitted, the fourth is refused, whether or not
    # the first has reached its batch row yet. The engine thread is not started here, so none has:
    # the bound used to count only requests still waiting in a queue, so a burst that arrived before
    # the first one ran (typical of streams) was cut at two.
    from lmm_steer.engine import GenerationRequest, SamplingParams
    from lmm_steer.service import QueueFull

    lm = load_model("builtin:tiny-llama")
    service = SteeringService(Engine(lm, None, None, EngineConfig(max_batch=1, max_seq_len=64)), max_queue=2)
    assert service.capacity == 3

    def request():
        return GenerationRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 sampling=SamplingParams(max_tokens=2))

    async def burst():
        # five callers, then the unsteered twin of an admitted request (admitted past the bound)
        streams = [service.generate(request()) for _ in range(5)] + [service.generate(request(), bounded=False)]
        starts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0.5)  # prepared and queued: nothing runs without the engine thread
        outcomes = ["refused" if t.done() and isinstance(t.exception(), QueueFull) else "admitted" for t in starts]
        waiting = service.waiting
        for t in starts:
            t.cancel()
        await asyncio.gather(*starts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        return outcomes, waiting

    outcomes, waiting = asyncio.run(burst())
    assert outcomes == ["admitted"] * 3 + ["refused"] * 2 + ["admitted"] and waiting == 4
    assert service.in_flight == 0 and service.waiting == 0  # every admitted one was released


def test_suggest_without_a_catalog_is_a_501_naming_it(plain_app):
    # the body is valid; what is missing is the server's: the answer says so, not a 400 to every request
    client, _ = plain_app
    r = client.post("/v1/steering/suggest", json={"text": "the sea"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "concepts_unavailable"
    assert "feature catalog" in r.json()["error"]["message"] and r.json()["error"]["param"] is None
    # and the published schema lists the 501 for this route
    responses = client.get("/openapi.json").json()["paths"]["/v1/steering/suggest"]["post"]["responses"]
    assert "501" in responses and "catalog" in responses["501"]["description"]


def test_a_body_the_published_schema_allows_is_accepted_and_one_it_refuses_is_refused(plain_app):
    # each case is judged by the published schema and by the server, which must agree: the schema
    # allows it exactly when the server answers 200 (the refusals name the field)
    import jsonschema_rs  # schemathesis's validator (the test extra has it)

    client, _ = plain_app
    doc = client.get("/openapi.json").json()
    validator = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletionRequest",
                                                    "components": doc["components"]})
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ({"n": 1.0}, None), ({"n": 1}, None), ({"n": 2}, "n"), ({"n": 1.5}, "n"),
        ({"max_tokens": 1.0}, None), ({"seed": 7.0}, None), ({"top_k": 2.5}, "top_k"), ({"seed": "7"}, "seed"),
        ({"top_logprobs": 0}, None), ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.0}, None), ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tools": None}, None), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "none"}, None), ({"tool_choice": "auto"}, "tool_choice"),
        ({"function_call": "none"}, None), ({"function_call": "auto"}, "function_call"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "text"}}, None), ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {}}, None), ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"modalities": ["text"]}, None), ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"), ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"stop": ["a", "b", "c", "d"]}, None), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
        ({"messages": [{"role": "assistant", "content": "yes", "function_call": None}, *hi]}, None),
        ({"messages": [{"role": "assistant", "content": "yes", "function_call": {"name": "f", "arguments": "{}"}},
                       *hi]}, "messages[0].function_call"),
        ({"messages": [{"role": "assistant", "content": "yes", "tool_calls": None}, *hi]}, None),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                       *hi]}, "messages[0].tool_calls"),
    ]
    for extra, param in cases:
        body = {"messages": hi, "max_tokens": 1, **extra}
        allowed = validator.is_valid(body)
        r = client.post("/v1/chat/completions", json=body)
        assert allowed == (param is None), (extra, "schema allows" if allowed else "schema refuses")
        if param is None:
            assert r.status_code == 200, (extra, r.text)
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    tool_call = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}, *hi]
    for path, body in (("/v1/chat/completions", {"messages": tool_call, "max_tokens": 1}),
                       ("/v1/inspect", {"messages": tool_call})):
        error = client.post(path, json=body).json()["error"]
        assert (error["param"], error["code"]) == ("messages[0].tool_calls", "unsupported_parameter"), path
