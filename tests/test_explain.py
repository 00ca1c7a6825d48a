"""``lmm-steer sae explain``: answers read, images highlighted, failures retried, and a run against a
real served model (resumed)."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import Server

from lmm_steer.explain.explainer import Explainer, ExplainerConfig, ExplainerError, clean, combine
from lmm_steer.explain.highlight import DARKEN, highlight, region_mask
from lmm_steer.explain.run import parse_features
from lmm_steer.scenes.generate import generate


@pytest.mark.parametrize(("answer", "want"), [
    ("  \"A small red circle.\" ", "A small red circle"), ("Unable.", None), ("I am unable to tell", None),
    ("", None), ("unable-bodied", "unable-bodied"), ("red\n  circles", "red circles"),
])
def test_an_answer_is_cleaned_and_unable_means_none(answer, want):
    assert clean(answer) == want


def test_per_image_answers_combine_into_what_most_share():
    assert combine(["a red circle", "A red circle", "a blue star"]) == "a red circle"
    assert combine(["a small red circle", "a large red square", "red star", None]) == "red"
    assert combine(["red circle", "blue star", "green cross"]) is None
    assert combine([None, None, "red circle"]) is None  # most could not say


def test_the_highlight_keeps_active_patches_and_darkens_the_rest():
    grid = [[0.0, 2.0], [0.0, 0.0]]  # the top-right patch is active
    mask = region_mask(grid, 8, 8)
    assert mask[1, 6] == 1.0 and mask[6, 1] == 0.0 and 0 < mask[3, 4] < 1  # bilinear at the border
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    out = np.asarray(highlight(image, grid))
    assert (out[1, 6] == 200).all() and (out[6, 1] == round(200 * DARKEN)).all()


def _explainer(handler, **kw):
    slept = []
    cfg = ExplainerConfig("http://explainer.test/v1", "m", retries=kw.pop("retries", 2), backoff_s=0.5, **kw)
    return Explainer(cfg, transport=httpx.MockTransport(handler), sleep=slept.append), slept


def _reply(text, usage=None):
    return httpx.Response(200, json={"choices": [{"message": {"content": text}}], "usage": usage or {}})


def test_a_refused_request_is_retried_with_backoff_and_retry_after():
    calls = []

    def handler(request):
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "3"}, json={"error": "slow down"})
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return _reply("red circles", {"prompt_tokens": 10, "completion_tokens": 2})

    explainer, slept = _explainer(handler)
    assert explainer.ask([{"type": "text", "text": "hi"}]) == "red circles"
    assert slept == [3.0, 1.0] and calls[0]["temperature"] == 0 and calls[0]["model"] == "m"
    assert explainer.stats["requests"] == 3 and explainer.stats["retries"] == 2
    assert explainer.stats["prompt_tokens"] == 10


@pytest.mark.parametrize(("handler", "message"), [
    (lambda r: httpx.Response(503, text="down"), "gave up after 3 attempts: HTTP 503"),
    (lambda r: httpx.Response(400, text="bad image"), "HTTP 400: bad image"),
    (lambda r: httpx.Response(200, json={"choices": []}), "malformed answer"),
    (lambda r: httpx.Response(200, text="<html>"), "malformed answer"),
])
def test_failures_end_in_a_clear_error(handler, message):
    explainer, _ = _explainer(handler)
    with pytest.raises(ExplainerError, match=message):
        explainer.ask([{"type": "text", "text": "hi"}])


def test_feature_selection():
    rows = {1: {"top_images": [{"activation": 0.5}]}, 2: {"top_images": [{"activation": 3.0}]},
            5: {"top_contexts": [{"activation": 1.0}]}}
    assert parse_features("all", rows) == [1, 2, 5] and parse_features("top-2", rows) == [2, 5]
    assert parse_features("5,1", rows) == [5, 1]
    many = {f: {"top_images": [{"activation": 1.0}]} for f in range(100)}
    drawn = parse_features("sample-10", many)
    assert len(set(drawn)) == 10 and drawn == sorted(drawn) and drawn == parse_features("sample-10", many)
    assert drawn != list(range(10)) and parse_features("sample-500", rows) == [1, 2, 5]
    for bad in ("7", "x", "top-0", "sample-0", ""):
        with pytest.raises(ValueError, match="--features"):
            parse_features(bad, rows)


def test_explaining_with_a_real_served_model_resumes_and_loads_as_a_catalog(tmp_path):
    from lmm_steer.cli import main
    from sae_weights import FeatureCatalog

    generate(tmp_path / "scenes", 4, seed=31)
    server = Server("--model", "builtin:tiny-llava-next", "--sae", "none", "--default-max-tokens", "8")
    out = tmp_path / "explained.jsonl"
    run = ["sae", "explain", "--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
           "--hookpoint", "model.layers.1", "--data", str(tmp_path / "scenes" / "conversations.jsonl"),
           "--explainer", f"{server.url}/v1", "--explainer-model", "builtin:tiny-llava-next", "--top", "2",
           "--out", str(out)]
    try:
        assert main([*run, "--features", "top-3"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        explained = [r for r in rows if "explainer" in r]
        assert len(explained) == 3 and all(r["explainer"]["status"] in ("ok", "unable") for r in explained)
        assert all(r["explainer"]["input"] == "images" and len(r["top_images"]) <= 2 for r in explained)
        assert len(rows) > 3  # every feature that fires is in the catalog, explained or not
        for r in rows:  # a peak at one patch, as max_activation is everywhere: above the ranking mean
            peak = max(v for im in r["top_images"] for row in im["grid"] for v in row)
            assert r["max_activation"] == peak >= r["top_images"][0]["activation"] > 0
        before = {r["feature"]: r["explanation"] for r in explained}
        assert main([*run, "--features", "top-4", "--mode", "per-image"]) == 0  # resumes: only one more
        again = {r["feature"]: r for r in map(json.loads, out.read_text().splitlines()) if "explainer" in r}
        assert len(again) == 4 and all(again[f]["explanation"] == text for f, text in before.items())
        assert [r["explainer"]["mode"] for f, r in again.items() if f not in before] == ["per-image"]
    finally:
        server.stop()
    catalog = FeatureCatalog.load(out)
    word = next((t.split()[0] for t in before.values() if t), None)
    if word is not None:
        assert catalog.search(word, 5)
    # the server shows each explained feature with its highlighted top images
    served = Server("--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk:latents=64,k=8",
                    "--hookpoint", "model.layers.1", "--catalog", str(out))
    try:
        feature = next(iter(before))
        info = served.get(f"/v1/features/{feature}").json()
        assert info["explanation"] == (before[feature] or None) and 1 <= len(info["top_images"]) <= 2
        png = served.get(info["top_images"][0]["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(png.content))
        assert shown.size == Image.open(again[feature]["top_images"][0]["image"]).size
        missing = served.get(f"/v1/features/{feature}/images/9.png")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "index"
    finally:
        served.stop()
