"""Hostile input and failure isolation: every bad input is a 4xx naming its field, one request
never fails another, and the server keeps serving (issue 14's defects, one test each)."""

import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from servers import Server
from soak import rss_mib

from lmm_steer.api.app import ServerSettings, create_app
from lmm_steer.engine import Engine, EngineConfig
from lmm_steer.metrics import Metrics
from lmm_steer.models.loader import load_model
from lmm_steer.service import SteeringService
from sae_weights import load_sae


def _msgs(text="hi"):
    return [{"role": "user", "content": text}]


def _image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk", "--max-batch", "4",
               "--max-seq-len", "512", "--max-steer-value", "1000", "--max-image-bytes", "200000",
               "--max-body-bytes", "400000")
    yield s
    s.stop()


# -- 1. steering values: bounded at validation, and a non-finite row fails alone -------------------------

@pytest.mark.parametrize("body,param", [
    ({"steering": {"features": [{"id": 1, "value": 1e308}], "scope": "generated"}}, "steering.features[0].value"),
    ({"clamps": {"2": 3.0, "1": -1e5}}, "clamps.1"),
    ({"steering": {"features": [{"id": 1, "value": 1000.5, "mode": "add"}]}}, "steering.features[0].value"),
])
def test_steer_values_beyond_the_bound_are_400(server, body, param):
    r = server.post("/v1/chat/completions", {"messages": _msgs(), "temperature": 1, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "outside [-1000, 1000]" in err["message"]
    ok = server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2,
                                              "clamps": {"1": 1000.0}})
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def poisonable():
    """In-process server whose engine bound is lifted, so a value that is infinite in the steering
    table gets past validation: the failure isolation below it is what is tested."""
    lm = load_model("builtin:tiny-llava-next")
    sae = load_sae("builtin:random-topk", d_in=64)
    engine = Engine(lm, sae, "model.layers.2", EngineConfig(max_batch=8, max_seq_len=256))
    engine.max_steer_value = float("inf")
    service = SteeringService(engine)
    service.metrics = Metrics(service.model_name, service)
    service.start()
    with TestClient(create_app(service, ServerSettings(), service.metrics)) as client:
        yield client, service
    service.stop()


def _error_total(client) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("lmm_steer:request_errors_total{"))


def test_a_non_finite_row_fails_only_its_own_request(poisonable):
    client, _ = poisonable
    base = {"max_tokens": 12, "temperature": 1, "seed": 5, "ignore_eos": True}
    bodies = [{"messages": _msgs(f"Tell me about {w}"), **base} for w in ("cats", "dogs", "rain", "tea", "snow")]
    poison = {"messages": _msgs("poison"), **base,
              "steering": {"features": [{"id": 1, "value": 1e308}], "scope": "generated"}}
    alone = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    errors = _error_total(client)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), [*bodies[:3], poison, *bodies[3:]]))
    bad = together.pop(3)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "non_finite_output"
    assert bad.json()["error"]["param"] == "steering" and "non-finite" in bad.json()["error"]["message"]
    assert [r.status_code for r in together] == [200] * 5
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone
    assert _error_total(client) == errors + 1  # counted once
    # streamed: an error event, then [DONE]
    with client.stream("POST", "/v1/chat/completions", json={**poison, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "non_finite_output"
    assert client.post("/v1/chat/completions", json=bodies[0]).json()["choices"][0]["message"]["content"] == alone[0]


# -- 2. huge prompts are refused by their length, quickly and without keeping memory ----------------------

def test_huge_prompts_are_refused_before_tokenising():
    s = Server("--model", "builtin:tiny-llama", "--sae", "none", "--max-seq-len", "1024")
    try:
        body = json.dumps({"messages": _msgs("word " * 4_000_000), "max_tokens": 4}).encode()  # 20 MB
        assert 19e6 < len(body) < 32 * 2**20
        s.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2})
        before = rss_mib(s.proc.pid)

        def send(_):
            return httpx.post(f"{s.url}/v1/chat/completions", content=body, timeout=120,
                              headers={"content-type": "application/json"})

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(send, range(3)))
        for r in replies:
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
            assert "20000000 characters cannot fit" in r.json()["error"]["message"]
        time.sleep(0.5)
        grown = rss_mib(s.proc.pid) - before
        assert grown < 200, f"resident memory grew by {grown:.0f} MiB"
        assert s.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


# -- 3. decompression bombs past Pillow's own limit -------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(w: int, h: int, extra: bytes = b"") -> bytes:
    row = b"\x00" + b"\x80" * (3 * min(w, 4))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + extra
            + _chunk(b"IDAT", zlib.compress(row * min(h, 4))) + _chunk(b"IEND", b""))


def _jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _gif_screen(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
            + b"\x02\x02\x44\x01\x00\x3b")


BOMBS = {
    "png 30000x30000": ("png", _png(30000, 30000)),
    "jpeg header 65000x65000": ("jpeg", _jpeg_header(65000, 65000)),
    "gif screen 65535x65535": ("gif", _gif_screen(65535, 65535)),
    "png text chunk inflating to 50 MiB": ("png", _png(4, 4, _chunk(
        b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 50 * 2**20, 9)))),
}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/inspect"])
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_400_naming_the_image(server, route, name):
    import base64

    kind, data = BOMBS[name]
    url = f"data:image/{kind};base64," + base64.b64encode(data).decode()
    r = server.post(route, {"messages": _image_message(url)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"


# -- 4. values that reached int() or the tokenizer unchecked; strict JSON types ---------------------------

BAD_VALUES = [
    ("seed 2**64", {"seed": 2**64}, "seed"),
    ("seed -2**64", {"seed": -(2**64)}, "seed"),
    ("seed 10**30", {"seed": 10**30}, "seed"),
    ("clamp key of 5000 digits", {"clamps": {"9" * 5000: 1.0}}, "clamps"),
    ("clamp key superscript two", {"clamps": {"²": 1.0}}, "clamps"),
    ("clamp key Arabic-Indic one", {"clamps": {"١": 1.0}}, "clamps"),
    ("max_tokens as a string", {"max_tokens": "4"}, "max_tokens"),
    ("return_unsteered as 0", {"return_unsteered": 0}, "return_unsteered"),
    ("stream as a string", {"stream": "true"}, "stream"),
    ("feature id with a fraction", {"steering": {"features": [{"id": 1.5, "value": 1}]}}, "steering.features[0].id"),
]


@pytest.mark.parametrize("name,extra,param", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_400_naming_the_field(server, name, extra, param):
    r = server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("where", ["content", "part", "stop", "name"])
def test_lone_surrogates_are_400(server, where):
    text = '"bad \\ud800 text"'
    msg = {"content": f'{{"role": "user", "content": {text}}}',
           "part": f'{{"role": "user", "content": [{{"type": "text", "text": {text}}}]}}',
           "stop": '{"role": "user", "content": "hi"}', "name": f'{{"role": "user", "content": "hi", "name": {text}}}'}
    raw = f'{{"messages": [{msg[where]}], "max_tokens": 2{", " + chr(34) + "stop" + chr(34) + ": " + text if where == "stop" else ""}}}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("top_p", [5e-324, 1e-300])
def test_vanishing_top_p_keeps_the_top_token(server, top_p):
    body = {"messages": _msgs("Tell me a story"), "max_tokens": 8, "ignore_eos": True}
    greedy = server.post("/v1/chat/completions", {**body, "temperature": 0}).json()["choices"][0]["message"]["content"]
    r = server.post("/v1/chat/completions", {**body, "temperature": 1, "top_p": top_p, "seed": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy


# -- 10. fields we cannot honour are refused by name ------------------------------------------------------

UNSUPPORTED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("tool_choice", {"tool_choice": "required"}, "tool_choice"),
    ("response_format", {"response_format": {"type": "json_object"}}, "response_format"),
    ("logit_bias", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("assistant tool_calls", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[1].tool_calls"),
]


@pytest.mark.parametrize("name,extra,param", UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED])
def test_unsupported_fields_are_refused_by_name(server, name, extra, param):
    r = server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "not supported" in err["message"] and err["code"] == "unsupported_parameter"


def test_harmless_values_of_those_fields_are_accepted(server):
    r = server.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2, "tool_choice": "none",
                                             "response_format": {"type": "text"}, "logit_bias": {}})
    assert r.status_code == 200, r.text


# -- 6, 7, 11. transport: abandoned requests, chunked bodies, parse errors, 401 and 405 headers -----------

def test_abandoned_non_streaming_request_is_cancelled():
    s = Server("--model", "builtin:tiny-llama", "--sae", "none", "--max-batch", "1", "--max-seq-len", "4096")
    try:
        aborted = s.metric("lmm_steer:requests_aborted_total")
        body = {"messages": _msgs(), "max_tokens": 4000, "ignore_eos": True}  # seconds of decoding
        with pytest.raises(httpx.ReadTimeout):
            s.post("/v1/chat/completions", body, timeout=1.0)
        deadline = time.time() + 3
        while time.time() < deadline and s.metric("lmm_steer:num_requests_running") != 0:
            time.sleep(0.05)
        assert s.metric("lmm_steer:num_requests_running") == 0
        assert s.metric("lmm_steer:requests_aborted_total") == aborted + 1
        # the only row is free: a short request is answered now, not after 4000 tokens
        assert s.post("/v1/chat/completions", {"messages": _msgs(), "max_tokens": 2}, timeout=10).status_code == 200
    finally:
        s.stop()


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(50):
            yield b" " * 10_000  # 500 KB in all, over the 400000-byte limit, with no Content-Length

    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=iter([small[:10], small[10:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [b"[" * 10_000 + b"]" * 10_000, b'{"messages": "\xff\xfe"}'],
                         ids=["nested 10000 deep", "invalid utf-8"])
def test_unparseable_bodies_are_invalid_json(server, raw):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_method_not_allowed_has_allow_and_is_counted(server):
    before = server.metric("lmm_steer:request_errors_total")
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert server.metric("lmm_steer:request_errors_total") == before + 1


def test_401_carries_a_bearer_challenge(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    s = Server("--model", "builtin:tiny-llama", "--sae", "none", "--api-key-file", str(keys), key="k1")
    try:
        r = httpx.get(f"{s.url}/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    finally:
        s.stop()


# -- 8. a failed non-streaming request is one error --------------------------------------------------------

def test_a_failed_request_is_counted_once(poisonable, monkeypatch):
    import lmm_steer.engine.engine as engine_mod

    client, _ = poisonable

    def broken(*a, **k):
        raise RuntimeError("simulated device fault")

    before = _error_total(client)
    monkeypatch.setattr(engine_mod, "run_prefill", broken)
    r = client.post("/v1/chat/completions", json={"messages": _msgs(), "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert _error_total(client) == before + 1
    text = client.get("/metrics").text
    assert 'type="internal"' not in text


# -- 9. the schema says what the server does -------------------------------------------------------------

def test_openapi_lists_the_statuses_each_route_returns(server):
    spec = server.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (path, method)
    inspect = spec["paths"]["/v1/inspect"]["post"]["responses"]
    assert {"200", "400", "404", "413", "415", "503"} <= set(inspect)
    error = inspect["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/ErrorResponse")
    clamps = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["clamps"]
    assert clamps["propertyNames"]["pattern"] == "^[0-9]{1,18}$"


# -- 12. image URLs: one parse, pinned address, every non-global range refused ------------------------------

@pytest.mark.parametrize("address", ["100.64.0.1", "2002:c0a8:0101::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                                     "64:ff9b::a00:1", "192.0.0.1", "198.18.0.1", "240.0.0.1", "224.0.0.1",
                                     "fd00::1", "::"])
def test_non_global_addresses_are_refused(address):
    from lmm_steer.api.images import _public

    assert not _public(address)


@pytest.mark.parametrize("url,message", [
    ("http://127.0.0.1:18103\\@example.com/", "backslash"),
    ("http://user:pw@example.com/cat.png", "credentials"),
    ("ftp://example.com/cat.png", "must be http"),
])
def test_confusable_image_urls_are_refused(url, message):
    import asyncio

    from lmm_steer.api.errors import APIError
    from lmm_steer.api.images import ImageLimits, fetch_image

    with pytest.raises(APIError, match=message) as info:
        asyncio.run(fetch_image(url, "p", ImageLimits(allow_urls=True)))
    assert info.value.status == 400


def test_the_checked_address_is_the_one_fetched(monkeypatch):
    """The name resolves once; the connection goes to that address with the original Host."""
    import asyncio
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import lmm_steer.api.images as images

    seen = {}
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(png, format="PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["host"] = self.headers["Host"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(png.getvalue())))
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.handle_request, daemon=True).start()
    lookups = []

    async def fake_getaddrinfo(self, host, p, **kw):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(images, "_public", lambda a: a == "127.0.0.1")  # this test's server is local
    img = asyncio.run(images.fetch_image(f"http://images.invalid:{port}/cat.png", "p",
                                         images.ImageLimits(allow_urls=True)))
    httpd.server_close()
    # "images.invalid" cannot resolve anywhere: the fetch reached the address the check saw
    assert img.size == (4, 4) and lookups == ["images.invalid"] and seen["host"] == f"images.invalid:{port}"
