"""The HTTP app in-process (for failure injection a real process cannot offer)."""

import asyncio

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
    service = SteeringService(Engine(lm, None, None, EngineConfig(max_batch=2, max_seq_len=256)))
    service.metrics = Metrics(service.model_name, service)
    service.start()
    with TestClient(create_app(service, ServerSettings(), service.metrics)) as client:
        yield client, service
    service.stop()


def test_one_failing_request_gives_500_and_the_server_keeps_serving(plain_app, monkeypatch):
    import lmm_steer.engine.engine as engine_mod

    client, service = plain_app
    real = engine_mod.run_prefill

    def broken(*a, **k):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(engine_mod, "run_prefill", broken)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "simulated CUDA error" in r.json()["error"]["message"]
    monkeypatch.setattr(engine_mod, "run_prefill", real)
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


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
