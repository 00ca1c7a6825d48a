"""``GET /v1/models``: the served model and its SAE, then one ``<model>:<preset>`` entry per preset."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServiceDep, SettingsDep
from ..openapi import error_responses
from ..schemas import ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def models(service: ServiceDep, settings: SettingsDep):
    sae = None
    if service.engine.sae is not None:
        cfg = service.engine.sae.cfg
        sae = {"hookpoint": service.engine.hookpoint, "num_latents": cfg.num_latents, "k": cfg.k,
               "activation": cfg.activation, "catalog_entries": len(service.catalog)}
    multimodal = bool(service.engine.loaded.is_multimodal)
    cards = [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "lmm-steer", "sae": sae,
              "multimodal": multimodal}]
    for name, preset in sorted(settings.presets.items()):
        cards.append({"id": f"{service.model_name}:{name}", "object": "model", "created": 0,
                      "owned_by": "lmm-steer", "sae": sae, "multimodal": multimodal, "parent": service.model_name,
                      "preset": {"name": name, "description": preset.description,
                                 "steering": preset.steering.model_dump(exclude_none=True)}})
    return {"object": "list", "data": cards}
