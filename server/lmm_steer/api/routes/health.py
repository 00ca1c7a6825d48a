"""``/health`` (liveness), ``/ready`` (model loaded and warm, not draining) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import MetricsDep, ServiceDep

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(service: ServiceDep):
    if service.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
    if not service.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": service.model_name}


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep):
    if metrics is None:
        return Response(b"", media_type="text/plain")
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
