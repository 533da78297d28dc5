"""Prometheus metrics of the main process (``--enable-metrics``), with upstream's names."""

from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
_SCHEDULER_GAUGES = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "token_usage": "The fraction of the KV pool in use.",
    "gen_throughput": "The generation throughput (token/s).",
    "max_total_num_tokens": "The size of the KV pool in tokens.",
}


class TokenizerMetricsCollector:
    """Request counters and latency histograms, plus scheduler gauges refreshed on scrape.

    Each collector owns its registry, so several engines in one process never collide.
    """

    def __init__(self, labels: dict[str, str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.labels = labels
        names = list(labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"sglang:{name}", doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str) -> Any:
            return Histogram(f"sglang:{name}", doc, names, buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(**labels)

        self.prompt_tokens_total = counter("prompt_tokens", "Number of prefill tokens.")
        self.generation_tokens_total = counter("generation_tokens", "Number of generated tokens.")
        self.cached_tokens_total = counter("cached_tokens", "Number of prefix-cache hit tokens.")
        self.num_requests_total = counter("num_requests", "Number of finished requests.")
        self.num_aborted_requests_total = counter("num_aborted_requests",
                                                  "Number of aborted requests.")
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Time to first token in seconds.")
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between output chunks, per token, in seconds.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "End-to-end request latency in seconds.")
        self.scheduler_gauges = {
            name: Gauge(f"sglang:{name}", doc, names, registry=self.registry).labels(**labels)
            for name, doc in _SCHEDULER_GAUGES.items()
        }

    def observe_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)

    def observe_inter_token(self, interval_s: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.inter_token_latency.observe(interval_s / num_tokens)

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                         e2e_latency_s: float, aborted: bool) -> None:
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(completion_tokens)
        self.cached_tokens_total.inc(cached_tokens)
        self.num_requests_total.inc()
        if aborted:
            self.num_aborted_requests_total.inc()
        self.e2e_request_latency.observe(e2e_latency_s)

    def update_scheduler_state(self, state: dict) -> None:
        total = state.get("max_total_num_tokens") or 0
        free = state.get("available_kv_tokens", 0) + state.get("evictable_kv_tokens", 0)
        values = {
            "num_running_reqs": state.get("num_running_reqs", 0),
            "num_queue_reqs": state.get("num_waiting_reqs", 0),
            "token_usage": (1.0 - free / total) if total else 0.0,
            "gen_throughput": state.get("last_gen_throughput", 0.0),
            "max_total_num_tokens": total,
        }
        for name, value in values.items():
            self.scheduler_gauges[name].set(value)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
