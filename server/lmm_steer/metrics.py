"""Prometheus metrics, named after vLLM's conventions under the ``lmm_steer:`` prefix, each with a
``model_name`` label. One registry per server so tests can run several in one process."""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

PREFIX = "lmm_steer:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CLAMP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
EFFECT_ERROR_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)
_EFFECT_KINDS = ("before", "after", "target")


class Metrics:
    def __init__(self, model_name: str, service=None, top_features: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]
        r = self.registry

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"{PREFIX}{name}", doc, label, buckets=buckets, registry=r)

        self.running = Gauge(f"{PREFIX}num_requests_running", "Requests in the running batch", label, registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting for a batch row", label, registry=r)
        self.success = Counter(f"{PREFIX}request_success", "Finished requests by finish reason",
                               [*label, "finished_reason"], registry=r)
        self.aborted = Counter(f"{PREFIX}requests_aborted", "Requests dropped because the client went away",
                               label, registry=r)
        self.errors = Counter(f"{PREFIX}request_errors", "Requests refused or failed, by error type",
                              [*label, "type"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed", label, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated", label, registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency")
        self.itl = histogram("inter_token_latency_seconds", "Time between streamed tokens")
        self.queue = histogram("request_queue_time_seconds", "Time waiting for a batch row")
        self.prefill = histogram("request_prefill_time_seconds", "Prefill time")
        self.decode = histogram("request_decode_time_seconds", "Decode time")
        self.prompt_hist = histogram("request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.gen_hist = histogram("request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS)
        self.steered = Counter(f"{PREFIX}steered_requests", "Finished requests that edited SAE features", label,
                               registry=r)
        self.unsteered = Counter(f"{PREFIX}unsteered_requests", "Finished requests without feature edits", label,
                                 registry=r)
        self.clamps = histogram("clamps_per_request", "Feature edits per request", CLAMP_BUCKETS)
        # one label per preset loaded at start, so the cardinality is the operator's choice
        self.preset_requests = Counter(f"{PREFIX}preset_requests", "Chat requests admitted with a steering preset",
                                       [*label, "preset"], registry=r)
        # per-feature usage with bounded cardinality: the top-N most used features get their own label,
        # the rest are summed as "other" (the ranking is recomputed at every scrape)
        self.top_features = top_features
        self.feature_counts: collections.Counter = collections.Counter()
        r.register(_FeatureUsage(self))
        # measured activations of edited features on generated tokens: feature -> measurements, and
        # feature -> sums of the activation before, after and aimed at (_EFFECT_KINDS order)
        self.effect_counts: collections.Counter = collections.Counter()
        self.effect_sums: dict[int, list[float]] = {}
        r.register(_ClampEffect(self))
        self.effect_error = histogram("clamp_effect_abs_error",
                                      "|after - target| of edited features' SAE activations on generated tokens",
                                      EFFECT_ERROR_BUCKETS)
        self.kv_usage = Gauge(f"{PREFIX}kv_cache_usage_perc", "Share of KV cache positions in use", label,
                              registry=r)
        self.device_memory = Gauge(f"{PREFIX}device_memory_bytes", "Device memory allocated", label, registry=r)
        self.steps = Gauge(f"{PREFIX}decode_steps", "Decode steps so far, by how they ran", [*label, "kind"],
                           registry=r)
        # series that exist from the start, so dashboards show 0 rather than no data
        for counter in (self.aborted, self.steered, self.unsteered, self.prompt_tokens, self.generation_tokens):
            counter.labels(model_name)
        if service is not None:
            engine = service.engine
            self.running.labels(model_name).set_function(lambda: service.running)
            self.waiting.labels(model_name).set_function(lambda: service.waiting)
            self.kv_usage.labels(model_name).set_function(engine.kv_usage)
            self.device_memory.labels(model_name).set_function(engine.device_memory_bytes)
            self.steps.labels(model_name, "cuda_graph").set_function(lambda: engine.stats["graph_replays"])
            self.steps.labels(model_name, "eager").set_function(lambda: engine.stats["eager_steps"])

    def on_finish(self, result) -> None:
        m = self.model_name
        self.success.labels(m, result.finish_reason).inc()
        self.prompt_tokens.labels(m).inc(result.prompt_tokens)
        self.generation_tokens.labels(m).inc(len(result.token_ids))
        self.prompt_hist.labels(m).observe(result.prompt_tokens)
        self.gen_hist.labels(m).observe(len(result.token_ids))
        t = result.timings
        if "ttft_s" in t:
            self.ttft.labels(m).observe(t["ttft_s"])
            self.e2e.labels(m).observe(t["total_s"])
            self.queue.labels(m).observe(t["queue_s"])
            self.prefill.labels(m).observe(t["prefill_s"])
            self.decode.labels(m).observe(t["decode_s"])
        features = result.steered_features
        (self.steered if features else self.unsteered).labels(m).inc()
        self.clamps.labels(m).observe(len(features))
        self.feature_counts.update(features)

    def on_clamp_effects(self, effects) -> None:
        for e in effects:
            # sums before count: a scrape that sees the count then finds the feature's sums
            sums = self.effect_sums.setdefault(e.feature, [0.0] * len(_EFFECT_KINDS))
            for i, when in enumerate(_EFFECT_KINDS):
                sums[i] += getattr(e, when)
            self.effect_counts[e.feature] += 1
            self.effect_error.labels(self.model_name).observe(abs(e.after - e.target))

    def on_token_gap(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def on_abort(self) -> None:
        self.aborted.labels(self.model_name).inc()

    def on_error(self, kind: str) -> None:
        self.errors.labels(self.model_name, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FeatureUsage:
    """``lmm_steer:feature_clamps_total{feature}`` for the top-N features, the rest as ``other``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        family = CounterMetricFamily(f"{PREFIX}feature_clamps", "Requests editing each feature (top N, rest as other)",
                                     labels=["model_name", "feature"])
        counts = m.feature_counts.copy()  # a snapshot: the engine thread updates it during scrapes
        top = counts.most_common(m.top_features)
        for feature, count in top:
            family.add_metric([m.model_name, str(feature)], count)
        other = sum(counts.values()) - sum(c for _, c in top)
        family.add_metric([m.model_name, "other"], other)
        yield family


class _ClampEffect:
    """``lmm_steer:clamp_effect_activation{feature, when}``: a summary (sum and count) of the SAE's
    activation of each edited feature on generated tokens, ``before`` the edit, ``after`` it, and
    the ``target`` the edit aims at. Mean after close to mean target: the clamp took. The top-N
    most measured features get their own label, the rest are summed as ``other``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        family = SummaryMetricFamily(f"{PREFIX}clamp_effect_activation",
                                     "SAE activation of edited features on generated tokens (top N, rest as other)",
                                     labels=["model_name", "feature", "when"])
        # snapshots, counts first: the engine thread adds features while a scrape runs (dict copies
        # are atomic, and a feature's sums exist before its count)
        counts = m.effect_counts.copy()
        sums = m.effect_sums.copy()
        top = dict(counts.most_common(m.top_features))
        for feature, count in top.items():
            for when, total in zip(_EFFECT_KINDS, sums[feature], strict=True):
                family.add_metric([m.model_name, str(feature), when], count, total)
        rest = [f for f in counts if f not in top]
        other_count = sum(counts[f] for f in rest)
        other_sums = [sum(sums[f][i] for f in rest) for i in range(len(_EFFECT_KINDS))]
        for when, total in zip(_EFFECT_KINDS, other_sums, strict=True):
            family.add_metric([m.model_name, "other", when], other_count, total)
        yield family
