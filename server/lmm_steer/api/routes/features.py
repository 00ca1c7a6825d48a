"""``/v1/features``: catalog search, a feature's page data, and its top images highlighted."""

from __future__ import annotations

import asyncio
import io
import weakref

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ...service import SteeringService
from ..deps import ServiceDep, explanation
from ..errors import APIError
from ..openapi import GET_ERRORS, error_responses
from ..schemas import FeatureInfo, FeatureSearch

router = APIRouter()

# A feature whose top images' strongest patch reaches this share of its maximum activation fires
# mostly on image patches (on the scenes catalog the share is 0 for 2,469 features and at least 0.75
# for 1,017: the split is clear).
IMAGE_SHARE = 0.25
# An uncalibrated image feature is proposed at this share of the residual stream's norm on image
# tokens: on the scenes model (norm about 208 there) every colour and shape feature that turns the
# README scene's answer at any value tried does so at 0.75 x (156), while three times their maximum
# activation leaves the red one (324) unchanged and 0.95 x starts to overshoot (cyan turns "gray").
NORM_SHARE = 0.75
RECIPE_TIMES_MAX = 3.0  # the text recipe: three times the maximum activation
SCOPES = ("all", "prompt", "generated", "image")  # a calibration row's scope, if it names one of these

_MARK = "Zqxj"  # a marker for the user's text when the chat template is rendered around it
# per service: what the chat template puts before a user's text, and the residual norm on image tokens
_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tol(a: float) -> float:
    return 1e-3 + 1e-3 * abs(a)  # grids are stored to 3 decimals


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


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def image_summary(im: dict) -> dict:
    """One top image's peak and mean patch activation (from its grid), and which of the two, if either,
    its stored ``activation`` is: ``sae explain`` ranks images shown alone by the mean over their
    patches; ``sae catalog`` ranks examples by their strongest token, which may be a text token or a
    patch outside the base view the grid covers."""
    cells = [float(v) for row in im.get("grid") or [] for v in row]
    peak = max(cells) if cells else None
    mean = sum(cells) / len(cells) if cells else None
    a = _number(im.get("activation"))
    ranked = None
    if a is not None and mean is not None:
        if abs(a - mean) <= _tol(a):
            ranked = "mean_patch"
        elif abs(a - peak) <= _tol(a):
            ranked = "peak_patch"
        else:
            ranked = "strongest_token"
    return {"activation": a, "peak_patch": peak, "mean_patch": mean, "patches": len(cells) or None, "ranked_by": ranked}


def template_prefix(service: SteeringService) -> str:
    """The text the chat template puts before a lone user message, special tokens left out and
    newlines as spaces, as catalog contexts show it (SmolLM2's: "system You are a helpful AI assistant
    named SmolLM, trained by Hugging Face user ")."""
    facts = _facts.setdefault(service, {})
    if "prefix" not in facts:
        from ...models.inputs import build_inputs

        loaded = service.engine.loaded
        content = [{"type": "text", "text": _MARK}] if loaded.is_multimodal else _MARK
        try:
            ids = build_inputs(loaded, [{"role": "user", "content": content}])["input_ids"][0].tolist()
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True).replace("\n", " ")
            facts["prefix"] = text[: text.index(_MARK)] if _MARK in text else ""
        except Exception:  # noqa: BLE001 - a tokenizer without a chat template: nothing to mark
            facts["prefix"] = ""
    return facts["prefix"]


def template_chars(context: str, prefix: str) -> int:
    """How many leading characters of a marked context («token») are the chat template's text: the
    whole context when it lies inside the template, else the longest end of the template it starts
    with (at least 8 characters, or whole words of it)."""
    if not prefix:
        return 0
    plain = context.replace("«", "").replace("»", "")
    if plain.strip() and plain in prefix:
        return len(context)
    k = 0
    for n in range(min(len(prefix), len(plain)), 3, -1):
        # 8 characters or more, or whole words of it (a window that starts with the role name "user ")
        if plain[:n] == prefix[-n:] and (n >= 8 or n == len(prefix) or prefix[-n - 1] == " "):
            k = n
            break
    if not k:
        return 0
    seen = 0  # plain characters -> characters of the marked context
    for i, ch in enumerate(context):
        if ch not in "«»":
            seen += 1
        if seen == k:
            return i + 1
    return len(context)


async def image_residual_norm(service: SteeringService) -> float | None:
    """Median norm of the hookpoint's output over the image tokens of one generated scene (measured
    once per server; None for a text-only model or when it cannot be measured)."""
    facts = _facts.setdefault(service, {})
    if "image_norm" in facts:
        return facts["image_norm"]
    lock = facts.setdefault("lock", asyncio.Lock())
    async with lock:
        if "image_norm" in facts:
            return facts["image_norm"]
        norm = None
        if service.engine.loaded.is_multimodal:
            from PIL import Image

            from ...engine import GenerationRequest, SamplingParams
            from ...engine.inspect import image_residual_norm as measure
            from ...scenes.sample import sample_scene

            with Image.open(io.BytesIO(sample_scene(0, 0)["png"])) as im:
                image = im.convert("RGB")
            req = GenerationRequest(messages=[{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "Describe the image."}]}], images=[image],
                sampling=SamplingParams(max_tokens=1))
            try:
                norm = await service.call(lambda engine: measure(engine, engine.prepare(req).inputs))
            except Exception:  # noqa: BLE001 - the proposal falls back to the text recipe
                norm = None
        facts["image_norm"] = norm
        return norm


async def proposal(service: SteeringService, entry, decoder_norm: float | None) -> dict:
    """The value a client should try first: the calibrated one where the catalog has it, else one
    drawn from the population the feature fires most in (image patches or tokens at large)."""
    extras = entry.extras if entry else {}
    steer = extras.get("steer")
    if isinstance(steer, dict) and _number(steer.get("value")) is not None:
        scope = steer.get("scope") if steer.get("scope") in SCOPES else None
        where = f" on the {scope} scope" if scope else " on generated tokens"
        return {"value": _number(steer["value"]), "scope": scope, "calibrated": True, "population": None,
                "basis": f"calibrated: the value the catalog's calibration measured{where}, where the concept "
                         "shows and the output stays fluent"}
    none_found = " (calibration found no value before the output broke)" if isinstance(steer, dict) else ""
    peak = _number(extras.get("max_activation"))
    if not peak:
        return {"value": None, "scope": None, "calibrated": False, "population": None,
                "basis": f"uncalibrated, and the catalog has no maximum activation: choose a value{none_found}"}
    patch = max((s["peak_patch"] for s in map(image_summary, _shown_images(entry)) if s["peak_patch"] is not None),
                default=0.0)
    if service.engine.loaded.is_multimodal and patch >= IMAGE_SHARE * peak:
        norm = await image_residual_norm(service)
        if norm:
            value = max(RECIPE_TIMES_MAX * peak, NORM_SHARE * norm / (decoder_norm or 1.0))
            return {"value": round(value, 2), "scope": "image", "calibrated": False, "population": "image",
                    "basis": f"uncalibrated: it fires most on image patches (its top images' peak patch {patch:.3g}, "
                             f"maximum {peak:.3g}), so the proposal clamps the image's tokens at {NORM_SHARE} x the "
                             f"residual stream's norm there ({norm:.0f}, median over a generated scene's image tokens)"
                             f"; {RECIPE_TIMES_MAX:g} x the maximum is often too weak on images{none_found}"}
    return {"value": round(RECIPE_TIMES_MAX * peak, 2), "scope": None, "calibrated": False, "population": "text",
            "basis": f"uncalibrated: {RECIPE_TIMES_MAX:g} x the maximum activation ({peak:.3g}), the recipe that "
                     f"steers text{none_found}"}


@router.get("/v1/features/{feature_id}", response_model=FeatureInfo, responses=error_responses(*GET_ERRORS))
async def feature(feature_id: int, service: ServiceDep):
    _feature_or_404(service, feature_id)
    entry = service.catalog.get(feature_id)
    extras = dict(entry.extras) if entry else {}
    shown = _shown_images(entry)
    images = [{"url": f"/v1/features/{feature_id}/images/{k}.png", **image_summary(im)} for k, im in enumerate(shown)]
    peak = _number(extras.get("max_activation"))
    patch = max((im["peak_patch"] for im in images if im["peak_patch"] is not None), default=None)
    over = None
    if peak is not None:
        over = "top_image_patches" if patch is not None and abs(peak - patch) <= _tol(peak) else "any_token"
    prefix = template_prefix(service)
    contexts = [{"text": c["text"], "activation": _number(c.get("activation")),
                 "template_chars": template_chars(c["text"], prefix)}
                for c in extras.get("top_contexts") or [] if isinstance(c, dict) and isinstance(c.get("text"), str)]
    decoder_norm = service.decoder_norms[feature_id] if service.decoder_norms else None
    return {"id": feature_id, "explanation": explanation(service, feature_id),
            "hookpoint": service.engine.hookpoint, "decoder_norm": decoder_norm,
            "stats": extras, "scores": extras.get("scores"), "top_images": images,
            "max_activation_over": over, "contexts": contexts,
            "proposal": await proposal(service, entry, decoder_norm)}


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
    prefix = template_prefix(service)
    data = []
    for e, s in hits:
        contexts = [c["text"] for c in (e.extras.get("top_contexts") or [])[:3] if isinstance(c, dict) and "text" in c]
        data.append({"id": e.feature, "explanation": e.explanation or None, "score": s, "contexts": contexts,
                     "template_chars": [template_chars(c, prefix) for c in contexts]})
    return {"object": "list", "query": q, "data": data}
