"""What every route reaches through FastAPI dependencies: the service, the settings and the metrics
(set on ``app.state`` by ``create_app``), and the lookups several routes share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..service import SteeringService
from .errors import APIError
from .schemas import Preset
from .settings import ServerSettings


def get_service(request: Request) -> SteeringService:
    return request.app.state.service


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_metrics(request: Request):
    """The server's Prometheus metrics, or None (an app built without them, as in some tests)."""
    return request.app.state.metrics


def count_error(metrics, e: APIError) -> None:
    if metrics is not None:
        metrics.on_error(e.code or str(e.status))


def explanation(service: SteeringService, feature: int) -> str | None:
    """The catalog's explanation of ``feature``, or None when it has none."""
    entry = service.catalog.get(feature)
    return entry.explanation if entry and entry.explanation else None


def preset_named(name: str, param: str, settings: ServerSettings) -> Preset:
    if name not in settings.presets:
        known = ", ".join(sorted(settings.presets)) or "none"
        raise APIError(404, f"preset {name!r} is not loaded here (presets: {known})", param=param,
                       code="preset_not_found")
    return settings.presets[name]


def model_preset(model: str | None, service: SteeringService, settings: ServerSettings) -> Preset | None:
    """The preset ``model`` names as ``<model>:<preset>``, if any; a 404 for a model not served."""
    if model is None or model == service.model_name:
        return None
    prefix = f"{service.model_name}:"
    if model.startswith(prefix):
        return preset_named(model[len(prefix):], "model", settings)
    raise APIError(404, f"model {model!r} is not served here (this server serves {service.model_name!r})",
                   param="model", code="model_not_found")


# Route parameters annotated with these get the app's service, settings and metrics (FastAPI's
# Annotated dependencies).
ServiceDep = Annotated[SteeringService, Depends(get_service)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[object, Depends(get_metrics)]
