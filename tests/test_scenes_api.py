"""``POST /v1/scenes``: one scene on demand, identical to what ``scenes generate`` writes."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lmm_steer.api.app import ServerSettings, create_app
from lmm_steer.engine import Engine, EngineConfig
from lmm_steer.models.loader import load_model
from lmm_steer.scenes.generate import generate
from lmm_steer.service import SteeringService


@pytest.fixture(scope="module")
def client():
    service = SteeringService(Engine(load_model("builtin:tiny-llama"), None, None, EngineConfig(max_batch=1)))
    with TestClient(create_app(service, ServerSettings())) as c:
        yield c


def test_a_scene_equals_the_generators_file(client, tmp_path):
    generate(tmp_path, n=4, seed=11)
    r = client.post("/v1/scenes", json={"seed": 11, "index": 3})
    assert r.status_code == 200, r.text
    scene = r.json()
    assert scene["image"].startswith("data:image/png;base64,")
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(scene["image"].split(",", 1)[1]))).convert("RGB"))
    written = np.asarray(Image.open(tmp_path / "images" / "000003.png").convert("RGB"))
    assert served.shape == written.shape and (served == written).all()
    rows = [json.loads(line) for line in (tmp_path / "conversations.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["image"] == "images/000003.png"]
    assert [q["prompt"] for q in scene["questions"]] == [
        r["conversations"][0]["value"].removeprefix("<image>\n") for r in rows]
    assert [q["answer"] for q in scene["questions"]] == [r["answer"] for r in rows]
    graph = json.loads((tmp_path / "scenes.json").read_text())["scenes"][3]
    assert [(o["shape"], o["colour"]) for o in scene["objects"]] == [(o["shape"], o["colour"]) for o in graph["objects"]]
    assert "yellow circle" in scene["caption"] and scene["questions"][0]["question"] == "What colour is the circle?"


def test_without_a_seed_each_call_draws_one_and_says_which(client):
    a, b = client.post("/v1/scenes", json={}).json(), client.post("/v1/scenes", json={}).json()
    assert a["seed"] != b["seed"]
    again = client.post("/v1/scenes", json={"seed": a["seed"], "index": a["index"]}).json()
    assert again["image"] == a["image"] and again["questions"] == a["questions"]


@pytest.mark.parametrize("body,param", [({"seed": -1}, "seed"), ({"index": "3"}, "index"),
                                        ({"seed": 1, "colour": "red"}, "colour")])
def test_bad_fields_are_named(client, body, param):
    r = client.post("/v1/scenes", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
