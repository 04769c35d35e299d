"""Prometheus metrics of one server (their own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..generation import Generation

# Latency buckets from a tiny CPU model (sub-millisecond TPOT) to a long prompt's prefill on a large one.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms under the `tokensieve_` prefix; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokensieve_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("tokensieve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tokensieve_generation_tokens", "Tokens generated", registry=r)
        self.computed_tokens = Counter(
            "tokensieve_computed_prompt_tokens", "Prompt tokens computed (not reused)", registry=r
        )
        self.ttft = Histogram("tokensieve_ttft_seconds", "Time to first token (engine)", buckets=SECONDS, registry=r)
        self.tpot = Histogram("tokensieve_tpot_seconds", "Mean time per output token", buckets=SECONDS, registry=r)
        self.latency = Histogram(
            "tokensieve_request_seconds", "Time from arrival to the last token", buckets=SECONDS, registry=r
        )
        self.running = Gauge("tokensieve_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge("tokensieve_requests_waiting", "Requests queued for the engine", registry=r)
        self.kv_bytes = Gauge(
            "tokensieve_kv_bytes", "KV bytes held by retained sessions, by location", ["location"], registry=r
        )
        self.retained = Gauge("tokensieve_sessions_retained", "Sessions kept for prefix reuse", registry=r)
        self.reuse = Counter(
            "tokensieve_prefix_reuse", "Requests by prefix reuse outcome (hit or miss)", ["outcome"], registry=r
        )
        self.evicted = Counter(
            "tokensieve_sessions_evicted", "Retained sessions dropped to stay within the memory cap", registry=r
        )
        self.cancelled = Counter(
            "tokensieve_requests_cancelled", "Generations stopped early (client gone, timeout, shutdown)", registry=r
        )

        for location in ("device", "host"):  # every labelled series shows from the start, at 0
            self.kv_bytes.labels(location)
        for outcome in ("hit", "miss"):
            self.reuse.labels(outcome)

    def finished(self, generation: Generation, seconds: float) -> None:
        stats = generation.stats
        self.prompt_tokens.inc(stats.context_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.computed_tokens.inc(stats.prompt_tokens)  # the tokens this call's prompt pass computed
        self.ttft.observe(stats.ttft_s)
        if stats.new_tokens > 1:
            self.tpot.observe(stats.tpot_s)
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
