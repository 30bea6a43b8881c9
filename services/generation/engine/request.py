"""A generation request as plain data: its lifecycle status, its output so far, its stream of events."""

from __future__ import annotations

import enum
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.generation.engine.sampling import SamplingConfig, TokenLogprob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED_LENGTH = "length"
    FINISHED_EOS = "eos"
    FINISHED_STOP_SEQUENCE = "stop_sequence"
    FINISHED_CANCELLED = "cancelled"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(frozen=True)
class TokenChunk:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    status: RequestStatus
    prompt_tokens: int
    generated_tokens: int
    stop_sequence: str = ""
    error: str = ""
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0


StreamEvent = TokenChunk | Finished


@dataclass
class Request:
    prompt_ids: list[int]
    config: SamplingConfig
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache supplied (set at admission)
    speculation: Any = None  # speculation.DraftState while the row drafts from its prompt (set at admission)
    drafted_tokens: int = 0  # draft tokens scored for this request ...
    accepted_draft_tokens: int = 0  # ... and those the sampler kept
    arrived: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    _events: queue.Queue[StreamEvent] = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _listener: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def budget_tokens(self) -> int:
        """The most KV-cache slots this request can ever hold."""
        return len(self.prompt_ids) + self.config.max_new_tokens

    def cancel(self) -> None:
        """Safe from any thread; the engine drops the request before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now >= self.deadline)

    def attach(self, listener: Callable[[], None]) -> None:
        """``listener`` is called (on the engine's thread) after each event is queued, so that a consumer
        that cannot block on ``events()`` (an asyncio stream) knows when to ``drain()``. It runs inside the
        engine's step, so it must be quick and must not raise."""
        self._listener = listener

    def emit(self, event: StreamEvent) -> None:
        self._events.put(event)
        listener = self._listener
        if listener is not None:
            listener()

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocks for each event; ends after the ``Finished`` event."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if isinstance(event, Finished):
                return

    def drain(self) -> list[StreamEvent]:
        """Every event already waiting, without blocking (to send a lagging client one message)."""
        events: list[StreamEvent] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events
