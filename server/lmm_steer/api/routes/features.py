"""``/v1/features``: catalog search, a feature's page data, and its top images highlighted."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ...service import SteeringService
from ..deps import ServiceDep, explanation
from ..errors import APIError
from ..openapi import GET_ERRORS, error_responses
from ..schemas import FeatureInfo, FeatureSearch

router = APIRouter()


def _shown_images(entry) -> list[dict]:
    """A catalog entry's top images that carry a patch grid, the ones a feature page shows: both the
    page's image URLs and the PNG route number them in this list."""
    return [im for im in ((entry.extras.get("top_images") if entry else None) or []) if im.get("grid")]


def _feature_or_404(service: SteeringService, feature_id: int) -> None:
    n = service.num_latents
    if n is None:
        raise APIError(404, "this server has no SAE loaded", param="id", code="not_found")
    if not 0 <= feature_id < n:
        raise APIError(404, f"feature {feature_id} does not exist (the SAE has features 0..{n - 1})",
                       param="id", code="feature_not_found")


@router.get("/v1/features/{feature_id}", response_model=FeatureInfo, responses=error_responses(*GET_ERRORS))
async def feature(feature_id: int, service: ServiceDep):
    _feature_or_404(service, feature_id)
    entry = service.catalog.get(feature_id)
    extras = dict(entry.extras) if entry else {}
    images = [{"url": f"/v1/features/{feature_id}/images/{k}.png", "activation": im.get("activation")}
              for k, im in enumerate(_shown_images(entry))]
    return {"id": feature_id, "explanation": explanation(service, feature_id),
            "hookpoint": service.engine.hookpoint,
            "decoder_norm": service.decoder_norms[feature_id] if service.decoder_norms else None,
            "stats": extras, "scores": extras.get("scores"), "top_images": images}


@router.get("/v1/features/{feature_id}/images/{index}.png", responses={
    200: {"content": {"image/png": {}}, "description": "the top image with the feature's active patches "
                                                       "highlighted, the rest darkened"},
    **error_responses(*GET_ERRORS)})
async def feature_image(feature_id: int, index: int, service: ServiceDep):
    from ...explain.highlight import highlight, png_bytes

    _feature_or_404(service, feature_id)
    images = _shown_images(service.catalog.get(feature_id))
    if not 0 <= index < len(images):
        raise APIError(404, f"feature {feature_id} has {len(images)} top images in the catalog, not "
                            f"an image {index}", param="index", code="not_found")

    def render() -> bytes:
        from PIL import Image

        with Image.open(images[index]["image"]) as im:
            return png_bytes(highlight(im, images[index]["grid"]))

    try:
        data = await asyncio.get_running_loop().run_in_executor(None, render)
    except OSError:
        raise APIError(404, f"feature {feature_id}'s image {index} is not readable on the server",
                       param="index", code="not_found") from None
    return Response(data, media_type="image/png")


@router.get("/v1/features", response_model=FeatureSearch, responses=error_responses(*GET_ERRORS))
async def search_features(service: ServiceDep, q: str = Query(..., min_length=1, max_length=500),
                          limit: int = Query(10, ge=1, le=100)):
    hits = await asyncio.get_running_loop().run_in_executor(None, service.search, q, limit)
    return {"object": "list", "query": q,
            "data": [{"id": e.feature, "explanation": e.explanation or None, "score": s,
                      "contexts": [c["text"] for c in (e.extras.get("top_contexts") or [])[:3]
                                   if isinstance(c, dict) and "text" in c]} for e, s in hits]}
