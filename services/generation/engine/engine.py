"""The continuous batching engine: requests join the running batch at step boundaries and leave the
moment they finish or are cancelled; nobody waits for another request to finish.

One worker thread owns the model. Each step it (1) drops rows whose client went away, (2) asks the
scheduler who joins, (3) runs one decode step for the batch, (4) runs one prefill chunk for the group
that is joining and merges it in once its prompt is in. Requests talk to the engine only through
``submit`` and their own event queue.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import torch
from loguru import logger

from services.common.errors import Unavailable
from services.generation.engine.batch import KVBatch, PrefillJob, merge
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.sampling import TokenLogprob, sample_next_token
from services.generation.engine.scheduler import ContinuousBatchScheduler, SchedulerConfig
from services.generation.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from services.generation.loading import LoadedModel
from services.generation.metrics import GenerationMetrics


@dataclass
class RowState:
    """What the engine keeps per running request to turn its tokens into events."""

    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    seen: list[int]  # prompt + output, for the repetition penalty


class ContinuousBatchingEngine:
    def __init__(
        self, loaded: LoadedModel, config: SchedulerConfig | None = None, metrics: GenerationMetrics | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config or SchedulerConfig()
        self.scheduler = ContinuousBatchScheduler(self.config)
        self.metrics = metrics or GenerationMetrics()
        self._pad_id = _pad_token_id(loaded)
        self._wakeup = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._batch: KVBatch | None = None
        self._batch_requests: list[Request] = []  # row order of _batch
        self._prefill: PrefillJob | None = None
        self._prefill_requests: list[Request] = []
        self._rows: dict[int, RowState] = {}
        self._worker = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._worker.start()

    # -- the outside: submit, observe, shut down ---------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queues a validated request; raises ResourceExhausted (a limit) or Unavailable (shutting down)."""
        with self._wakeup:
            if not self._accepting:
                raise Unavailable("the generation service is shutting down; retry on another replica")
            try:
                self.scheduler.add(request)
            except Exception:
                self.metrics.requests.labels("rejected").inc()
                raise
            self.metrics.queue_size.set(len(self.scheduler.waiting))
            self._wakeup.notify()
        return request

    @property
    def active_sequences(self) -> int:
        """Sequences holding a batch slot (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new requests are refused."""
        return self._accepting

    def shutdown(self, grace: float = 10.0) -> None:
        """Stops admission, lets queued and running requests finish for ``grace`` s, then cancels the rest."""
        with self._wakeup:
            self._accepting = False
            self._wakeup.notify()
        deadline = time.monotonic() + grace
        while self.scheduler.running or self.scheduler.waiting:
            if time.monotonic() >= deadline:
                for request in [*self.scheduler.running, *self.scheduler.waiting]:
                    request.cancel()
                break
            time.sleep(0.02)
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._worker.join(10.0)

    # -- the worker ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self.scheduler.waiting or self.scheduler.running or self._stopping):
                    self._wakeup.wait()
                if self._stopping and not (self.scheduler.waiting or self.scheduler.running):
                    return
                output = self.scheduler.schedule(can_admit=self._prefill is None)
                self.metrics.queue_size.set(len(self.scheduler.waiting))
            for request in output.expired:
                self._finish(request, RequestStatus.FINISHED_CANCELLED)
            try:
                if output.admitted:
                    self._start_prefill(output.admitted)
                self._step()
            except Exception as error:  # a failed model call fails the requests in it, and only those
                logger.opt(exception=error).error("engine step failed")
                for request in [*self._batch_requests, *self._prefill_requests]:
                    if not request.status.finished:
                        self._finish(request, RequestStatus.FINISHED_ERROR, error=f"{type(error).__name__}: {error}")
                self._batch, self._batch_requests = None, []
                self._prefill, self._prefill_requests = None, []
            self.metrics.active_sequences.set(len(self.scheduler.running))

    def _start_prefill(self, requests: list[Request]) -> None:
        for request in requests:
            seed = request.config.seed if request.config.seed is not None else random.getrandbits(63)
            self._rows[id(request)] = RowState(
                generator=torch.Generator().manual_seed(seed),
                detokenizer=IncrementalDetokenizer(self.loaded.tokenizer),
                stops=StopSequenceMatcher(request.config.stop),
                seen=list(request.prompt_ids),
            )
            self.metrics.queue_time.observe(time.monotonic() - request.arrived)
            self.metrics.prompt_tokens.observe(len(request.prompt_ids))
        self._prefill = PrefillJob.of([r.prompt_ids for r in requests], self._pad_id, self.loaded.device)
        self._prefill_requests = requests

    @torch.inference_mode()
    def _step(self) -> None:
        model = self.loaded.model
        self._drop_expired_rows()
        if self._batch is not None:
            self.metrics.batch_size.observe(self._batch.rows)
            logits = self._batch.decode_step(model)
            tokens, keep = self._sample(self._batch_requests, logits)
            self._batch.next_tokens = tokens
            self._batch = self._batch.keep_rows(keep)
            self._batch_requests = [self._batch_requests[row] for row in keep]
        if self._prefill is not None:
            logits = self._prefill.step(model, self.config.max_prefill_tokens)
            if logits is not None:
                tokens, keep = self._sample(self._prefill_requests, logits)
                joining = self._prefill.into_batch(tokens).keep_rows(keep)
                if joining is not None:
                    self._batch = merge(self._batch, joining)
                    self._batch_requests += [self._prefill_requests[row] for row in keep]
                self._prefill, self._prefill_requests = None, []

    def _drop_expired_rows(self) -> None:
        """A client that went away (or whose deadline passed) stops costing compute at this step."""
        now = time.monotonic()
        for request in self._prefill_requests:
            if not request.status.finished and request.expired(now):
                self._finish(request, RequestStatus.FINISHED_CANCELLED)  # its row leaves when prefill ends
        if self._batch is None:
            return
        keep = []
        for row, request in enumerate(self._batch_requests):
            if request.expired(now):
                self._finish(request, RequestStatus.FINISHED_CANCELLED)
            else:
                keep.append(row)
        self._batch = self._batch.keep_rows(keep)
        self._batch_requests = [self._batch_requests[row] for row in keep]

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Chooses each row's next token and streams it; returns the tokens and the rows still running."""
        logits = logits.float().cpu()
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
        if all(r.config.plain_greedy for r in requests):
            choices: list[tuple[int, TokenLogprob | None]] = [(t, None) for t in logits.argmax(dim=-1).tolist()]
        else:
            choices = [
                (0, None) if request.status.finished or bad else self._choose(request, row)
                for request, row, bad in zip(requests, logits, broken, strict=True)
            ]
        keep = []
        for row, (request, (token, logprob)) in enumerate(zip(requests, choices, strict=True)):
            if request.status.finished:
                continue  # cancelled while its group was prefilling
            if broken[row]:  # this request fails alone; its batch-mates go on
                self._finish(request, RequestStatus.FINISHED_ERROR, error="the model produced NaN or inf logits")
            elif not self._accept(request, token, logprob):
                keep.append(row)
        return torch.tensor([token for token, _ in choices], device=self.loaded.device), keep

    def _choose(self, request: Request, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        state = self._rows[id(request)]
        output = torch.tensor(request.output_ids, dtype=torch.long)
        return sample_next_token(
            logits, request.config, torch.tensor(state.seen, dtype=torch.long), output, state.generator
        )

    def _accept(self, request: Request, token: int, logprob: TokenLogprob | None) -> bool:
        """Records one token; True when it finished the request."""
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            request.status = RequestStatus.RUNNING
            self.metrics.time_to_first_token.observe(now - request.arrived)
        else:
            self.metrics.inter_token_latency.observe(now - (request.last_token_at or now))
        request.last_token_at = now
        config, state = request.config, self._rows[id(request)]
        if token in config.stop_token_ids or (not config.ignore_eos and token in self.loaded.eos_token_ids):
            self._finish(request, RequestStatus.FINISHED_EOS)
            return True
        request.output_ids.append(token)
        state.seen.append(token)
        text, matched = state.stops.push(state.detokenizer.add(token))
        request.emit(TokenChunk([token], text, [logprob] if logprob is not None else []))
        if matched is not None:
            self._finish(request, RequestStatus.FINISHED_STOP_SEQUENCE, stop_sequence=matched)
            return True
        if len(request.output_ids) >= config.max_new_tokens:
            self._finish(request, RequestStatus.FINISHED_LENGTH)
            return True
        return False

    def _finish(self, request: Request, status: RequestStatus, stop_sequence: str = "", error: str = "") -> None:
        state = self._rows.pop(id(request), None)
        if state is not None and status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_EOS):
            tail = state.stops.flush()
            if tail:
                request.emit(TokenChunk([], tail))
        request.status = status
        request.finished_at = now = time.monotonic()
        queue_ms = ((request.scheduled_at or now) - request.arrived) * 1000
        ttft_ms = ((request.first_token_at - request.arrived) * 1000) if request.first_token_at else 0.0
        request.emit(
            Finished(status, len(request.prompt_ids), len(request.output_ids), stop_sequence, error, queue_ms, ttft_ms)
        )
        with self._wakeup:
            self.scheduler.finish(request)
        self.metrics.requests.labels(status.value).inc()
        self.metrics.request_duration.observe(now - request.arrived)
        self.metrics.generated_tokens.observe(len(request.output_ids))
        _log_request(request, queue_ms, ttft_ms)


def _pad_token_id(loaded: LoadedModel) -> int:
    # padding is masked out; any valid id will do when the tokenizer names none
    tokenizer = loaded.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *sorted(loaded.eos_token_ids)):
        if candidate is not None:
            return int(candidate)
    return 0


def _log_request(request: Request, queue_ms: float, ttft_ms: float) -> None:
    total = (request.finished_at or time.monotonic()) - request.arrived
    decode_s = (request.last_token_at or 0) - (request.first_token_at or 0)
    generated = len(request.output_ids)
    rate = (generated - 1) / decode_s if decode_s > 0 and generated > 1 else 0.0
    logger.info(
        "request {} {}: prompt={} generated={} queue={:.0f}ms ttft={:.0f}ms total={:.2f}s {:.1f} tok/s",
        request.request_id,
        request.status.value,
        len(request.prompt_ids),
        generated,
        queue_ms,
        ttft_ms,
        total,
        rate,
    )
