"""The continuous batching engine: requests join the running batch at step boundaries and leave the
moment they finish or are cancelled; nobody waits for another request to finish.

One worker thread runs the loop, one step at a time: the scheduler plans the step
(``schedule``), the runner runs it (``execute_step``, on every rank when sharded), the whole
batch is sampled at once (``sample_batch``), and the scheduler applies the tokens
(``update_from_output``) while the engine streams them. Requests talk to the engine only through
``submit`` and their own event queue.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from loguru import logger
from transformers import PreTrainedTokenizerBase

from services.common.errors import Unavailable
from services.generation.engine.prefix_cache import PrefixStats
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.runner import Runner, execute_step
from services.generation.engine.sampling import RowSampling, TokenLogprob
from services.generation.engine.scheduler import ContinuousBatchScheduler, ModelStep, SchedulerConfig, SchedulerOutput
from services.generation.engine.speculation import sample_drafted
from services.generation.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from services.generation.metrics import GenerationMetrics

StepExecutor = Callable[[ModelStep], "torch.Tensor | None"]


@dataclass
class RowState:
    """What the engine keeps per running request to sample it and turn its tokens into events."""

    sampling: RowSampling
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher


class ContinuousBatchingEngine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: frozenset[int],
        config: SchedulerConfig | None = None,
        metrics: GenerationMetrics | None = None,
        execute: StepExecutor | None = None,
    ) -> None:
        """``stop_ids`` end a row (the model's end-of-sequence tokens); ``tokenizer`` turns tokens into the
        streamed text. ``execute`` runs one ``ModelStep`` and returns its logits: by default ``runner`` in this
        process; tensor parallelism passes one that sends the step to every rank first."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config or SchedulerConfig()
        memory = runner.memory()
        self._kv_bytes_per_token = memory.kv_bytes_per_token
        self.scheduler = ContinuousBatchScheduler(
            self.config,
            stop_ids,
            memory.kv_bytes_per_token,
            free_row_drops=memory.free_row_drops,
            max_prefix_nodes=memory.max_prefix_nodes,
            max_prefix_tokens=memory.max_prefix_tokens,
        )
        self.metrics = metrics or GenerationMetrics()
        self._execute = execute or functools.partial(execute_step, runner)
        self._published = PrefixStats()
        self.metrics.prefix_cache_capacity_bytes.set(self.scheduler.prefix.capacity * self._kv_bytes_per_token)
        self._wakeup = threading.Condition()
        self._accepting = True
        self._stopping = False
        self.failure: BaseException | None = None  # set when the model side is gone for good
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
            if time.monotonic() >= deadline or not self._worker.is_alive():
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
                while not (self.scheduler.has_work or self._stopping):
                    self._wakeup.wait()
                if self._stopping and not self.scheduler.has_work:
                    return
                started = time.perf_counter()
                output = self.scheduler.schedule()
                self.metrics.queue_size.set(len(self.scheduler.waiting))
                self._publish_prefix_stats()
            for request in output.expired:
                self._finish(request, RequestStatus.FINISHED_CANCELLED)
            try:
                self._step(output)
            except Exception as error:
                if not self._recover(error):
                    return
            else:
                self._observe_cost(output.model, time.perf_counter() - started)
            self.metrics.active_sequences.set(len(self.scheduler.running))

    @torch.inference_mode()
    def _step(self, output: SchedulerOutput) -> None:
        for request in output.prefilling if output.model.prefill and output.model.prefill.prompts else []:
            self._start(request)
        live = sum(not r.status.finished for r in output.decoding)
        if live:
            self.metrics.batch_size.observe(live)
        if output.model.idle and output.model.keep is None:
            return
        logits = self._execute(output.model)
        sampled = output.sampled
        if not sampled:
            return
        positions = output.positions
        if len(positions) < logits.shape[0]:  # dead rows' logits are never read
            logits = logits[positions]
        tokens, logprobs = self._sample(sampled, output.drafts, logits)
        before = [len(r.output_ids) for r in sampled]
        finished = set(map(id, self.scheduler.update_from_output(output, tokens)))
        drafted = sum(map(len, output.drafts))
        if drafted:
            self.metrics.draft_tokens.inc(drafted)
            self.metrics.accepted_draft_tokens.inc(sum(len(chosen) - 1 for chosen in tokens))
        for request, start, chosen_logprobs in zip(sampled, before, logprobs, strict=True):
            if not request.status.finished or id(request) in finished:
                added = request.output_ids[start:]
                self._stream(request, added, chosen_logprobs[: len(added)], id(request) in finished)

    def _observe_cost(self, step: ModelStep, seconds: float) -> None:
        """A whole decode step's time (scheduling, the forward, sampling, streaming) against the positions it
        scored, for the scheduler's draft lengths; steps that prefill or store prefixes cost more than their
        positions and are left out."""
        if step.decode and step.prefill is None and not step.cache_ops:
            self.scheduler.step_cost.observe(sum(1 + len(row.draft) for row in step.decode), seconds)

    def _publish_prefix_stats(self) -> None:
        index, metrics, old = self.scheduler.prefix, self.metrics, self._published
        if not index.enabled:
            return
        now = index.stats
        metrics.prefix_cache_lookups.inc(now.lookups - old.lookups)
        metrics.prefix_cache_hits.inc(now.hits - old.hits)
        metrics.prefix_cache_reused_tokens.inc(now.reused_tokens - old.reused_tokens)
        metrics.prefix_cache_evictions.inc(now.evictions - old.evictions)
        metrics.prefix_cache_bytes.set(index.held * self._kv_bytes_per_token)
        self._published = dataclasses.replace(now)

    def _recover(self, error: Exception) -> bool:
        """A failed model call fails the requests in it, and only those; True if the engine goes on.
        An error that says the model side is gone (a dead rank) stops the engine and fails everything."""
        fatal = getattr(error, "fatal", False)
        logger.opt(exception=error).error("engine step failed{}", "; the model is gone" if fatal else "")
        message = f"{type(error).__name__}: {error}"
        with self._wakeup:
            lost = self.scheduler.drop_all()
            if fatal:
                self._accepting = False
                self.failure = error
                lost += self.scheduler.drain_waiting()
        for request in lost:
            if not request.status.finished:
                self._finish(request, RequestStatus.FINISHED_ERROR, error=message)
        self.runner.reset()
        return not fatal

    def _start(self, request: Request) -> None:
        seed = request.config.seed if request.config.seed is not None else random.getrandbits(63)
        self._rows[id(request)] = RowState(
            sampling=RowSampling(
                request.config,
                list(request.prompt_ids),
                request.output_ids,
                torch.Generator().manual_seed(seed),
                # a constrained row walks its own matcher: masked before sampling, advanced by what it accepted
                logits_mask=request.config.constraint.new_mask() if request.config.constraint is not None else None,
            ),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stops=StopSequenceMatcher(request.config.stop),
        )
        self.metrics.queue_time.observe(time.monotonic() - request.arrived)
        self.metrics.prompt_tokens.observe(len(request.prompt_ids))

    def _sample(
        self, requests: list[Request], drafts: list[tuple[int, ...]], logits: torch.Tensor
    ) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
        """The whole batch at once, each row's draft positions too; per row, the draft tokens it keeps and the
        token after them, with their logprobs. A row with NaN or inf logits fails alone, its batch-mates go on."""
        logits = logits.float().cpu()
        spans = [len(draft) + 1 for draft in drafts]
        broken = ~torch.isfinite(logits.amax(dim=-1))  # NaN or +inf anywhere in the row: one pass over it
        if broken.any():
            logits = torch.where(broken[:, None], torch.zeros_like(logits), logits)
            for request, bad in zip(requests, broken.split(spans), strict=True):
                if bool(bad.any()) and not request.status.finished:
                    self._finish(request, RequestStatus.FINISHED_ERROR, error="the model produced NaN or inf logits")
        rows = [self._rows[id(r)].sampling if id(r) in self._rows else _finished_row(r) for r in requests]
        return sample_drafted(logits, rows, drafts)

    def _stream(self, request: Request, tokens: list[int], logprobs: list[TokenLogprob | None], finished: bool) -> None:
        """Streams the tokens this step added to the request's output (``update_from_output`` recorded them) in
        one chunk, and finishes the request if the scheduler ended it or a stop sequence did (the tokens after
        the stop sequence's end leave the output)."""
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.time_to_first_token.observe(now - request.arrived)
        else:
            self.metrics.inter_token_latency.observe(now - (request.last_token_at or now))
        request.last_token_at = now
        state = self._rows[id(request)]
        texts, matched = [], None
        for streamed, token in enumerate(tokens, start=1):
            state.sampling.seen.append(token)
            text, matched = state.stops.push(state.detokenizer.add(token))
            texts.append(text)
            if matched is not None:
                del request.output_ids[len(request.output_ids) - (len(tokens) - streamed) :]
                tokens, logprobs = tokens[:streamed], logprobs[:streamed]
                break
        if tokens:
            request.emit(TokenChunk(list(tokens), "".join(texts), [lp for lp in logprobs if lp is not None]))
        if matched is not None:
            self._finish(request, RequestStatus.FINISHED_STOP_SEQUENCE, stop_sequence=matched)
        elif request.status is RequestStatus.FINISHED_EOS:
            self._finish(request, RequestStatus.FINISHED_EOS)
        elif finished:
            self._finish(request, request.status)

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
            Finished(
                status,
                len(request.prompt_ids),
                len(request.output_ids),
                stop_sequence,
                error,
                queue_ms,
                ttft_ms,
                request.drafted_tokens,
                request.accepted_draft_tokens,
            )
        )
        self.metrics.requests.labels(status.value).inc()
        self.metrics.request_duration.observe(now - request.arrived)
        self.metrics.generated_tokens.observe(len(request.output_ids))
        _log_request(request, queue_ms, ttft_ms)


def _finished_row(request: Request) -> RowSampling:
    """A placeholder for a row whose request already ended this step: its token is discarded."""
    return RowSampling(request.config, [], [], torch.Generator())


def _log_request(request: Request, queue_ms: float, ttft_ms: float) -> None:
    total = (request.finished_at or time.monotonic()) - request.arrived
    decode_s = (request.last_token_at or 0) - (request.first_token_at or 0)
    generated = len(request.output_ids)
    rate = (generated - 1) / decode_s if decode_s > 0 and generated > 1 else 0.0
    drafts = f" drafts={request.accepted_draft_tokens}/{request.drafted_tokens}" if request.drafted_tokens else ""
    logger.info(
        "request {} {}: prompt={} generated={} queue={:.0f}ms ttft={:.0f}ms total={:.2f}s {:.1f} tok/s{}",
        request.request_id,
        request.status.value,
        len(request.prompt_ids),
        generated,
        queue_ms,
        ttft_ms,
        total,
        rate,
        drafts,
    )
