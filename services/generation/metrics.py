"""Prometheus metrics of the generation service (prometheus-client), all named nightcap_generation_*."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class GenerationMetrics:
    """One set of metrics in its own registry, so several engines can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        name, registry = "nightcap_generation_", self.registry
        self.requests = Counter(
            f"{name}requests", "Finished requests by outcome (finish reason, rejected, error)", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.queue_size = Gauge(f"{name}queue_size", "Requests waiting for a batch slot", registry=registry)
        self.active_sequences = Gauge(f"{name}active_sequences", "Sequences prefilling or decoding", registry=registry)
        self.batch_size = Histogram(
            f"{name}batch_size", "Sequences in each decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )  # fmt: skip
        self.queue_time = Histogram(
            f"{name}queue_time_seconds", "Wait before a request joins the batch", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            f"{name}time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{name}inter_token_latency_seconds", "Time between a request's consecutive tokens",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        # speculative decoding: the acceptance rate is accepted_draft_tokens / draft_tokens
        self.draft_tokens = Counter(
            f"{name}draft_tokens", "Tokens drafted from the rows' prompts and scored", registry=registry
        )
        self.accepted_draft_tokens = Counter(
            f"{name}accepted_draft_tokens", "Drafted tokens the sampler kept", registry=registry
        )
        self.request_duration = Histogram(
            f"{name}request_duration_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.prompt_tokens = Histogram(
            f"{name}prompt_tokens", "Prompt length of each request", buckets=_TOKEN_BUCKETS, registry=registry
        )
        self.generated_tokens = Histogram(
            f"{name}generated_tokens", "Tokens generated per request", buckets=_TOKEN_BUCKETS, registry=registry
        )

        self.prefix_cache_lookups = Counter(
            f"{name}prefix_cache_lookups", "Admitted-or-tried requests looked up in the prefix cache", registry=registry
        )
        self.prefix_cache_hits = Counter(
            f"{name}prefix_cache_hits", "Lookups that found a cached prefix", registry=registry
        )
        self.prefix_cache_reused_tokens = Counter(
            f"{name}prefix_cache_reused_tokens", "Prompt tokens taken from the prefix cache instead of prefilled",
            registry=registry,
        )  # fmt: skip
        self.prefix_cache_evictions = Counter(
            f"{name}prefix_cache_evictions", "Cached prefixes dropped to make room (least recently used first)",
            registry=registry,
        )  # fmt: skip
        self.prefix_cache_bytes = Gauge(
            f"{name}prefix_cache_bytes", "Bytes of keys and values the prefix cache holds (all ranks together)",
            registry=registry,
        )  # fmt: skip
        self.prefix_cache_capacity_bytes = Gauge(
            f"{name}prefix_cache_capacity_bytes", "The most the prefix cache may hold (--prefix-cache-bytes)",
            registry=registry,
        )  # fmt: skip

        self.active_version = Gauge(
            f"{name}active_version", "1 for the name:version serving new requests, 0 for those it replaced",
            ["model"], registry=registry,
        )  # fmt: skip
        self.swap_duration = Histogram(
            f"{name}swap_duration_seconds", "Model swap: load start to the switch (plus drain when in place)",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.swaps = Counter(f"{name}swaps", "Model swaps by outcome (ok, failed)", ["outcome"], registry=registry)

    def set_active_version(self, model: str, previous: str = "") -> None:
        if previous:
            self.active_version.labels(previous).set(0)
        self.active_version.labels(model).set(1)

    def serve(self, address: str) -> int:
        """Serves /metrics over HTTP on ``address`` ("host:port", port 0: any free); returns the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return int(server.server_port)
