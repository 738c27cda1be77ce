"""Prometheus metrics of a serving engine (text format at GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from semipd_engine.control.slo_partitioner import Decision
from semipd_engine.core.messages import KVTransferred, ShareSwitched, WorkersRestarted

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


class EngineMetrics:
    """An engine's observer (EngineClient.subscribe): its iterations and events as Prometheus series.
    `pool_label(worker)` names the KV pool a worker's gauges belong to (semi-PD's two workers share one)."""

    def __init__(self, pool_label: Callable[[str], str] = lambda worker: worker) -> None:
        r = self.registry = CollectorRegistry()
        self.kv_blocks_total = Gauge("kv_blocks_total", "KV blocks in the pool", ["instance"], registry=r)
        self.kv_blocks_used = Gauge("kv_blocks_used", "KV blocks allocated", ["instance"], registry=r)
        self.requests_running = Gauge("requests_running", "Requests with KV in the pool", ["instance"], registry=r)
        self.requests_waiting = Gauge("requests_waiting", "Requests queued for prefill", ["instance"], registry=r)
        self.requests_in_flight = Gauge("requests_in_flight", "Requests the server is answering", registry=r)
        self.preemptions = Counter("preemptions", "Requests preempted by recompute", registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Generated tokens", registry=r)
        self.request_success = Counter("request_success", "Finished requests", ["finish_reason"], registry=r)
        self.iteration_time = Histogram("iteration_time_seconds", "Engine iteration time by phase",
                                        ["phase", "instance"], buckets=LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Counter("iteration_tokens", "Tokens computed by phase", ["phase"], registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Server-side TTFT", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("e2e_request_latency_seconds", "Server-side end-to-end latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("time_per_output_token_seconds", "Server-side TPOT", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.kv_transfer_bytes = Counter("kv_transfer_bytes", "KV cache bytes copied between instances",
                                         registry=r)
        self.kv_transfer_cached_blocks = Counter(
            "kv_transfer_cached_blocks", "KV blocks a transfer did not copy: the receiving instance had them cached",
            registry=r)
        self.kv_transfer_time = Histogram("kv_transfer_seconds", "Time to copy one request's KV blocks",
                                          buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0),
                                          registry=r)
        self.kv_blocks_peak = Gauge("kv_blocks_used_peak", "Most KV blocks allocated at once", ["instance"],
                                    registry=r)
        self.worker_restarts = Counter("worker_restarts", "Times the engine replaced its workers after one died",
                                       registry=r)
        self.worker_restart_time = Histogram("worker_restart_seconds", "From a worker's death to its replacements "
                                             "being ready", buckets=(0.5, 1, 2, 3, 5, 10, 20, 60), registry=r)
        # vLLM's names: tokens looked up in the prefix cache at admission, and tokens found there
        self.prefix_cache_queries = Counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                            registry=r)
        self.prefix_cache_hits = Counter("prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.kv_blocks_cached = Gauge("kv_blocks_cached", "KV blocks holding a cached prefix", ["instance"],
                                      registry=r)
        self._prefix_seen: dict[str, tuple[int, int]] = {}
        self._preempt_seen: dict[str, int] = {}
        self._peaks: dict[str, int] = {}
        self.pool_label = pool_label

    def add_partition_metrics(self) -> None:
        r = self.registry
        self.partition_prefill_share = Gauge("partition_prefill_share", "Prefill compute share (%)", registry=r)
        self.partition_decode_share = Gauge("partition_decode_share", "Decode compute share (%)", registry=r)
        self.partition_switches = Counter("partition_switches", "Applied share switches", ["phase"], registry=r)
        self.partition_switch_stall = Histogram(
            "partition_switch_stall_seconds", "Time a worker stopped computing to apply a switch", ["phase"],
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0), registry=r)
        self.partition_switch_delay = Histogram(
            "partition_switch_delay_seconds", "From the switch request to its application (iteration boundary)",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r)

    def add_controller_metrics(self) -> None:
        r = self.registry
        self.partition_decisions = Counter("partition_decisions", "SLO-aware partitioner decisions", ["reason"],
                                           registry=r)
        self.controller_observed = Gauge("partition_controller_observed_seconds",
                                         "Percentile latency observed in the last window", ["metric"], registry=r)
        self.controller_coef = Gauge("partition_controller_coefficient", "Fitted latency-model coefficients",
                                     ["name"], registry=r)

    def observe_event(self, event) -> None:
        """A typed engine event: a worker's share switch or KV transfer, or a partitioner decision."""
        if isinstance(event, Decision):
            info = event.row()
            self.partition_decisions.labels(info["reason"]).inc()
            for m in ("observed_ttft_s", "observed_tpot_s"):
                if info[m] == info[m]:  # not NaN
                    self.controller_observed.labels(m.replace("observed_", "")).set(info[m])
            for name in ("a1", "b1", "a2", "b2", "l_100"):
                if info.get(name) is not None:
                    self.controller_coef.labels(name).set(info[name])
        elif isinstance(event, ShareSwitched):
            gauge = self.partition_prefill_share if event.phase == "prefill" else self.partition_decode_share
            gauge.set(event.share)
            self.partition_switches.labels(event.worker).inc()
            self.partition_switch_stall.labels(event.worker).observe(event.stall_s)
            self.partition_switch_delay.labels(event.worker).observe(event.delay_s)
        elif isinstance(event, KVTransferred):
            self.kv_transfer_bytes.inc(event.nbytes)
            self.kv_transfer_cached_blocks.inc(event.cached_blocks)
            self.kv_transfer_time.observe(event.seconds)
        elif isinstance(event, WorkersRestarted):
            self.worker_restarts.inc()
            self.worker_restart_time.observe(event.seconds)
            self.engine_ready(event.worker_info)  # new workers, empty pools and queues

    def engine_ready(self, worker_info: dict[str, dict]) -> None:
        self._preempt_seen.clear()  # new worker processes count from zero
        self._prefix_seen.clear()
        for worker, info in worker_info.items():
            self.kv_blocks_total.labels(self.pool_label(worker)).set(info["kv_blocks_total"])
            self.kv_blocks_used.labels(self.pool_label(worker)).set(0)
            self.requests_running.labels(worker).set(0)
            self.requests_waiting.labels(worker).set(0)

    def observe_iteration(self, worker: str, s) -> None:
        if s.phase != "idle":
            self.iteration_time.labels(s.phase, worker).observe(s.duration_s)
        if s.num_prefill_tokens:
            self.iteration_tokens.labels("prefill").inc(s.num_prefill_tokens)
        if s.num_decode_tokens:
            self.iteration_tokens.labels("decode").inc(s.num_decode_tokens)
        self.kv_blocks_total.labels(self.pool_label(worker)).set(s.kv_blocks_total)
        self.kv_blocks_used.labels(self.pool_label(worker)).set(s.kv_blocks_used)
        pool = self.pool_label(worker)
        self._peaks[pool] = max(self._peaks.get(pool, 0), s.kv_blocks_used)
        self.kv_blocks_peak.labels(pool).set(self._peaks[pool])
        self.requests_running.labels(worker).set(s.num_running)
        self.requests_waiting.labels(worker).set(s.num_waiting)
        new = s.preemptions_total - self._preempt_seen.get(worker, 0)
        if new > 0:
            self.preemptions.inc(new)
        self._preempt_seen[worker] = s.preemptions_total
        self.kv_blocks_cached.labels(pool).set(s.kv_blocks_cached)
        q0, h0 = self._prefix_seen.get(worker, (0, 0))
        if s.prefix_cache_queries_total > q0:
            self.prefix_cache_queries.inc(s.prefix_cache_queries_total - q0)
        if s.prefix_cache_hits_total > h0:
            self.prefix_cache_hits.inc(s.prefix_cache_hits_total - h0)
        self._prefix_seen[worker] = (s.prefix_cache_queries_total, s.prefix_cache_hits_total)

    def observe_request(self, arrival: float, first_token, finished: float, prompt_tokens: int,
                        output_tokens: int, finish_reason: str) -> None:
        self.request_success.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if output_tokens > 1:
                self.tpot.observe((finished - first_token) / (output_tokens - 1))
        self.e2e.observe(finished - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
