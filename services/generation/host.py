"""The model host: which engine serves new requests, and swapping it for another registry version live.

A swap loads the new version beside the served one, warms it with a short generation, then switches in one
step under a lock: requests submitted after it go to the new engine, requests already running stay on the
engine they started on (a stream never mixes two versions). The old engine then drains in the background
and its weights are dropped after its last request. Anything that fails before the switch (bad sha256,
wrong architecture, out of memory, a failed warm-up) leaves the served model as it was.

``in_place`` is for models whose two copies do not fit: new requests wait while the old engine drains and
is freed and the new version loads; if that load fails, the old version is loaded again.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from loguru import logger

from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted, ServiceError, Unavailable
from services.common.registry import ModelRegistry, Promotion
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.request import Finished, Request, RequestStatus
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import LoadedModel, start_engine
from services.generation.metrics import GenerationMetrics

WARMUP_PROMPT = "Hello"
# Running streams get this long to finish on the old version before they are cancelled.
DEFAULT_DRAIN_SECONDS = 600.0


def model_label(loaded: LoadedModel) -> str:
    """name:version, or name alone when the model was not served from the registry."""
    return f"{loaded.name}:{loaded.version}" if loaded.version else loaded.name


@dataclass
class ServedModel:
    loaded: LoadedModel
    engine: ContinuousBatchingEngine
    since: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return model_label(self.loaded)


@dataclass(frozen=True)
class SwapProgress:
    stage: str  # verifying, loading, warming, switched, draining, done
    message: str
    fraction: float
    model: str = ""
    previous: str = ""
    swap_seconds: float = 0.0


_DONE = object()


class SwapJob:
    """One load in progress: its progress events, then its end (an error or done)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._events: queue.Queue = queue.Queue()
        self.error: ServiceError | None = None

    def emit(self, progress: SwapProgress) -> None:
        logger.info("swap to {}: {} ({})", self.model, progress.stage, progress.message)
        self._events.put(progress)

    def fail(self, error: ServiceError) -> None:
        self.error = error
        self._events.put(_DONE)

    def finish(self) -> None:
        self._events.put(_DONE)

    def events(self) -> Iterator[SwapProgress]:
        """Progress until the job ends; raises the job's error, if any, at the end."""
        while True:
            event = self._events.get()
            if event is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield event


class ModelHost:
    def __init__(
        self,
        loaded: LoadedModel,
        engine: ContinuousBatchingEngine,
        registry: ModelRegistry | None,
        load: Callable[[str], LoadedModel] | None = None,
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
    ) -> None:
        self.registry = registry
        self.metrics: GenerationMetrics = engine.metrics
        self._load = load
        self._engine_config = engine.config
        self._drain_seconds = drain_seconds
        self._lock = threading.Lock()
        self._open = threading.Event()  # cleared while an in-place swap has no engine to submit to
        self._open.set()
        self._active = ServedModel(loaded, engine)
        self._previous = ""
        self._history: list[str] = [self._active.label]  # labels this process served, for rollback
        self._draining: list[ServedModel] = []
        self._job: SwapJob | None = None
        self.metrics.set_active_version(self._active.label)

    # -- serving -----------------------------------------------------------------------------------

    @property
    def active(self) -> ServedModel:
        return self._active

    @property
    def previous(self) -> str:
        return self._previous

    @property
    def loading(self) -> str:
        job = self._job
        return job.model if job is not None else ""

    @property
    def draining_requests(self) -> int:
        return sum(s.engine.active_sequences + s.engine.waiting for s in list(self._draining))

    def current(self, wait: float | None = None) -> ServedModel:
        """The model serving new requests; during an in-place swap, waits for it (up to ``wait`` seconds)."""
        if not self._open.wait(wait):
            raise Unavailable("the model is being swapped in place and the request's deadline came first")
        return self._active

    def submit(self, build: Callable[[LoadedModel], Request], wait: float | None = None) -> tuple[ServedModel, Request]:
        """Builds a request for the active model and submits it to that model's engine, atomically with
        respect to a switch. ``wait``: how long to wait for an in-place swap (None: as long as it takes)."""
        while True:
            served = self.current(wait)
            request = build(served.loaded)
            with self._lock:
                if self._open.is_set() and served is self._active:
                    served.engine.submit(request)
                    return served, request
            # a switch happened between reading the model and submitting: build again for the new one

    def shutdown(self, grace: float) -> None:
        for served in [self._active, *self._draining]:
            served.engine.shutdown(grace)

    # -- swapping ----------------------------------------------------------------------------------

    def start_swap(self, spec: str, in_place: bool = False, action: str = "promote") -> SwapJob:
        """Starts loading ``spec`` (a registry name or name:version) on a thread; returns its progress."""
        if self.registry is None or self._load is None:
            raise FailedPrecondition(
                "this server cannot load other versions: it was started without a model registry, or it is"
                " sharded over several ranks (--num-shard), which would all have to load the new version"
            )
        name = spec.partition(":")[0]
        if not self.registry.versions(name):
            known = ", ".join(self.registry.names()) or "none"
            raise NotFound(f"model {name!r} is not in the registry at {self.registry.root} (registered: {known})")
        with self._lock:
            if self._job is not None:
                raise FailedPrecondition(f"a load of {self._job.model} is in progress; wait for it to finish")
            job = self._job = SwapJob(spec)
        threading.Thread(target=self._swap, args=(job, spec, in_place, action), name="swap", daemon=True).start()
        return job

    def rollback_target(self) -> str:
        current = self._active.label
        if len(self._history) >= 2:
            return self._history[-2]
        target = self.registry.promoted_before(current) if self.registry is not None else None
        if not target:
            raise FailedPrecondition(
                f"nothing to roll back to: {current} is the only version this server or the promotion history knows"
            )
        return target

    def start_rollback(self, in_place: bool = False) -> SwapJob:
        return self.start_swap(self.rollback_target(), in_place, action="rollback")

    def _swap(self, job: SwapJob, spec: str, in_place: bool, action: str) -> None:
        started = time.perf_counter()
        previous = self._active.label
        try:
            if in_place:
                served = self._swap_in_place(job, spec, previous)
            else:
                served = self._prepare(job, spec, previous)
                with self._lock:
                    old, self._active = self._active, served
                self._retire(old, job)
            seconds = time.perf_counter() - started
            self._after_switch(served, previous, action, seconds)
            job.emit(SwapProgress("done", f"{served.label} serves new requests", 1.0, served.label, previous, seconds))
            job.finish()
        except ServiceError as error:
            self.metrics.swaps.labels("failed").inc()
            logger.warning("swap to {} failed; {} serves: {}", spec, getattr(self._active, "label", "nothing"), error)
            job.fail(error)
        except Exception as error:  # a bug, but the served model must stay up and the caller must hear why
            self.metrics.swaps.labels("failed").inc()
            logger.opt(exception=error).error("swap to {} failed unexpectedly", spec)
            job.fail(FailedPrecondition(f"loading {spec} failed: {type(error).__name__}: {error}"))
        finally:
            with self._lock:
                self._job = None

    def _prepare(self, job: SwapJob, spec: str, previous: str) -> ServedModel:
        """Verifies, loads and warms ``spec`` beside the served model; raises without touching it."""
        job.emit(SwapProgress("verifying", f"checking the files of {spec} against their sha256", 0.05, spec, previous))
        self.registry.resolve(spec)  # NotFound / FailedPrecondition before any weights are read
        job.emit(SwapProgress("loading", f"loading {spec}", 0.2, spec, previous))
        loaded = self._load_model(spec)
        label = model_label(loaded)
        job.emit(SwapProgress("warming", f"warming {label} with a short generation", 0.7, label, previous))
        engine = start_engine(loaded, self._engine_config, self.metrics)
        try:
            _warm_up(loaded, engine)
        except BaseException:
            engine.shutdown(0.0)
            raise
        return ServedModel(loaded, engine)

    def _load_model(self, spec: str) -> LoadedModel:
        try:
            return self._load(spec)
        except (torch.OutOfMemoryError, MemoryError) as error:
            raise ResourceExhausted(f"not enough memory to load {spec} beside the served model: {error}") from None

    def _swap_in_place(self, job: SwapJob, spec: str, previous: str) -> ServedModel:
        self.registry.resolve(spec)  # refuse a bad version before pausing anything
        if not self._active.loaded.version:
            raise FailedPrecondition(
                f"{previous} is not a registry version, so it could not be reloaded if this failed"
            )
        with self._lock:
            self._open.clear()
            old = self._active
        try:
            job.emit(SwapProgress("draining", f"finishing running requests on {previous}", 0.1, spec, previous))
            old.engine.shutdown(self._drain_seconds)
            old_spec = previous
            del old
            self._active = None  # type: ignore[assignment]  # nothing serves until the load below ends
            _free_memory()
            try:
                served = self._prepare(job, spec, previous)
            except BaseException:
                logger.warning("in-place load of {} failed; loading {} again", spec, old_spec)
                self._active = self._prepare(SwapJob(old_spec), old_spec, "")
                raise
            self._active = served
            return served
        finally:
            self._open.set()

    def _retire(self, old: ServedModel, job: SwapJob) -> None:
        """The old engine finishes its running requests on a thread, then its weights are dropped."""
        self._draining.append(old)
        running = old.engine.active_sequences + old.engine.waiting
        job.emit(SwapProgress("switched", f"{running} running request(s) finish on {old.label}", 0.9, "", old.label))

        def drain() -> None:
            old.engine.shutdown(self._drain_seconds)
            self._draining.remove(old)
            logger.info("{} drained; its weights are freed", old.label)
            _free_memory()

        threading.Thread(target=drain, name=f"drain-{old.label}", daemon=True).start()

    def _after_switch(self, served: ServedModel, previous: str, action: str, seconds: float) -> None:
        self._previous = previous
        if action == "rollback" and len(self._history) >= 2 and self._history[-2] == served.label:
            self._history.pop()
        else:
            self._history.append(served.label)
        self.metrics.set_active_version(served.label, previous)
        self.metrics.swap_duration.observe(seconds)
        self.metrics.swaps.labels("ok").inc()
        logger.info("{} now serves new requests (was {}; {} took {:.2f}s)", served.label, previous, action, seconds)
        if self.registry is not None and served.loaded.version:
            metadata = self.registry.resolve(served.label).metadata
            self.registry.record_promotion(
                Promotion(
                    at=time.time(),
                    action=action,
                    model=served.label,
                    previous=previous,
                    source=metadata.source,
                    gate=metadata.gate,
                    forced=metadata.gate.get("decision") == "forced",
                )
            )


def _warm_up(loaded: LoadedModel, engine: ContinuousBatchingEngine) -> None:
    """One short greedy generation through the new engine: the first real request must not pay for it."""
    prompt = loaded.tokenizer(WARMUP_PROMPT)["input_ids"] or [0]
    request = engine.submit(Request(prompt_ids=prompt, config=SamplingConfig(max_new_tokens=2, ignore_eos=True)))
    try:
        for event in request.events(timeout=120.0):
            if isinstance(event, Finished) and event.status is not RequestStatus.FINISHED_LENGTH:
                raise FailedPrecondition(f"the warm-up generation failed: {event.status.name} {event.error}")
    except queue.Empty:
        request.cancel()
        raise FailedPrecondition("the warm-up generation made no progress for 120s") from None


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
