"""Prometheus metrics, named after vLLM's conventions under the ``lmm_steer:`` prefix, each with a
``model_name`` label. One registry per server so tests can run several in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "lmm_steer:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class Metrics:
    def __init__(self, model_name: str, service=None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]
        r = self.registry
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
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to first token", label,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "End-to-end request latency", label,
                             buckets=LATENCY_BUCKETS, registry=r)
        if service is not None:
            self.running.labels(model_name).set_function(lambda: service.running)
            self.waiting.labels(model_name).set_function(lambda: service.waiting)

    def on_finish(self, result) -> None:
        m = self.model_name
        self.success.labels(m, result.finish_reason).inc()
        self.prompt_tokens.labels(m).inc(result.prompt_tokens)
        self.generation_tokens.labels(m).inc(len(result.token_ids))
        if "ttft_s" in result.timings:
            self.ttft.labels(m).observe(result.timings["ttft_s"])
            self.e2e.labels(m).observe(result.timings["total_s"])

    def on_abort(self) -> None:
        self.aborted.labels(self.model_name).inc()

    def on_error(self, kind: str) -> None:
        self.errors.labels(self.model_name, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
