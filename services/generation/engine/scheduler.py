"""Which requests run: admission control and the whole plan of each step, as plain data.

The scheduler knows nothing of models. ``add`` queues or refuses a request (backpressure); ``schedule``
decides everything one step does and returns it (``SchedulerOutput``); ``update_from_output`` applies
the tokens that step produced. The rows of the running batch, in their KV-cache order, and the group
being prefilled live here and nowhere else.

The part of a step the model runs (``ModelStep``) is ints and tuples only: with tensor parallelism,
rank 0 broadcasts it and every rank applies the same cache operations to its shard.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted
from services.generation.engine.prefix_cache import CacheOp, PrefixIndex, Reuse
from services.generation.engine.request import Request, RequestStatus
from services.generation.engine.speculation import DraftState, PromptLookup, StepCost

DEAD_ROW_TOKEN = 0  # what a finished row still in the cache is fed; its logits are never read
# a request waits a step for another's prefill of the prompt prefix they share when that saves at least this many
# tokens: on the 2-core VM a step's fixed cost is worth 7 to 30 tokens' prefill by dtype (docs/benchmarks.md's
# decode steps at 1 and 16 rows), so sharing fewer is cheaper to prefill twice
SHARED_PREFIX_MIN_TOKENS = 32


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences decoding together
    max_batch_total_tokens: int = 32768  # KV-cache slots (prompt + max_new_tokens) of all running sequences
    max_concurrent_requests: int = 128  # running + waiting; beyond it requests are refused
    max_prefill_tokens: int = 2048  # prompt tokens admitted in one group (and prefilled per step)
    prefix_cache_bytes: int = 0  # KV the prefix cache may keep, all ranks together (0: no prefix caching)
    speculative_tokens: int = 0  # the most tokens a row drafts from its prompt a step (0: no speculation)
    speculative_max_batch: int = 4  # rows decoding together above which nobody drafts


@dataclass(frozen=True)
class PrefillChunk:
    """Columns ``start:end`` of a group's left-padded prompts. ``prompts`` is set on the group's first
    chunk only (the model side builds the group from it), with ``reuse``: per row, the cached prefix it
    starts from (the group's first ``start`` columns hold those, each row's right-aligned, and its own
    tokens follow, left-padded). ``last`` means the prompts are then all in: the group's first tokens are
    sampled and it joins the batch."""

    start: int
    end: int
    last: bool
    prompts: tuple[tuple[int, ...], ...] = ()
    reuse: tuple[Reuse, ...] = ()


@dataclass(frozen=True)
class DecodeRow:
    """One running row's part of a step: ``token`` is fed, then ``draft``, a guess at the tokens after it
    (speculative decoding; empty: one token), every one of them scored. ``rejected``: how many of the last
    step's draft tokens the sampler turned down; their KV leaves the row first."""

    token: int
    draft: tuple[int, ...] = ()
    rejected: int = 0


@dataclass(frozen=True)
class ModelStep:
    """What every rank's model does this step, in this order: apply ``cache_ops`` to the prefix cache
    (they read rows of the batch as the last step left it), keep only rows ``keep`` of the running batch
    (None: all stay), feed each remaining row its ``decode`` entry (empty: no decode), run ``prefill``
    (None: none). Logits come back for the decoding rows' positions, then, if the chunk is the group's
    last, for the group's rows."""

    step: int
    keep: tuple[int, ...] | None = None
    decode: tuple[DecodeRow, ...] = ()
    prefill: PrefillChunk | None = None
    stop: bool = False  # the service is going away: ranks leave their loop
    cache_ops: tuple[CacheOp, ...] = ()

    @property
    def decode_tokens(self) -> tuple[int, ...]:
        return tuple(row.token for row in self.decode)

    @property
    def idle(self) -> bool:
        return not self.decode and self.prefill is None and not self.cache_ops


@dataclass
class SchedulerOutput:
    """One step: ``model`` for the ranks, and for rank 0 the requests behind its rows."""

    model: ModelStep
    decoding: list[Request] = field(default_factory=list)  # every row of the batch after ``keep``, dead ones too
    prefilling: list[Request] = field(default_factory=list)  # the group, in row order
    expired: list[Request] = field(default_factory=list)  # cancelled or past their deadline: finish them
    sampled: list[Request] = field(default_factory=list)  # the live rows that get a token this step
    logit_rows: list[int] = field(default_factory=list)  # where each of ``sampled`` starts in the step's logits
    drafts: list[tuple[int, ...]] = field(default_factory=list)  # each of ``sampled``'s draft, scored after it

    @property
    def positions(self) -> list[int]:
        """The rows of the step's logits that sampling reads: each sampled row's 1 + len(draft) positions."""
        return [row + i for row, draft in zip(self.logit_rows, self.drafts, strict=True) for i in range(len(draft) + 1)]


@dataclass
class _Group:
    requests: list[Request]
    width: int  # prompt columns after left padding (cached prefixes, then the rest)
    done: int = 0  # columns already prefilled (or taken from the prefix cache)
    reuse: tuple[Reuse, ...] = ()
    prefix: int = 0  # columns taken from the prefix cache (the longest reused prefix)


class ContinuousBatchScheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        kv_bytes_per_token: int = 1,
        free_row_drops: bool = False,
        max_prefix_nodes: int | None = None,
        max_prefix_tokens: int | None = None,
    ) -> None:
        """``kv_bytes_per_token`` turns ``config.prefix_cache_bytes`` into the tokens the cache may hold.
        ``free_row_drops``: the runner drops a row without copying the rest (llama.cpp's per-sequence KV),
        so finished rows leave at once; ``max_prefix_nodes`` and ``max_prefix_tokens`` bound the prefix tree
        below what the bytes allow, for a runner with fixed slots."""
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.free_row_drops = free_row_drops
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []  # the running batch's rows, in KV-cache order (finished rows until next step)
        self.prefilling: _Group | None = None
        capacity = config.prefix_cache_bytes // kv_bytes_per_token
        if max_prefix_tokens is not None:
            capacity = min(capacity, max_prefix_tokens)
        self.prefix = PrefixIndex(capacity, max_prefix_nodes)
        self._steps = 0
        self.step_cost = StepCost()  # what a scored position costs: the engine times its decode steps into it
        self._dead_row_steps = 0  # row-steps spent on finished rows still in the cache
        self._kept: dict[int, int] = {}  # id(request) -> how many of its KV tokens the prefix cache holds

    @property
    def running(self) -> list[Request]:
        """Requests holding a batch slot (decoding or prefilling), not yet finished."""
        group = self.prefilling.requests if self.prefilling else []
        return [r for r in [*self.batch, *group] if not r.status.finished]

    @property
    def tokens_in_use(self) -> int:
        return sum(r.budget_tokens for r in self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.batch or self.prefilling)

    def add(self, request: Request) -> None:
        """Queues the request, or raises ResourceExhausted naming the limit it would break."""
        config = self.config
        # a cancelled request leaves at the next step: its client is gone, so it must not turn new ones away
        # (a killed orchestrator's streams still counted while its restarted self sent the next 64)
        in_flight = sum(not r.cancelled for r in (*self.running, *self.waiting))
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

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """Plans one step: every live row decodes, and the group being prefilled runs its next chunk;
        with no group in flight, the longest first-come run of waiting requests that fits the batch size,
        the token budget and the prefill cap starts one (ended early before a request that would prefill
        a long prefix again: ``_admit``).

        Finished and expired rows stay in the cache as dead rows (fed a filler token, their logits
        ignored) until dropping them pays: taking rows out copies the whole KV cache, about one decode
        step's work, while a dead row costs only its share of each step. So they leave when the dead
        rows have cost as many row-steps as the batch has rows (a rent-or-buy rule), when no live row is
        left, or when a group is about to join (the batch is copied then anyway). With a runner whose row
        drops are free (``free_row_drops``), they leave at once."""
        now = time.monotonic() if now is None else now
        self._steps += 1
        expired = self._drop_expired_waiting(now)
        for request in [*self.batch, *(self.prefilling.requests if self.prefilling else [])]:
            if not request.status.finished and request.expired(now):
                expired.append(request)  # stops decoding now; a prefilling row stops once its group joins
        leaving = {id(r) for r in expired}

        def stopped(request: Request) -> bool:
            return request.status.finished or id(request) in leaving

        live = [row for row, r in enumerate(self.batch) if not stopped(r)]
        # before admission, so that what the new group reuses is not evicted by this step's stores
        cache_ops = self._keep_prefixes(stopped) if self.prefix.enabled else ()
        if self.prefilling is None:
            self._admit(now)
        prefill = self._next_chunk()
        keep = None
        if len(live) < len(self.batch):
            self._dead_row_steps += len(self.batch) - len(live)
            joining = prefill is not None and prefill.last
            if self.free_row_drops or not live or joining or self._dead_row_steps >= len(self.batch):
                keep, self._dead_row_steps = tuple(live), 0
                for request in self.batch:
                    if stopped(request):
                        self._kept.pop(id(request), None)
                self.batch = [self.batch[row] for row in live]
        config = self.config
        speculate = config.speculative_tokens > 0 and len(self.batch) <= config.speculative_max_batch
        share = self.step_cost.position_share(len(live)) if speculate else 0.0
        decode = tuple(self._decode_row(r, stopped(r), speculate, share) for r in self.batch)
        model = ModelStep(self._steps, keep, decode, prefill, cache_ops=cache_ops)
        group = self.prefilling.requests if self.prefilling else []
        # logits come back for every decoding row's 1 + len(draft) positions, then for the group's rows when its
        # last chunk runs
        rows = [*self.batch, *(group if prefill is not None and prefill.last else [])]
        drafts = [row.draft for row in decode] + [()] * (len(rows) - len(decode))
        starts, position = [], 0
        for draft in drafts:
            starts.append(position)
            position += 1 + len(draft)
        sampled = [i for i, r in enumerate(rows) if not stopped(r)]
        return SchedulerOutput(
            model,
            list(self.batch),
            list(group),
            expired,
            [rows[i] for i in sampled],
            [starts[i] for i in sampled],
            [drafts[i] for i in sampled],
        )

    def _decode_row(self, request: Request, stopped: bool, speculate: bool, share: float) -> DecodeRow:
        """A row's part of the step: a finished row is fed filler; a live one its last token, after the draft
        positions it was refused last step leave its KV, and a draft when it has one worth scoring (``share``:
        ``StepCost.position_share`` of this step)."""
        if stopped:
            return DecodeRow(DEAD_ROW_TOKEN)
        state = request.speculation
        if state is None:
            return DecodeRow(request.output_ids[-1])
        room = request.config.max_new_tokens - len(request.output_ids) - 1  # tokens it may add after this one
        draft = ()
        if speculate:
            draft = state.propose(len(request.output_ids), self.config.speculative_tokens, room, share)
        state.pending = draft
        rejected, state.rejected = state.rejected, 0
        return DecodeRow(request.output_ids[-1], draft, rejected)

    def update_from_output(self, output: SchedulerOutput, tokens: Sequence[int | Sequence[int]]) -> list[Request]:
        """Applies the step's sampled tokens (per ``output.sampled`` row, one token, or the draft tokens it
        accepted and the token after them; rows that finished since are skipped) and moves a fully prefilled
        group into the batch. Returns the requests this finished by length or an end-of-sequence token, with
        their status set; others finish through the engine."""
        finished = []
        for request, chosen in zip(output.sampled, tokens, strict=True):
            if request.status.finished:
                continue
            chosen = (chosen,) if isinstance(chosen, int) else tuple(chosen)
            before = len(request.output_ids)
            if self._append(request, chosen):
                finished.append(request)
            state = request.speculation
            if state is not None:
                appended = len(request.output_ids) - before
                if appended:
                    state.check_shadow(request.output_ids[before])
                state.lookup.extend(request.output_ids[before:])
                # fed: the row's token and its draft; kept in the KV: the token and the drafts now in the output
                state.rejected = len(state.pending) + 1 - appended
                drafted, accepted = len(state.pending), len(chosen) - 1
                state.record(drafted, accepted, len(request.output_ids), self.config.speculative_tokens)
                request.drafted_tokens, request.accepted_draft_tokens = state.drafted, state.accepted
                state.pending = ()
        chunk = output.model.prefill
        if chunk is not None and chunk.last and self.prefilling is not None:
            self.batch += self.prefilling.requests
            self.prefilling = None
        return finished

    def _append(self, request: Request, tokens: Sequence[int]) -> bool:
        """Appends ``tokens`` to the request's output until one ends it; True when the request finished (an
        end-of-sequence or stop token, not appended, or its length)."""
        for token in tokens:
            if token in request.config.stop_token_ids or (
                not request.config.ignore_eos and token in self.eos_token_ids
            ):
                request.status = RequestStatus.FINISHED_EOS
                return True
            request.output_ids.append(token)
            request.status = RequestStatus.RUNNING
            if len(request.output_ids) >= request.config.max_new_tokens:
                request.status = RequestStatus.FINISHED_LENGTH
                return True
        return False

    def drop_all(self) -> list[Request]:
        """Forgets every row (after a failed model call) and the prefix cache with them (the model side
        resets its own); returns the unfinished requests that held rows."""
        lost = self.running
        self.batch, self.prefilling, self._dead_row_steps = [], None, 0
        self._kept.clear()
        self.prefix.clear()
        return lost

    def drain_waiting(self) -> list[Request]:
        waiting, self.waiting = list(self.waiting), deque()
        return waiting

    def _drop_expired_waiting(self, now: float) -> list[Request]:
        expired = [r for r in self.waiting if r.expired(now)]
        if expired:
            self.waiting = deque(r for r in self.waiting if not r.expired(now))
        return expired

    def _keep_prefixes(self, stopped) -> tuple[CacheOp, ...]:
        """The prefix cache keeps each row's prompt once it has joined, and its prompt and answer once
        it stops (finished, cancelled or expired); the tree stores only what it does not hold yet."""
        ops: list[CacheOp] = []
        for row, request in enumerate(self.batch):
            held = _kv_tokens(request)
            kept = self._kept.get(id(request), 0)
            if held > kept and (kept == 0 or stopped(request)):
                self._kept[id(request)] = held
                ops += self.prefix.insert([*request.prompt_ids, *request.output_ids][:held], row)
        return tuple(ops)

    def _admit(self, now: float) -> None:
        """Starts a group: the longest first-come run of waiting requests that fits the batch size, the token
        budget and the prefill cap. With the prefix cache on, the run also ends before a request whose prompt
        shares ``SHARED_PREFIX_MIN_TOKENS`` tokens or more, past what the cache gives it, with a prompt in the
        group (n answers to one prompt, a new system prompt): once the group joins, the cache holds that
        prompt, and the request, first in the next group, prefills only the rest. It waits one group at most
        (it heads the next one, whatever the cache then gives it), and never for a prompt too long to keep."""
        config = self.config
        rows = len([r for r in self.batch if not r.status.finished])
        tokens, prefill = sum(r.budget_tokens for r in self.batch), 0
        admitted: list[Request] = []
        reuse: list[Reuse] = []
        while self.waiting:
            request = self.waiting[0]
            # at least the prompt's last token is prefilled: its logits give the first token
            cached = self.prefix.match(request.prompt_ids[:-1])
            fresh = len(request.prompt_ids) - cached.tokens
            fits = (
                rows + len(admitted) < config.max_batch_size
                and tokens + request.budget_tokens <= config.max_batch_total_tokens
                and (not admitted or prefill + fresh <= config.max_prefill_tokens)
            )
            if not fits or (self.prefix.enabled and self._shares_uncached_prefix(request, cached, admitted, reuse)):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.PREFILLING
            request.scheduled_at = now
            request.cached_tokens = cached.tokens
            if config.speculative_tokens > 0:
                request.speculation = DraftState(PromptLookup(request.prompt_ids))
            admitted.append(request)
            reuse.append(cached)
            tokens += request.budget_tokens
            prefill += fresh
        if admitted:
            prefix = max(r.tokens for r in reuse)
            rest = max(len(r.prompt_ids) - c.tokens for r, c in zip(admitted, reuse, strict=True))
            self.prefilling = _Group(admitted, prefix + rest, prefix, tuple(reuse), prefix)

    def _shares_uncached_prefix(
        self, request: Request, cached: Reuse, group: list[Request], reuse: list[Reuse]
    ) -> bool:
        """Whether ``request``'s prompt, less its last token, runs on for ``SHARED_PREFIX_MIN_TOKENS`` past its
        ``cached`` tokens in step with the prompt of a member of ``group`` (whose cached prefixes are ``reuse``)
        that the prefix cache can keep once the group joins."""
        end = cached.tokens + SHARED_PREFIX_MIN_TOKENS
        if end > len(request.prompt_ids) - 1:
            return False
        start = request.prompt_ids[:end]  # slices compare at C speed: no token-by-token walk per member
        return any(
            other.prompt_ids[:end] == start and len(other.prompt_ids) - kept.tokens <= self.prefix.capacity
            for other, kept in zip(group, reuse, strict=True)
        )

    def _next_chunk(self) -> PrefillChunk | None:
        group = self.prefilling
        if group is None:
            return None
        columns = max(1, self.config.max_prefill_tokens // len(group.requests))
        start, end = group.done, min(group.width, group.done + columns)
        first = start == group.prefix
        group.done = end
        prompts = tuple(tuple(r.prompt_ids) for r in group.requests) if first else ()
        reuse = group.reuse if first and group.prefix else ()  # nothing reused: nothing to send
        return PrefillChunk(start, end, end == group.width, prompts, reuse)


def _kv_tokens(request: Request) -> int:
    """Tokens of a batch row's prompt and answer that its KV holds at the start of a step: all but the last
    token sampled, which is fed this step (or never, once the row has stopped). An end-of-sequence token
    is never appended, so a row that stopped on one holds every token of its answer; a row that stopped
    before its first token holds its prompt."""
    fed = len(request.output_ids) - (request.status is not RequestStatus.FINISHED_EOS)
    return len(request.prompt_ids) + max(0, fed)
