"""``lmm-steer serve``: load the model and SAE, start the engine thread, serve HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from sae_weights.default import DEFAULT_CATALOG, DEFAULT_HOOKPOINT, DEFAULT_MODEL, DEFAULT_SAE

from .engine.factory import add_decode_arguments, add_device_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local path or builtin: name (default {DEFAULT_MODEL})")
    p.add_argument("--sae", default=None, help="SAE source, or 'none' (default: the shipped SAE with the default model)")
    p.add_argument("--hookpoint", help="model.layers.<i> (default: the SAE's own)")
    p.add_argument("--revision", help="SAE revision on the hub")
    p.add_argument("--catalog", action="append", default=[], metavar="PATH",
                   help="feature explanations (paper JSON or JSONL); repeatable, later files add to earlier ones")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file with one API key per line; then every route but /health needs one")
    p.add_argument("--served-model-name", help="name in /v1/models and responses (default: --model)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-clamps", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--max-body-bytes", type=int, default=32 * 2**20)
    p.add_argument("--max-image-bytes", type=int, default=10 * 2**20)
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    add_device_arguments(p)
    add_decode_arguments(p)
    p.add_argument("--metrics-top-features", type=int, default=50,
                   help="features with their own label in lmm_steer:feature_clamps_total; the rest are 'other'")
    p.add_argument("--clamp-effect-every", type=int, default=16, metavar="N",
                   help="every N-th decode step with edited features measures their activation before and after "
                        "the edit for lmm_steer:clamp_effect_activation (one more SAE encode that step); 0: never")
    p.add_argument("--log-level", default="info")


def build_app(args):
    from sae_weights import FeatureCatalog

    from .api.app import ServerSettings, create_app
    from .api.images import ImageLimits
    from .engine import EngineConfig
    from .engine.factory import build_engine
    from .metrics import Metrics
    from .service import SteeringService

    sae, catalogs, hookpoint = args.sae, list(args.catalog), args.hookpoint
    if sae is None:
        sae = str(DEFAULT_SAE) if args.model == DEFAULT_MODEL else "none"
        if args.model == DEFAULT_MODEL:
            catalogs = catalogs or [str(DEFAULT_CATALOG)]
            hookpoint = hookpoint or DEFAULT_HOOKPOINT
    engine = build_engine(
        args.model, sae, hookpoint=hookpoint, revision=args.revision, dtype=args.dtype, device=args.device,
        config=EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len, kv_cache_bytes=args.kv_cache_bytes,
                            max_clamps=args.max_clamps, cuda_graphs=not args.no_cuda_graphs, compile=args.compile,
                            clamp_effect_every=args.clamp_effect_every),
    )
    catalog = FeatureCatalog()
    for path in catalogs:
        catalog.merge(FeatureCatalog.load(path))
    keys = []
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys = [line.strip() for line in f if line.strip()]
        if not keys:
            raise SystemExit(f"lmm-steer: error: --api-key-file {args.api_key_file} holds no keys")
    name = args.served_model_name or args.model
    service = SteeringService(engine, catalog=catalog, max_queue=args.max_queue, model_name=name)
    metrics = Metrics(name, service, top_features=args.metrics_top_features)
    service.metrics = metrics
    settings = ServerSettings(
        api_keys=keys, max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
        images=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                           max_images=args.max_images, allow_urls=args.allow_image_urls),
    )
    return create_app(service, settings, metrics), service


def main(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, service = build_app(args)
    service.start()
    _warm_up(service)
    print(f"lmm-steer: serving {service.model_name} on http://{args.host}:{args.port} "
          f"(SAE: {'none' if service.engine.sae is None else service.engine.hookpoint})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        service.stop()
    return 0


def _warm_up(service) -> None:
    """One short generation so the first caller does not pay for lazy initialisation."""
    from .engine import GenerationRequest, SamplingParams

    req = GenerationRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            sampling=SamplingParams(max_tokens=2, ignore_eos=True))
    service.call_sync(lambda engine: engine.generate([req]))
