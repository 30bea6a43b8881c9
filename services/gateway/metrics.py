"""The gateway's Prometheus metrics: requests by route and status, time to first byte, tokens, open streams."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nightcap_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "nightcap_gateway_time_to_first_byte_seconds",
            "from the request to the first byte of the response body",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "nightcap_gateway_tokens", "prompt and completion tokens", ["kind"], registry=self.registry
        )
        self.open_streams = Gauge("nightcap_gateway_open_streams", "streaming responses open", registry=self.registry)

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)
