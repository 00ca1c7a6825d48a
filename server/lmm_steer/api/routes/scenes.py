"""``POST /v1/scenes``: a synthetic scene with its ground truth, from the generator the scenes model
was trained on, so a visitor can try the whole loop (ask, inspect, steer) without an image file."""

from __future__ import annotations

import asyncio
import base64
import secrets

from fastapi import APIRouter

from ...scenes.sample import sample_scene
from ..openapi import error_responses
from ..schemas import SceneInfo, SceneRequest

router = APIRouter()


@router.post("/v1/scenes", response_model=SceneInfo, responses=error_responses(400, 401, 405, 413, 415))
async def new_scene(body: SceneRequest):
    """Scene ``index`` of ``seed`` (the same as ``lmm-steer scenes generate --seed S`` writes as
    ``images/<index>.png``), its caption, objects, and questions with their answers."""
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    scene = await asyncio.get_running_loop().run_in_executor(None, sample_scene, seed, body.index)
    png = scene.pop("png")
    return {"object": "scene", **scene, "image": "data:image/png;base64," + base64.b64encode(png).decode()}
