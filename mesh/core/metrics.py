"""Prometheus metrics of the gateway, in a registry of its own (one per gateway, so tests can
run several in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from raft.state import MeshState, session_metrics
from shards.types import Finished

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quorum_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quorum_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("quorum_completion_tokens", "Completion tokens generated",
                                         ["model"], registry=r)
        self.ttft = Histogram("quorum_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.tps = Histogram("quorum_tokens_per_second", "Decoding speed of each generation",
                             ["model"], buckets=_TPS_BUCKETS, registry=r)
        self.generations = Counter("quorum_generations", "Generations ended, by model and reason "
                                   "(stop, length, cancelled)", ["model", "reason"], registry=r)
        self.failovers = Counter("quorum_failovers", "Generations resumed on another replica after "
                                 "theirs was lost", ["model"], registry=r)
        self.queue_depth = Gauge("quorum_queue_depth", "Requests waiting for a shard", ["role", "model"],
                                 registry=r)
        self.in_flight = Gauge("quorum_requests_in_flight", "Requests being answered", registry=r)
        self.routed = Counter("quorum_routed", "Requests sent to a replica, by its role", ["role", "model"],
                              registry=r)
        self.shard_rss = Gauge("quorum_shard_rss_bytes", "Resident memory of each shard process on this node",
                               ["role", "model"], registry=r)
        self.shard_crashes = Counter("quorum_shard_crashes", "Shard processes on this node that died on "
                                     "their own (crash, OOM kill)", ["role", "model"], registry=r)

    def watch_sessions(self, state: Callable[[], MeshState]) -> None:
        """The session log's size and its evictions, read from the replicated state at each scrape."""
        self.registry.register(_SessionLog(state))

    def watch_queue(self, role: str, model: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(role, model).set_function(depth)

    def watch_shard(self, role: str, model: str, depth: Callable[[], float], rss: Callable[[], float]) -> None:
        self.watch_queue(role, model, depth)
        self.shard_rss.labels(role, model).set_function(rss)

    def unwatch_shard(self, role: str, model: str) -> None:
        for gauge in (self.queue_depth, self.shard_rss):
            try:
                gauge.remove(role, model)
            except KeyError:  # never watched (it failed before it was serving)
                pass

    def record_generation(self, model: str, finished: Finished) -> None:
        """Called on a shard's worker thread (prometheus_client is thread-safe)."""
        self.generations.labels(model, finished.reason).inc()
        self.completion_tokens.labels(model).inc(finished.completion_tokens)
        if finished.completion_tokens > 1 and finished.decode_s > 0:
            self.tps.labels(model).observe((finished.completion_tokens - 1) / finished.decode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SessionLog:
    """A collector over the replicated state: the counters are the state's own (the same on every member)."""

    COUNTERS = (("sessions_evicted", "Sessions evicted from the session log by its count or byte cap"),
                ("session_turns_evicted", "Turns evicted by the turn cap or the per-session byte budget"),
                ("session_bytes_evicted", "Estimated bytes evicted from the session log"))

    def __init__(self, state: Callable[[], MeshState]) -> None:
        self.state = state

    def collect(self):
        m = session_metrics(self.state())
        yield GaugeMetricFamily("quorum_session_log_bytes", "Estimated bytes held by the session log",
                                value=m["session_bytes"])
        yield GaugeMetricFamily("quorum_session_log_budget_bytes", "The session log's byte budget",
                                value=m["session_bytes_budget"])
        for key, doc in self.COUNTERS:
            yield CounterMetricFamily(f"quorum_{key}", doc, value=m[key])
