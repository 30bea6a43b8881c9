"""The generation engine: requests in, token events out, one worker thread running the model.

This engine serves one request at a time in arrival order (the stack issue allows it); continuous
batching replaces ``_run_one`` with a scheduler step. The request lifecycle is plain data
(``RequestStatus``) so it can be printed and tested, as in vLLM's v1 engine.
"""

from __future__ import annotations

import enum
import functools
import inspect
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from services.common.errors import ResourceExhausted, Unavailable
from services.generation.engine.sampling import SamplingConfig, sample_next_token
from services.generation.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from services.generation.loading import LoadedModel


class RequestStatus(enum.Enum):
    WAITING = "waiting"
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


@dataclass(frozen=True)
class Finished:
    status: RequestStatus
    prompt_tokens: int
    generated_tokens: int
    stop_sequence: str = ""
    error: str = ""


StreamEvent = TokenChunk | Finished


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    config: SamplingConfig
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    _events: queue.Queue[StreamEvent] = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Safe from any thread; the engine stops this request before its next decode step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self) -> Iterator[StreamEvent]:
        """Blocks for each event; ends after the ``Finished`` event."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return


class SerialEngine:
    def __init__(self, loaded: LoadedModel, max_waiting: int = 64) -> None:
        self.loaded = loaded
        self.max_waiting = max_waiting
        self._waiting: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._accepting = True
        self._lock = threading.Lock()
        self.running: GenerationRequest | None = None
        self._worker = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        with self._lock:
            if not self._accepting:
                raise Unavailable("the generation service is shutting down; retry on another replica")
            if self._waiting.qsize() >= self.max_waiting:
                raise ResourceExhausted(
                    f"{self._waiting.qsize()} requests are already waiting (--max-waiting {self.max_waiting});"
                    " retry later"
                )
            self._waiting.put(request)
        return request

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stops admission, lets queued and running requests finish for ``grace`` s, then cancels them."""
        with self._lock:
            self._accepting = False
            self._waiting.put(None)
        self._worker.join(grace)
        if self._worker.is_alive():
            self._cancel_everything()
            self._worker.join(5.0)

    def _cancel_everything(self) -> None:
        if self.running is not None:
            self.running.cancel()
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.cancel()
                self._waiting.put(request)  # the worker finishes it as cancelled
            else:
                self._waiting.put(None)
                return

    def _loop(self) -> None:
        while True:
            request = self._waiting.get()
            if request is None:
                return
            self.running = request
            try:
                self._run_one(request)
            except Exception as error:  # one failing request fails alone; the engine goes on
                logger.opt(exception=error).error("request {} failed", request.request_id)
                self._finish(request, RequestStatus.FINISHED_ERROR, error=f"{type(error).__name__}: {error}")
            finally:
                self.running = None

    @torch.inference_mode()
    def _run_one(self, request: GenerationRequest) -> None:
        if request.cancelled:
            self._finish(request, RequestStatus.FINISHED_CANCELLED)
            return
        request.status = RequestStatus.RUNNING
        model, device, config = self.loaded.model, self.loaded.device, request.config
        eos = self.loaded.eos_token_ids
        generator = torch.Generator(device="cpu").manual_seed(
            config.seed if config.seed is not None else random.getrandbits(63)
        )
        detokenizer = IncrementalDetokenizer(self.loaded.tokenizer)
        stops = StopSequenceMatcher(config.stop)
        seen = torch.tensor(request.prompt_ids, dtype=torch.long)

        # prefill: the whole prompt in one forward pass, filling the KV cache
        logits, cache = forward(model, seen[None].to(device), cache=None)
        # decode: one token per step, reusing the cache
        while True:
            if request.cancelled:
                self._finish(request, RequestStatus.FINISHED_CANCELLED, flush=stops)
                return
            token = sample_next_token(logits.cpu(), config, seen, generator if not config.greedy else None)
            if request.first_token_at is None:
                request.first_token_at = time.monotonic()
            if token in eos:
                self._finish(request, RequestStatus.FINISHED_EOS, flush=stops)
                return
            request.output_ids.append(token)
            seen = torch.cat([seen, torch.tensor([token])])
            text, matched = stops.push(detokenizer.add(token))
            request._events.put(TokenChunk([token], text))
            if matched is not None:
                self._finish(request, RequestStatus.FINISHED_STOP_SEQUENCE, stop_sequence=matched)
                return
            if len(request.output_ids) >= config.max_new_tokens:
                self._finish(request, RequestStatus.FINISHED_LENGTH, flush=stops)
                return
            logits, cache = forward(model, torch.tensor([[token]], device=device), cache)

    def _finish(
        self,
        request: GenerationRequest,
        status: RequestStatus,
        flush: StopSequenceMatcher | None = None,
        stop_sequence: str = "",
        error: str = "",
    ) -> None:
        if flush is not None and status is not RequestStatus.FINISHED_CANCELLED:
            tail = flush.flush()
            if tail:
                request._events.put(TokenChunk([], tail))
        request.status = status
        request.finished_at = time.monotonic()
        request._events.put(Finished(status, len(request.prompt_ids), len(request.output_ids), stop_sequence, error))
        _log_request(request)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One model step: the last position's logits of sequence 0 and the updated KV cache."""
    output = model(input_ids=input_ids, use_cache=True, **{_cache_keyword(type(model)): cache})
    new_cache = output["cache"] if "cache" in output else output["past_key_values"]
    return output.logits[0, -1], new_cache


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); older 5.x only
    # know past_key_values. Asking the signature keeps both working.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _log_request(request: GenerationRequest) -> None:
    total = (request.finished_at or time.monotonic()) - request.arrived
    ttft = (request.first_token_at - request.arrived) if request.first_token_at else float("nan")
    decode_s = (request.finished_at or 0) - (request.first_token_at or request.arrived)
    rate = (len(request.output_ids) - 1) / decode_s if decode_s > 0 and len(request.output_ids) > 1 else 0.0
    logger.info(
        "request {} {}: prompt={} generated={} ttft={:.0f}ms total={:.2f}s {:.1f} tok/s",
        request.request_id,
        request.status.value,
        len(request.prompt_ids),
        len(request.output_ids),
        ttft * 1000,
        total,
        rate,
    )
