"""Which requests run: admission control and the choice of who joins the batch, each step.

The scheduler knows nothing of models. ``add`` admits or refuses a request (backpressure), ``schedule``
decides what happens this step and returns it as plain data, ``finish`` hands a request's slot back.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted
from services.generation.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences decoding together
    max_batch_total_tokens: int = 32768  # KV-cache slots (prompt + max_new_tokens) of all running sequences
    max_concurrent_requests: int = 128  # running + waiting; beyond it requests are refused
    max_prefill_tokens: int = 2048  # prompt tokens admitted in one group (and prefilled per step)


@dataclass
class SchedulerOutput:
    admitted: list[Request] = field(default_factory=list)  # start prefilling now, as one group
    expired: list[Request] = field(default_factory=list)  # cancelled or past their deadline while waiting


class ContinuousBatchScheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # prefilling or decoding: they hold batch slots and tokens

    @property
    def tokens_in_use(self) -> int:
        return sum(r.budget_tokens for r in self.running)

    def add(self, request: Request) -> None:
        """Queues the request, or raises ResourceExhausted naming the limit it would break."""
        config = self.config
        in_flight = len(self.running) + len(self.waiting)
        if in_flight >= config.max_concurrent_requests:
            raise ResourceExhausted(
                f"{in_flight} requests are in flight, the limit (--max-concurrent-requests) is"
                f" {config.max_concurrent_requests}: retry later"
            )
        if request.budget_tokens > config.max_batch_total_tokens:
            raise ResourceExhausted(
                f"this request needs {request.budget_tokens} tokens of KV cache (prompt + max_new_tokens), more"
                f" than the whole batch may hold (--max-batch-total-tokens {config.max_batch_total_tokens}):"
                " lower max_new_tokens or shorten the prompt"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self, can_admit: bool) -> SchedulerOutput:
        """Drops expired waiting requests; if ``can_admit`` (no group is prefilling), admits the longest
        first-come run of waiting requests that fits the batch size, the token budget and the prefill cap."""
        output = SchedulerOutput()
        now = time.monotonic()
        still_waiting: deque[Request] = deque()
        for request in self.waiting:
            (output.expired if request.expired(now) else still_waiting).append(request)
        self.waiting = still_waiting
        if not can_admit:
            return output
        tokens, prefill = self.tokens_in_use, 0
        while self.waiting:
            request = self.waiting[0]
            fits = (
                len(self.running) < self.config.max_batch_size
                and tokens + request.budget_tokens <= self.config.max_batch_total_tokens
                and (not output.admitted or prefill + len(request.prompt_ids) <= self.config.max_prefill_tokens)
            )
            if not fits:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.PREFILLING
            request.scheduled_at = now
            self.running.append(request)
            output.admitted.append(request)
            tokens += request.budget_tokens
            prefill += len(request.prompt_ids)
        return output

    def finish(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)

    def drain_waiting(self) -> list[Request]:
        waiting, self.waiting = list(self.waiting), deque()
        return waiting
