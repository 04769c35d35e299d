"""Prometheus metrics of one server (their own registry, so several servers can live in one process), or of
every replica of one endpoint (prometheus-client's multiprocess mode: each replica writes its values to files
in one directory, and a scrape of any replica reads them all)."""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

from ..generation import Generation

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when first imported
# A gauge of the endpoint is the sum over the replicas alive now (a replica that died stops counting).
LIVE_SUM = "livesum"
# The files of a gauge that counts only live processes, one per process: gauge_livesum_<pid>.db
LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db$")

# Latency buckets from a tiny CPU model (sub-millisecond TPOT) to a long prompt's prefill on a large one.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms under the `tokensieve_` prefix; `render()` is the /metrics body.

    `multiprocess=True` (a replica): the values live in the files of `$PROMETHEUS_MULTIPROC_DIR`, which must
    be set before prometheus-client is imported, and `render()` adds up every replica's (counters and
    histograms over every replica that ever ran, gauges over the live ones)."""

    def __init__(self, multiprocess: bool = False) -> None:
        if multiprocess and values.ValueClass is values.MutexValue:
            raise RuntimeError(f"multiprocess metrics need ${MULTIPROC_DIR} set before prometheus_client is imported")
        self.multiprocess = multiprocess
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
        live = dict(registry=r, multiprocess_mode=LIVE_SUM)  # the mode matters in multiprocess mode only
        self.running = Gauge("tokensieve_requests_running", "Requests generating now", **live)
        self.waiting = Gauge("tokensieve_requests_waiting", "Requests queued for the engine", **live)
        self.kv_bytes = Gauge(
            "tokensieve_kv_bytes", "KV bytes held by retained sessions, by location", ["location"], **live
        )
        self.retained = Gauge("tokensieve_sessions_retained", "Sessions kept for prefix reuse", **live)
        self.reuse = Counter(
            "tokensieve_prefix_reuse", "Requests by prefix reuse outcome (hit or miss)", ["outcome"], registry=r
        )
        self.parked = Counter(
            "tokensieve_sessions_parked", "Retained sessions whose KV moved to host memory (device cap)", registry=r
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
        if not self.multiprocess:
            return generate_latest(self.registry)
        _forget_dead_processes(os.environ[MULTIPROC_DIR])
        endpoint = CollectorRegistry()
        multiprocess.MultiProcessCollector(endpoint)
        return generate_latest(endpoint)


def _forget_dead_processes(directory: str) -> None:
    """Drop the live-gauge files of processes that are gone (a replica that crashed, or was replaced): what
    a process manager's exit hook would do, done at scrape time since uvicorn's supervisor has no such hook."""
    for path in glob.glob(os.path.join(directory, "gauge_live*.db")):
        found = LIVE_GAUGE_FILE.search(os.path.basename(path))
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # it exists, under another user
            pass
