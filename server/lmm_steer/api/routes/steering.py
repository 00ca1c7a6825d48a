"""``POST /v1/steering/suggest``: what ``steering.concepts`` would apply for a concept."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ...concepts.resolve import CANDIDATES, ConceptNotFound, candidates, choose
from ..deps import ServiceDep, explanation
from ..openapi import POST_ERRORS, error_responses
from ..schemas import Suggestion, SuggestRequest
from ..steering_request import concepts_unavailable

router = APIRouter()


@router.post("/v1/steering/suggest", response_model=Suggestion, responses=error_responses(*POST_ERRORS))
async def suggest(body: SuggestRequest, service: ServiceDep):
    """What ``steering.concepts`` would apply for a concept, and the nearest features it chose
    among, without generating."""
    if service.concepts is None:
        raise concepts_unavailable("text")

    def run():
        near = candidates(service.concepts, body.text, max(body.limit, CANDIDATES))  # embeds the concept once
        try:
            chosen = choose(near, body.text, body.strength, body.max_features)
        except ConceptNotFound:
            chosen = []
        return near[: body.limit], chosen

    near, chosen = await asyncio.get_running_loop().run_in_executor(None, run)
    return {"object": "steering.suggestion", "text": body.text, "concept": body.text, "strength": body.strength,
            "edits": [{"id": c.feature, "value": c.value, "mode": "clamp", "concept": body.text,
                       "explanation": explanation(service, c.feature)} for c in chosen],
            "candidates": [{"id": c.feature, "similarity": c.similarity, "value": c.value,
                            "calibrated": c.calibrated, "text": c.text} for c in near]}
