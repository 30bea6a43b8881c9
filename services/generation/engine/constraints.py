"""Constraints: what a request's output must be (a JSON schema, a regular expression, a Lark or GBNF grammar, a
choice among strings), compiled by a grammar engine into a per-row token mask that the sampler applies before
anything else (``RowSampling.logits_mask``).

The manager here knows nothing of the grammar engine beyond a narrow interface (``GrammarBackend``: a tokenizer
view built once per tokenizer, ``compile`` into something with ``new_mask()``); llguidance is the one backend
(``llguidance_backend.py``). Compiling never runs on the engine's thread: the server awaits a request's own
compile on a small pool before it submits the request, results (refusals included) are cached by (constraint,
tokenizer), and a compile that takes longer than ``timeout_s`` is refused like a grammar that cannot compile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.errors import InvalidArgument
from services.generation.engine.sampling import LogitsMask

DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_CACHE_SIZE = 512


@dataclass(frozen=True)
class ConstraintSpec:
    """A validated ``Constraint``: its kind (the proto's oneof field) and its text (a choice's options as a JSON
    list). Hashable: it is the compile cache's key with the tokenizer."""

    kind: str
    text: str

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"


class CompiledConstraint(Protocol):
    def new_mask(self) -> LogitsMask:
        """A fresh matcher for one row (each row walks the grammar on its own)."""
        ...


class GrammarBackend(Protocol):
    def tokenizer_for(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> Any: ...

    def compile(self, spec: ConstraintSpec, tokenizer: Any, eos_ids: Iterable[int]) -> CompiledConstraint: ...


class _LLGuidance:
    """The llguidance backend, imported on first use (a server that never sees a constraint never loads it)."""

    def tokenizer_for(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> Any:
        from services.generation.engine import llguidance_backend

        return llguidance_backend.tokenizer_for(tokenizer, vocab_size, eos_ids)

    def compile(self, spec: ConstraintSpec, tokenizer: Any, eos_ids: Iterable[int]) -> CompiledConstraint:
        from services.generation.engine import llguidance_backend

        return llguidance_backend.compile(spec, tokenizer, eos_ids)


class ConstraintCompiler:
    """Compiles constraints off the engine's thread, caches them by (constraint, tokenizer), bounds each compile."""

    def __init__(
        self,
        timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
        workers: int = 2,
        backend: GrammarBackend | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.backend: GrammarBackend = backend or _LLGuidance()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="constraint-compile")
        self._cache: OrderedDict[tuple[ConstraintSpec, int], concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # compiles started (cache misses), for tests and metrics

    def tokenizer(self, loaded: Any) -> Any:
        """The backend's view of ``loaded``'s tokenizer (built once per tokenizer; not bounded by timeout_s)."""
        return self.backend.tokenizer_for(loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids)

    def submit(self, spec: ConstraintSpec, loaded: Any) -> concurrent.futures.Future:
        """The compile of ``spec`` for ``loaded``'s tokenizer: the cached one, or a new one on the pool."""
        view = self.tokenizer(loaded)
        key = (spec, id(view))  # the compiled grammar holds ``view``, so its id is not reused while cached
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            self.compiles += 1
            future = self._pool.submit(self._compile, spec, view, frozenset(loaded.eos_token_ids))
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return future

    def _compile(self, spec: ConstraintSpec, view: Any, eos_ids: frozenset[int]) -> CompiledConstraint:
        started = time.perf_counter()
        compiled = self.backend.compile(spec, view, eos_ids)
        if time.perf_counter() - started > self.timeout_s:
            raise self._too_slow(spec)  # cached as a refusal: the same constraint is refused the same way
        return compiled

    def _too_slow(self, spec: ConstraintSpec) -> InvalidArgument:
        return InvalidArgument(
            f"{spec.field}: compiling it took longer than the server's bound of {self.timeout_s:g} s"
            " (--constraint-compile-timeout): simplify the grammar or schema"
        )

    def compile(self, spec: ConstraintSpec, loaded: Any) -> CompiledConstraint:
        """Blocking: for a worker thread (never the engine's)."""
        try:
            return self.submit(spec, loaded).result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._too_slow(spec) from None

    async def compile_async(self, spec: ConstraintSpec, loaded: Any) -> CompiledConstraint:
        """Awaits this request's own compile; the event loop and the engine go on meanwhile."""
        future = await asyncio.to_thread(self.submit, spec, loaded)
        waited = asyncio.wrap_future(future)
        try:
            # shielded: a waiter that gives up must not cancel a compile others share
            return await asyncio.wait_for(asyncio.shield(waited), self.timeout_s)
        except TimeoutError:
            waited.add_done_callback(_retrieve)  # its outcome is the cache's now; nobody here will read it
            raise self._too_slow(spec) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
