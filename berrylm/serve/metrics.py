"""Prometheus metrics of the server (GET /metrics, text exposition format), on a private registry.

Every engine series carries a `model` label (several models: one engine each); `berry_requests` counts HTTP
requests by endpoint and status. `Metrics.for_model(name)` gives the hooks one engine reports to (in the engine's
thread, or replayed from the engine process: serve/engine_process.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, model_name: str | None = None):
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.requests = Counter("berry_requests", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("berry_prompt_tokens", "prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("berry_generation_tokens", "tokens generated", m, registry=r)
        self.finished = Counter("berry_sequences_finished", "sequences finished, by reason", m + ["reason"],
                                registry=r)
        self.preemptions = Gauge("berry_preemptions", "sequences preempted for KV memory so far", m, registry=r)
        self.waiting = Gauge("berry_queue_depth", "sequences waiting to be scheduled", m, registry=r)
        self.running = Gauge("berry_running", "sequences in the running batch", m, registry=r)
        self.kv_usage = Gauge("berry_kv_cache_usage", "fraction of KV blocks in use", m, registry=r)
        self.prefix_hit = Gauge("berry_prefix_cache_hit_rate", "prompt tokens served from the prefix cache", m,
                                registry=r)
        self.batch = Histogram("berry_batch_size", "sequences per engine step", m, registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.ttft = Histogram("berry_time_to_first_token_seconds", "time to first token", m, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("berry_inter_token_latency_seconds", "time between tokens", m, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.info = Gauge("berry_model_info", "served model", ["model"], registry=r)
        if model_name is not None:
            self.for_model(model_name)

    def for_model(self, name: str) -> ModelMetrics:
        self.info.labels(name).set(1)
        return ModelMetrics(self, name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's engine hooks (engine thread) and their replay from the engine process."""

    def __init__(self, m: Metrics, name: str):
        self.m, self.name = m, name
        self.requests = m.requests  # the HTTP side's counter (not per model)
        lab = lambda metric: metric.labels(name)  # noqa: E731
        self.prompt_tokens, self.generation_tokens = lab(m.prompt_tokens), lab(m.generation_tokens)
        self.preemptions, self.waiting, self.running = lab(m.preemptions), lab(m.waiting), lab(m.running)
        self.kv_usage, self.prefix_hit, self.batch = lab(m.kv_usage), lab(m.prefix_hit), lab(m.batch)
        self.ttft, self.itl = lab(m.ttft), lab(m.itl)

    def finished(self, reason: str):
        return self.m.finished.labels(self.name, reason)

    def on_step(self, engine) -> None:
        self.waiting.set(engine.num_waiting())
        self.running.set(engine.num_running())
        self.kv_usage.set(engine.blocks.usage())
        self.preemptions.set(engine.scheduler.preemptions)
        if engine.blocks.queries:
            self.prefix_hit.set(engine.blocks.hits / engine.blocks.queries)
        if engine.last_batch:
            self.batch.observe(engine.last_batch)

    def on_token(self, seq, now: float) -> None:
        self.generation_tokens.inc()
        if seq.last_emit is None:
            self.ttft.observe(now - seq.arrival)
            self.prompt_tokens.inc(len(seq.prompt))
        else:
            self.itl.observe(now - seq.last_emit)

    def on_finish(self, seq) -> None:
        self.finished(seq.finish_reason).inc()

    def replay(self, events: list[tuple]) -> None:
        """Apply hook calls recorded in the engine process (serve/engine_process.py: MetricEvents)."""
        for e in events:
            if e[0] == "step":
                _, waiting, running, kv, preempted, hit, batch = e
                self.waiting.set(waiting)
                self.running.set(running)
                self.kv_usage.set(kv)
                self.preemptions.set(preempted)
                if hit is not None:
                    self.prefix_hit.set(hit)
                if batch:
                    self.batch.observe(batch)
            elif e[0] == "first":
                self.generation_tokens.inc()
                self.ttft.observe(e[1])
                self.prompt_tokens.inc(e[2])
            elif e[0] == "next":
                self.generation_tokens.inc()
                self.itl.observe(e[1])
            elif e[0] == "finish":
                self.finished(e[1]).inc()
