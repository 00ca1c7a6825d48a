"""The Python client SDK and its CLI, against a real server and an HTTP-level test double."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import torch
from lmm_steer_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    Steering,
)
from PIL import Image
from servers import Server


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk", "--max-batch", "4",
               "--max-seq-len", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    g = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(40, 96, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def test_chat_steering_and_unsteered(client):
    plain = client.chat(prompt="Tell me a story", max_tokens=10, temperature=0)
    steered = client.chat(prompt="Tell me a story", max_tokens=10, temperature=0, clamps={11: 40.0},
                          return_unsteered=True)
    assert steered.unsteered_text == plain.text and steered.text != plain.text
    assert steered.steering["features"] == [{"id": 11, "value": 40.0, "mode": "clamp", "explanation": None,
                                             "concept": None}]
    assert plain.usage.completion_tokens == 10 and plain.finish_reason == "length"


def test_streaming_equals_non_streaming(client, image_path):
    kw = {"prompt": "What is this?", "images": [image_path], "max_tokens": 12, "temperature": 0,
          "steering": Steering().add(7, 5.0).scope("generated")}
    whole = client.chat(**kw)
    stream = client.chat(stream=True, **kw)
    deltas = list(stream)
    assert "".join(deltas) == whole.text == stream.result.text
    assert stream.result.usage.completion_tokens == 12 and stream.result.steering["scope"] == "generated"


def test_async_client(server):
    async def run():
        async with AsyncClient(server.url) as c:
            r = await c.chat(prompt="hi", max_tokens=5, temperature=0)
            stream = c.chat_stream(prompt="hi", max_tokens=5, temperature=0)
            parts = [d async for d in stream]
            return r, parts, stream.result

    result, parts, final = asyncio.run(run())
    assert "".join(parts) == result.text == final.text and final.usage.completion_tokens == 5


def test_sweep_one_completion_per_value(client):
    values = [0, 10, 25, 50]
    results = client.sweep("Tell me a story", feature=11, values=values, max_tokens=8)  # greedy by default
    assert [r.steering["features"][0]["value"] for r in results] == values
    alone = client.chat(prompt="Tell me a story", max_tokens=8, temperature=0, steering=Steering().clamp(11, 25))
    assert results[2].text == alone.text
    assert len({r.text for r in results}) > 1


def _recording_chat_handler(sent: list):
    """A chat endpoint double that keeps each request body and answers with one fixed completion."""
    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "c", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})

    return handler


def test_sweep_is_greedy_unless_told_otherwise():
    sent = []
    with Client("http://test", transport=httpx.MockTransport(_recording_chat_handler(sent))) as c:
        c.sweep("Tell me a story", feature=11, values=[0, 10], max_tokens=8)
        assert sorted(b["steering"]["features"][0]["value"] for b in sent) == [0, 10]
        assert [b["temperature"] for b in sent] == [0.0, 0.0]
        sent.clear()
        c.sweep("Tell me a story", feature=11, values=[5], temperature=0.7, seed=1)
        assert sent[0]["temperature"] == 0.7 and sent[0]["seed"] == 1
        sent.clear()
        c.chat(prompt="hi")  # a plain chat sends none: the server's default (1.0, sampled) applies
        assert "temperature" not in sent[0]


def test_async_sweep_is_greedy_unless_told_otherwise():
    sent = []

    async def run():
        async with AsyncClient("http://test", transport=httpx.MockTransport(_recording_chat_handler(sent))) as c:
            results = await c.sweep("Tell me a story", feature=11, values=[0, 10, 25], concurrency=2)
            sampled = await c.sweep("Tell me a story", feature=11, values=[5], temperature=0.7)
            return results, sampled

    results, sampled = asyncio.run(run())
    assert len(results) == 3 and all(r.text == "ok" for r in results) and len(sampled) == 1
    assert sorted(b["steering"]["features"][0]["value"] for b in sent[:3]) == [0, 10, 25]
    assert [b["temperature"] for b in sent] == [0.0, 0.0, 0.0, 0.7]


def test_async_sweep_matches_the_sync_one(client, server):
    async def run():
        async with AsyncClient(server.url) as c:
            return await c.sweep("Tell me a story", feature=11, values=[0, 25], max_tokens=8)

    assert [r.text for r in asyncio.run(run())] == [
        r.text for r in client.sweep("Tell me a story", feature=11, values=[0, 25], max_tokens=8)]


def test_features(client):
    f = client.features.get(7)
    assert f.id == 7 and abs(f.decoder_norm - 1.0) < 1e-4
    with pytest.raises(NotFoundError) as info:
        client.features.get(10**6)
    assert info.value.status == 404 and info.value.param == "id"
    assert client.features.search("nothing in an empty catalog") == []


def test_error_mapping(client):
    with pytest.raises(BadRequestError) as info:
        client.chat(prompt="hi", clamps={512: 1.0})
    assert info.value.status == 400 and info.value.param == "steering.features[0].id"
    assert "does not exist" in info.value.message


def test_builder_rejects_bad_input_before_sending():
    for bad in (lambda: Steering().clamp(1, float("nan")), lambda: Steering().clamp(-1, 2.0),
                lambda: Steering().clamp(1, 2).add(1, 3), lambda: Steering().scope("everywhere"),
                lambda: Steering().semantics("sparsify"), lambda: Steering().clamp(True, 1.0)):
        with pytest.raises(ValueError):
            bad()
    assert Steering().clamp(3, 10).ablate(4).scale(5, 2).to_dict() == {
        "features": [{"id": 3, "value": 10.0, "mode": "clamp"}, {"id": 4, "value": 0.0, "mode": "clamp"},
                     {"id": 5, "value": 2.0, "mode": "scale"}]}
    assert Steering().swap(4, 9, 2.0).to_dict() == {
        "features": [{"id": 4, "value": 0.0, "mode": "clamp"}, {"id": 9, "value": 2.0, "mode": "transfer", "source": 4}]}
    assert Steering().clamp(9, 50, where=4).ablate(7, where=4).to_dict() == {
        "features": [{"id": 9, "value": 50.0, "mode": "clamp", "where": 4},
                     {"id": 7, "value": 0.0, "mode": "clamp", "where": 4}]}
    for bad in (lambda: Steering().transfer(3, 1.0, 3), lambda: Steering().transfer(3, 1.0, None),
                lambda: Steering().transfer(3, 1.0, -2), lambda: Steering().clamp(3, 1.0, where=-1),
                lambda: Steering().clamp(3, 1.0, where="red")):
        with pytest.raises(ValueError):
            bad()
    assert Steering().semantics("paper").preset("fix-red").to_dict() == {
        "features": [], "semantics": "paper", "preset": "fix-red"}
    with pytest.raises(ValueError):
        Steering().preset("")


def test_inspect_heatmap_png_sized_like_the_image(server, image_path, tmp_path):
    out = tmp_path / "heat.png"
    r = subprocess.run([sys.executable, "-m", "lmm_steer_client.cli", "--base-url", server.url, "inspect",
                        "--image", str(image_path), "--feature", "7", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    heat, original = Image.open(out), Image.open(image_path)
    assert heat.size == original.size and heat.format == "PNG"


def test_cli_chat_and_search(server):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lmm_steer_client.cli", "--base-url", server.url, *args],
                              capture_output=True, text=True, timeout=120)

    r = cli("chat", "--clamp", "11=40", "--clamp", "7=2:add", "--no-stream", "--max-tokens", "6", "Tell me a story")
    assert r.returncode == 0 and r.stdout.strip()
    gated = cli("chat", "--clamp", "11=40@7", "--no-stream", "--max-tokens", "6", "Tell me a story")
    assert gated.returncode == 0 and gated.stdout.strip()
    assert cli("chat", "--clamp", "11=40@", "hi").returncode == 2  # a gate needs its feature id
    err = cli("chat", "--clamp", "11=40@9999", "--no-stream", "hi")
    assert err.returncode == 1 and "where must be a feature id" in err.stderr
    bad = cli("chat", "--clamp", "11=oops", "hi")
    assert bad.returncode != 0
    err = cli("chat", "--clamp", "9999=1", "--no-stream", "hi")
    assert err.returncode == 1 and "does not exist" in err.stderr


def test_api_key_from_environment(monkeypatch):
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"error": {"message": "bad key", "type": "authentication_error"}})

    monkeypatch.setenv("LMM_STEER_API_KEY", "k-123")
    with Client("http://test", transport=httpx.MockTransport(handler)) as c, pytest.raises(AuthenticationError):
        c.features.get(1)
    assert seen == ["Bearer k-123"]


def test_sdk_imports_without_torch_or_transformers():
    code = "import sys, lmm_steer_client, lmm_steer_client.cli; print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
