"""The HTTP service, against real ``lmm-steer serve`` processes on loopback."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image
from servers import Server, wait_for

HOOK_FEATURES = {3: "red apples and fruit", 7: "dogs and their faces", 11: "written text on signs"}


def png_data_url(w=96, h=32, seed=1) -> str:
    g = torch.Generator().manual_seed(seed)
    img = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text="What is in this image?", url=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or png_data_url()}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cat = tmp_path_factory.mktemp("cat") / "catalog.jsonl"
    cat.write_text("".join(json.dumps({"feature": f, "explanation": e, "density": 0.01}) + "\n"
                           for f, e in HOOK_FEATURES.items()))
    s = Server("--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk", "--max-batch", "4",
               "--max-seq-len", "512", "--catalog", str(cat), "--max-body-bytes", "300000",
               "--max-image-bytes", "60000", "--max-image-pixels", "1000000", "--max-images", "2",
               "--allow-image-urls")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("first-key\nsecond-key\n")
    s = Server("--model", "builtin:tiny-llama", "--sae", "builtin:random-topk", "--max-batch", "1",
               "--max-queue", "1", "--max-seq-len", "4096", "--api-key-file", str(keys), key="second-key")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, clamps=None, **kw):
    extra = {"clamps": clamps} if clamps else {}
    extra.update(kw.pop("extra_body", {}))
    return client.chat.completions.create(
        model="builtin:tiny-llava-next", messages=kw.pop("messages", [{"role": "user", "content": "Tell me a story"}]),
        max_tokens=kw.pop("max_tokens", 12), temperature=0, extra_body=extra, **kw)


# -- the openai client ----------------------------------------------------------------------------

def test_openai_client_with_clamps(client):
    plain = _chat(client)
    steered = _chat(client, clamps={"11": 40.0})
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12
    assert steered.choices[0].message.content != plain.choices[0].message.content
    applied = steered.model_extra["steering"]
    assert applied["features"] == [{"id": 11, "value": 40.0, "mode": "clamp", "explanation": HOOK_FEATURES[11],
                                    "concept": None}]
    assert applied["concepts"] == []
    assert applied["scope"] == "all" and applied["semantics"] == "delta" and applied["hookpoint"]
    assert plain.model_extra["steering"] is None


@pytest.mark.parametrize(("features", "sdk", "edited", "field"), [
    # a transfer (the source's activation written along another feature): the SDK's swap
    ([{"id": 7, "value": 0.0}, {"id": 11, "value": 4.0, "mode": "transfer", "source": 7}],
     lambda s: s.swap(7, 11, 4.0), {"id": 11, "value": 4.0, "mode": "transfer", "source": 7}, "source"),
    # a gated clamp ("where"): the SDK's clamp(..., where=)
    ([{"id": 11, "value": 40.0, "where": 7}, {"id": 3, "value": 5.0}],
     lambda s: s.clamp(11, 40.0, where=7).clamp(3, 5.0), {"id": 11, "value": 40.0, "mode": "clamp", "where": 7},
     "where"),
])
def test_an_edits_extra_field_is_echoed_on_it_alone_and_equals_the_sdks(client, server, features, sdk, edited, field):
    """A transfer's source and a gate travel through the stock client's extra_body, are echoed on
    their edit alone, and the SDK's builder sends the same steering."""
    from lmm_steer_client import Client, Steering

    steered = _chat(client, extra_body={"steering": {"features": features}})
    applied = steered.model_extra["steering"]["features"]
    echoed = next(f for f in applied if f["id"] == 11)
    assert echoed == {**edited, "explanation": HOOK_FEATURES[11], "concept": None}
    assert all(field not in f for f in applied if f["id"] != 11)
    with Client(server.url) as sdk_client:
        again = sdk_client.chat(prompt="Tell me a story", max_tokens=12, temperature=0, steering=sdk(Steering()))
    assert again.text == steered.choices[0].message.content


def test_a_conditioned_edit_acts_only_on_prompts_where_its_condition_fires(client, server):
    """``when``: with a feature that fires somewhere in the prompt (inspect lists every active one),
    the answer is the unconditioned edit's and the echo says it acted; with one silent there, the
    plain model's, and the echo says it did not; the SDK sends the same."""
    from lmm_steer_client import Client, Steering

    prompt = "Tell me a story"
    out = server.post("/v1/inspect", {"messages": [{"role": "user", "content": prompt}], "top_k": 50}).json()
    active = {f["id"] for p in out["positions"] for f in p["features"]}
    fires, silent = min(active - {11}), min(set(range(64)) - active - {11})
    texts = {}
    for name, extra in (("plain", {}), ("ungated", {}), ("fires", {"when": fires}), ("silent", {"when": silent})):
        body = {} if name == "plain" else {"steering": {"features": [{"id": 11, "value": 40.0, **extra}]}}
        reply = _chat(client, extra_body=body)
        texts[name] = reply.choices[0].message.content
        if extra:
            echoed = reply.model_extra["steering"]["features"][0]
            assert echoed["when"] == extra["when"] and echoed["acted"] is (name == "fires")
    assert texts["fires"] == texts["ungated"] != texts["plain"] == texts["silent"]
    with Client(server.url) as sdk_client:
        again = sdk_client.chat(prompt=prompt, max_tokens=12, temperature=0,
                                steering=Steering().clamp(11, 40.0, when=fires))
        # one feature, two slots with their own conditions (one read on the text): only the one that fires acts
        twice = Steering().clamp(11, 40.0, when=fires, when_on="text").clamp(11, -40.0, when=silent)
        both = sdk_client.chat(prompt=prompt, max_tokens=12, temperature=0, steering=twice)
    assert again.text == texts["fires"] == both.text
    echoed = both.raw["steering"]["features"]
    assert [(f["id"], f["when"], f.get("when_on"), f["acted"]) for f in echoed] == [(11, fires, "text", True),
                                                                                   (11, silent, None, False)]


def test_openai_streaming_equals_non_streaming(client):
    body = {"steering": {"features": [{"id": 7, "value": 5.0, "mode": "add"}], "scope": "generated"}}
    whole = _chat(client, extra_body=body).choices[0].message.content
    stream = _chat(client, extra_body=body, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_image_data_url(client):
    with_image = _chat(client, messages=image_message())
    without = _chat(client, messages=[{"role": "user", "content": "What is in this image?"}])
    assert with_image.usage.prompt_tokens > without.usage.prompt_tokens + 10


def test_concurrent_requests_equal_alone(client):
    specs = [None, {"11": 30.0}, {"3": -10.0, "7": 25.0}, {"7": 0.0}, {"11": 15.0}, None]
    alone = [_chat(client, clamps=c, max_tokens=16).choices[0].message.content for c in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(lambda c: _chat(client, clamps=c, max_tokens=16).choices[0].message.content, specs))
    assert together == alone
    assert len(set(alone)) > 2


def test_return_unsteered_side_by_side(server):
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10, "temperature": 0.9,
            "seed": 123, "clamps": {"11": 40}, "return_unsteered": True}
    r = server.post("/v1/chat/completions", body).json()
    plain = server.post("/v1/chat/completions", {**body, "clamps": None, "return_unsteered": False}).json()
    assert r["unsteered"]["content"] == plain["choices"][0]["message"]["content"]
    assert r["unsteered"]["usage"]["completion_tokens"] == 10
    assert r["choices"][0]["message"]["content"] != r["unsteered"]["content"]
    # and the same pairing when streamed: the unsteered text arrives with the final chunk
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["unsteered"]["content"] == r["unsteered"]["content"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == r["choices"][0]["message"]["content"]


def test_logprobs(server):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                             "temperature": 0, "logprobs": True}).json()
    lps = r["choices"][0]["logprobs"]["content"]
    assert len(lps) == 5 and all(e["logprob"] <= 0 for e in lps)


# -- catalog, inspect, models ----------------------------------------------------------------------

def test_models_and_features(server):
    models = server.get("/v1/models").json()
    assert models["data"][0]["id"] == "builtin:tiny-llava-next" and models["data"][0]["sae"]["num_latents"] == 512
    f = server.get("/v1/features/7").json()
    assert f["explanation"] == HOOK_FEATURES[7] and abs(f["decoder_norm"] - 1.0) < 1e-4
    assert f["stats"] == {"density": 0.01}
    assert server.get("/v1/features/100").json()["explanation"] is None
    missing = server.get("/v1/features/512")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"
    hits = server.get("/v1/features", params={"q": "dog faces", "limit": 5}).json()["data"]
    # by meaning, every feature gets a score; the one about dogs ranks first
    assert hits[0]["id"] == 7 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert server.get("/v1/features", params={"q": "puppy"}).json()["data"][0]["id"] == 7  # no shared word
    assert server.get("/v1/features", params={"q": ""}).status_code == 400


def test_inspect_anyres_grids(server):
    r = server.post("/v1/inspect", {"messages": image_message(url=png_data_url(96, 32)), "top_k": 3,
                                    "features": [3, 7]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["image_tokens"] > 16 and out["text_tokens"] > 0
    img = out["images"][0]
    # tiny-llava-next's base view: 32 px / 8 px patches = 4 x 4
    assert (img["rows"], img["cols"]) == (4, 4)
    for f in ("3", "7"):
        grid = img["features"][f]
        assert len(grid) == 4 and all(len(row) == 4 for row in grid)
    assert len(out["positions"]) == out["num_tokens"]
    assert all(len(p["features"]) <= 3 for p in out["positions"])
    pooled = out["pooled"]["image"]
    assert pooled and pooled == sorted(pooled, key=lambda x: -x["activation"])
    explained = [p for p in out["positions"] for f in p["features"] if f["id"] in HOOK_FEATURES]
    assert all(f["explanation"] == HOOK_FEATURES[f["id"]] for p in explained for f in p["features"]
               if f["id"] in HOOK_FEATURES)
    # default grids: the top pooled image features
    default = server.post("/v1/inspect", {"messages": image_message(), "positions": False}).json()
    assert default["positions"] is None
    assert list(default["images"][0]["features"]) == [str(p["id"]) for p in default["pooled"]["image"][:5]]


def test_inspect_pools_the_messages_own_tokens(server):
    """By default pooled leaves out special tokens, the first (attention-sink) position and the chat
    template's other text; each position carries its decoded text. With top_k 50 (more than the SAE's
    k of 8) the positions list every active feature, so the pool can be recomputed from them."""
    prompt = "Tell me about the sea and its waves."

    def run(**kw):
        r = server.post("/v1/inspect", {"messages": [{"role": "user", "content": prompt}], "top_k": 50, **kw})
        assert r.status_code == 200, r.text
        return r.json()

    def pool(out):
        chosen = [p for p in out["positions"] if p["kind"] == "text" and p["pooled"]]
        sums = {}
        for p in chosen:
            for f in p["features"]:
                sums[f["id"]] = sums.get(f["id"], 0.0) + f["activation"]
        return len(chosen), sorted((a / len(chosen) for a in sums.values()), reverse=True)

    out = run()
    pos = out["positions"]
    assert any("Ġ" in p["token"] for p in pos) and not any("Ġ" in p["text"] for p in pos)
    assert "".join(p["text"] for p in pos if not p["template"]) == prompt  # the rest is the template's
    special = [p for p in pos if p["special"]]
    assert special and pos[0]["special"] and not any(p["pooled"] for p in special)
    assert [p["pooled"] for p in pos] == [not p["template"] for p in pos]
    n, means = pool(out)
    assert out["pooled_tokens"] == {"image": 0, "text": n} and n < out["text_tokens"]
    assert [f["activation"] for f in out["pooled"]["text"]] == pytest.approx(means[:50], rel=1e-4)
    everything = run(include_special_tokens=True, include_template_tokens=True)
    assert everything["pooled_tokens"]["text"] == everything["text_tokens"] == len(everything["positions"])
    n, means = pool(everything)
    assert [f["activation"] for f in everything["pooled"]["text"]] == pytest.approx(means[:50], rel=1e-4)
    assert everything["pooled"]["text"] != out["pooled"]["text"]
    assert out["residual_norm"]["text"] > 0 and out["residual_norm"]["image"] is None


def test_health_ready_openapi(server):
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/ready").json()["status"] == "ready"
    paths = server.get("/openapi.json").json()["paths"]
    for p in ("/v1/chat/completions", "/v1/models", "/v1/features/{feature_id}", "/v1/features", "/v1/inspect",
              "/health", "/ready", "/metrics"):
        assert p in paths, p
    schemas = server.get("/openapi.json").json()["components"]["schemas"]
    assert {"ChatCompletion", "Inspection", "FeatureInfo", "ChatCompletionRequest", "Steering"} <= set(schemas)


# -- errors --------------------------------------------------------------------------------------------

def _bomb_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(buf, format="PNG")  # 4 MP, a few KB compressed
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _big_png() -> str:
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(200, 200, 3, generator=g) * 255).to(torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # about 120 KB of noise: over the 60 KB image limit, under the body limit
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _msgs(text="hi"):
    return [{"role": "user", "content": text}]


ERROR_CASES = [
    ("unknown feature", {"messages": _msgs(), "clamps": {"512": 1}}, 400, "clamps.512", "feature 512 does not exist"),
    ("unknown feature in steering", {"messages": _msgs(), "steering": {"features": [{"id": 600, "value": 1}]}},
     400, "steering.features[0].id", "does not exist"),
    ("non-numeric value", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": "ten"}]}},
     400, "steering.features[0].value", "number"),
    ("non-numeric clamp", {"messages": _msgs(), "clamps": {"1": "high"}}, 400, "clamps.1", "number"),
    ("bad clamp key", {"messages": _msgs(), "clamps": {"one": 1}}, 400, "clamps", "feature ids"),
    ("too many clamps", {"messages": _msgs(), "clamps": {str(i): 1 for i in range(33)}}, 400, "steering.features",
     "33 feature edits exceed the limit of 32"),
    ("unknown mode", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "mode": "mul"}]}},
     400, "steering.features[0].mode", "clamp"),
    ("transfer without a source", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "mode": "transfer"}]}},
     400, "steering.features[0].source", "needs a source feature"),
    ("source of a clamp", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "source": 2}]}},
     400, "steering.features[0].source", "for mode 'transfer' only"),
    ("gate out of range", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "where": 9999}]}},
     400, "steering.features[0].where", "where must be a feature id"),
    ("gate not an id", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "where": "red"}]}},
     400, "steering.features[0].where", "integer"),
    ("condition out of range", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "when": 9999}]}},
     400, "steering.features[0].when", "when must be a feature id"),
    ("when_on without a condition", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1,
                                                                                     "when_on": "text"}]}},
     400, "steering.features[0].when_on", "has none"),
    ("when_on unknown", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "when": 2,
                                                                         "when_on": "image"}]}},
     400, "steering.features[0].when_on", "prompt"),
    ("feature repeated", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "when": 2},
                                                                          {"id": 1, "value": 2, "when": 2}]}},
     400, "steering.features[1].id", "more than once"),
    ("condition under paper", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "when": 2}],
                                                                 "semantics": "paper"}},
     400, "steering.features[0].when", "delta semantics"),
    ("gate under paper", {"messages": _msgs(), "steering": {"features": [{"id": 1, "value": 1, "where": 2}],
                                                            "semantics": "paper"}},
     400, "steering.features[0].where", "delta semantics"),
    ("unknown scope", {"messages": _msgs(), "steering": {"features": [], "scope": "everywhere"}}, 400,
     "steering.scope", "all"),
    ("unknown semantics", {"messages": _msgs(), "steering": {"semantics": "sparsify"}}, 400, "steering.semantics",
     "delta"),
    ("image not decodable", {"messages": image_message(url="data:image/png;base64," + base64.b64encode(b"nope").decode())},
     400, "messages[0].content[0].image_url.url", "could not be decoded"),
    ("image not base64", {"messages": image_message(url="data:image/png;base64,@@@")}, 400,
     "messages[0].content[0].image_url.url", "base64"),
    ("image over byte limit", {"messages": image_message(url=_big_png())}, 400,
     "messages[0].content[0].image_url.url", "over the limit of 60000"),
    ("decompression bomb", {"messages": image_message(url=_bomb_png())}, 400,
     "messages[0].content[0].image_url.url", "2000x2000 = 4000000 pixels, over the limit of 1000000"),
    ("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(seed=i)}} for i in range(3)]}]}, 400, "messages",
     "at most 2"),
    ("private image URL", {"messages": image_message(url="http://127.0.0.1:9/cat.png")}, 400,
     "messages[0].content[0].image_url.url", "private, loopback or reserved"),
    ("prompt longer than context", {"messages": _msgs("Tell me a story about Alice and Bob. " * 120)}, 400,
     "messages", "exceeds this engine's context of 512"),
    ("prompt plus max_tokens too long", {"messages": _msgs(), "max_tokens": 600}, 400, "max_tokens", "at most 512"),
    ("n", {"messages": _msgs(), "n": 2}, 400, "n", "only n=1"),
    ("empty messages", {"messages": []}, 400, "messages", "at least 1"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "user"),
    ("bad part type", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400,
     "messages[0].content[0]", "'audio'"),
    ("unknown model", {"model": "gpt-9", "messages": _msgs()}, 404, "model", "not served here"),
    ("temperature", {"messages": _msgs(), "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
]


@pytest.mark.parametrize("name,body,status,param,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_cases(server, name, body, status, param, message):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_non_finite_value_is_rejected(server):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "steering": {"features": [{"id": 1, "value": NaN}]}}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.features[0].value"
    assert "finite" in r.json()["error"]["message"]


def test_transport_errors(server):
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, content="hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.post(url, content='{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"x": "' + b"a" * 400_000 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 300000" in r.json()["error"]["message"]
    # the server is still serving
    assert server.post(url.removeprefix(server.url), {"messages": _msgs(), "max_tokens": 2}).status_code == 200


def test_errors_are_counted(server):
    before = server.metric("lmm_steer:request_errors_total")
    server.post("/v1/chat/completions", {"messages": _msgs(), "n": 3})
    assert server.metric("lmm_steer:request_errors_total") == before + 1


# -- text-only server: API keys, images refused, queue limit, disconnects --------------------------------

def test_api_keys(text_server):
    url = f"{text_server.url}/v1/chat/completions"
    body = {"messages": _msgs(), "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    bad = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer first-key"}).status_code == 200
    assert httpx.get(f"{text_server.url}/health").status_code == 200
    assert httpx.get(f"{text_server.url}/v1/models").status_code == 401


def test_images_to_text_only_model(text_server):
    r = text_server.post("/v1/chat/completions", {"messages": image_message()})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"
    assert "text-only" in r.json()["error"]["message"]


def _open_stream(server, max_tokens):
    """Start a streamed request and read its first chunk; returns the open stream (client, context,
    line iterator: dropping the iterator would close the response)."""
    client = httpx.Client(timeout=60, headers=server.headers)
    ctx = client.stream("POST", f"{server.url}/v1/chat/completions",
                        json={"messages": _msgs("Tell me a long story"), "max_tokens": max_tokens, "stream": True,
                              "temperature": 0, "ignore_eos": True})
    resp = ctx.__enter__()
    lines = resp.iter_lines()
    assert next(lines).startswith("data: ")
    return client, ctx, lines


def test_disconnect_frees_the_slot(text_server):
    aborted = text_server.metric("lmm_steer:requests_aborted_total")
    client, ctx, lines = _open_stream(text_server, 4000)
    next(lines)
    assert text_server.metric("lmm_steer:num_requests_running") == 1
    ctx.__exit__(None, None, None)
    client.close()
    assert wait_for(lambda: text_server.metric("lmm_steer:num_requests_running") == 0)
    assert text_server.metric("lmm_steer:requests_aborted_total") == aborted + 1
    # the single row is free again: a new request is served at once
    t0 = time.time()
    assert text_server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2}).status_code == 200
    assert time.time() - t0 < 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_burst_admits_max_batch_plus_max_queue_streamed_or_not(text_server, stream):
    # --max-batch 1 --max-queue 1: two admitted (one running, one waiting), whatever the timing and
    # whether the answers stream (streams used to be counted differently and admitted one fewer)
    import asyncio

    body = {"messages": _msgs("Tell me a long story"), "max_tokens": 4000, "ignore_eos": True, "temperature": 0,
            "stream": stream}

    async def burst():
        async with httpx.AsyncClient(base_url=text_server.url, headers=text_server.headers, timeout=60) as http:
            async def one():
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return r.status_code, r.json()["error"]["code"]
                    await asyncio.sleep(3600)  # admitted: hold it until cancelled

            tasks = [asyncio.create_task(one()) for _ in range(6)]
            done, pending = set(), set(tasks)
            while len(done) < 4 and pending:  # the refused ones answer at once; the admitted ones decode
                finished, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                assert finished, "no answer within 30 s"
                done |= finished
            refused = [t.result() for t in done]
            running, waiting = (text_server.metric(f"lmm_steer:num_requests_{k}") for k in ("running", "waiting"))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return refused, len(pending), running, waiting

    refused, admitted, running, waiting = asyncio.run(burst())
    assert refused == [(429, "queue_full")] * 4 and admitted == 2
    assert (running, waiting) == (1, 1)
    assert wait_for(lambda: text_server.metric("lmm_steer:num_requests_running") == 0, 20)


def test_queue_full_gives_429_with_retry_after(text_server):
    client, ctx, lines = _open_stream(text_server, 4000)  # holds the only row
    results = {}

    def waiter():
        results["second"] = text_server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2})

    t = threading.Thread(target=waiter)
    t.start()
    assert wait_for(lambda: text_server.metric("lmm_steer:num_requests_waiting") == 1)
    third = text_server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2})
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert third.json()["error"]["code"] == "queue_full"
    ctx.__exit__(None, None, None)
    client.close()
    t.join(timeout=30)
    assert results["second"].status_code == 200
