"""The llama.cpp runner: the same ``ModelStep`` as the transformers runner runs, executed by llama.cpp on a GGUF file.

Our scheduler still decides everything (who joins, chunked prefills, who leaves, what the prefix cache
keeps) and sampling, stop sequences and streaming stay ours; only the model call moves into llama.cpp,
through llama-cpp-python's low-level bindings (``llama_batch``, ``llama_decode``, the memory's ``seq_*``):

- every batch row is a llama.cpp sequence id; a step is one ``llama_batch`` holding each decoding row's
  token (and draft) and the prefill chunk's tokens, each tagged with its row's sequence, and logits are asked
  only for the tokens whose next token is sampled;
- llama.cpp keeps each sequence's KV in one unified cache, so nothing is padded: a row leaving is
  ``seq_rm`` and costs nothing (the scheduler drops finished rows at once for this runner);
- the prefix cache lives in host memory, outside that pool, because llama.cpp's attention visits every
  used cell of the pool for every token (cached prefixes kept as sequences of their own cost each step,
  see the note at ``LLAMA_MAX_SEQ``). ``StoreKV`` saves positions ``start:end`` of its row with
  ``llama_state_seq_get_data`` (the row's cells tagged onto a scratch sequence by ``seq_cp``, which copies
  nothing, and saved from there); ``SplitKV`` cuts the saved cells in two; ``EvictKV`` lets them go. A
  reused prefix (its nodes, the last one possibly in part) is joined into one saved sequence and
  restored into the new row with ``llama_state_seq_set_data``, its cells in position order. Rows of one
  group reusing the same tokens share one restore (``seq_cp`` from the first). ``llamacpp_state.py``
  reads and writes llama.cpp's saved layout.

Threads: llama.cpp's own (OpenMP) threads do the math; the engine thread only fills the batch and reads
the logits. On a 2-core machine one llama.cpp thread per core is fastest when the process has the cores to
itself (see docs/generation-scaling.md).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.generation.engine.prefix_cache import CacheOp, EvictKV, Reuse, SplitKV, StoreKV
from services.generation.engine.runner import RunnerMemory
from services.generation.engine.runners.llamacpp_state import (
    SavedKV,
    StateFormatError,
    StateLayout,
    join_state,
    parse_state,
    state_size,
)
from services.generation.engine.scheduler import DecodeRow, PrefillChunk, SchedulerConfig

LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time cap on sequence ids (LLAMA_MAX_SEQ in llama-cparams.h)
# Why the prefix cache is not kept in the pool: llama.cpp's attention walks the pool's used range for each
# token, masked cells (other sequences', cached prefixes') included. One stream of SmolLM2-135M Q4_1 decoded
# at 86 tokens/s beside an empty cache, 64 beside 4.6k cached tokens, 57 beside 9.2k, 40 beside 34k (2-core
# VM, in process), when cached prefixes were sequences in the pool (capped at 4096 tokens for that reason).
# --flash-attn: llama_flash_attn_type (auto: llama.cpp's choice, on wherever its backend has the kernel, a CPU
# included). Measured on a 2-core AVX2 VM with the default Q4_1 GGUF (in process, one decode step):
# - one sequence: about the same up to ~1k cells; beyond, off is faster (2.5k cells 15.6 against 23.4 ms,
#   3.8k 25.3 against 36.6), and so is scoring a draft (5 positions at 1.2k: 40.8 against 61.7 ms): the CPU
#   kernel walks the cells one at a time per query row, where off runs two matrix products;
# - many sequences in the one pool: on is faster (16 rows of 500 cells: 221 against 291 ms), because it skips
#   other sequences' masked cells, and off computes them.
# Off stores values transposed, which the saved prefixes' layout records (llamacpp_state.py reads both).
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
_WARN, _ERROR, _CONTINUED = 3, 4, 5  # ggml_log_level (1 debug, 2 info)

_lock = threading.Lock()
_initialised = False
_log_tail: list[str] = []  # llama.cpp's last warnings and errors, for the message of a failed load
_log_callback = None  # the ctypes callback must outlive every llama.cpp call: keep it referenced


def bindings():
    """llama-cpp-python's module, its backend started once, its log routed into ours (warnings and errors
    only: llama.cpp prints every tensor it loads at info level)."""
    global _initialised, _log_callback
    try:
        import llama_cpp
    except ImportError as error:
        raise FailedPrecondition(
            f"--runner llamacpp needs llama-cpp-python, which is not installed ({error}): run `make llamacpp`"
        ) from None
    with _lock:
        if not _initialised:
            last_level = [0]

            def forward(level: int, text: bytes, _user_data) -> None:
                level = last_level[0] if level == _CONTINUED else level
                last_level[0] = level
                if level in (_WARN, _ERROR) and text:
                    line = text.decode("utf-8", "replace").rstrip()
                    if line:
                        _log_tail.append(line)
                        del _log_tail[:-8]
                        logger.log("WARNING" if level == _WARN else "ERROR", "llama.cpp: {}", line)

            _log_callback = llama_cpp.llama_log_callback(forward)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialised = True
    return llama_cpp


def default_threads() -> int:
    """One llama.cpp thread per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp: the weights only (each engine makes its own context and KV cache)."""

    def __init__(self, path: Path, gpu_layers: int = 0) -> None:
        llama = bindings()
        self.path = path
        if not path.is_file():
            raise FailedPrecondition(f"{path} is not a file")
        params = llama.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # llama.cpp's "extra buffer types" repack weights for AMX (and other CPU kernels); on this build's
        # AVX512/AMX CPU its AMX matmul segfaulted in the first llama_decode (ggml_backend_amx_mul_mat),
        # so the plain CPU kernels run; llama-server is measured the same way (--no-repack) in bench_peers
        params.use_extra_bufts = False
        _log_tail.clear()
        self._llama = llama
        self.pointer = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.pointer:
            said = "; ".join(_log_tail[-3:]) or "no reason given"
            raise FailedPrecondition(f"llama.cpp could not load {path}: {said}")
        self.vocab = llama.llama_model_get_vocab(self.pointer)
        self.vocab_size = int(llama.llama_vocab_n_tokens(self.vocab))
        self.context_length = int(llama.llama_model_n_ctx_train(self.pointer))
        self.architecture = self.metadata("general.architecture") or "unknown"
        self.description = self._description()
        layers, kv_heads = llama.llama_model_n_layer(self.pointer), llama.llama_model_n_head_kv(self.pointer)
        head_dim = llama.llama_model_n_embd(self.pointer) // max(1, llama.llama_model_n_head(self.pointer))
        self.kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2  # keys and values in float16
        eos = {llama.llama_vocab_eos(self.vocab), llama.llama_vocab_eot(self.vocab)}
        self.eos_token_ids = frozenset(int(t) for t in eos if t >= 0)

    def metadata(self, key: str) -> str:
        buffer = ctypes.create_string_buffer(256)
        size = self._llama.llama_model_meta_val_str(self.pointer, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace") if size >= 0 else ""

    def _description(self) -> str:
        buffer = ctypes.create_string_buffer(128)
        self._llama.llama_model_desc(self.pointer, buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace")

    @property
    def quantization(self) -> str:
        """The file type as llama.cpp names it, e.g. Q4_1 (the last word of its description)."""
        return self.description.rsplit(" ", 1)[-1] if self.description else "gguf"

    def __del__(self) -> None:
        if getattr(self, "pointer", None):
            self._llama.llama_model_free(self.pointer)
            self.pointer = None


@dataclass
class _Joining:
    """A row of the group being prefilled: its sequence, its own tokens and the column they start at."""

    seq: int
    tokens: list[int]
    first_column: int
    cached: int  # positions already in the sequence (a reused prefix)


@dataclass
class _Slots:
    """Sequence ids not in use."""

    free: list[int] = field(default_factory=lambda: list(range(LLAMA_MAX_SEQ - 1, -1, -1)))

    def take(self) -> int:
        if not self.free:
            raise ResourceExhausted(f"llama.cpp has no free sequence id (it has {LLAMA_MAX_SEQ})")
        return self.free.pop()

    def give(self, seq: int) -> None:
        self.free.append(seq)


class LlamaCppRunner:
    """Runs steps in llama.cpp: one context (KV cells and sequence ids) per engine, over a loaded GGUF; the
    prefix cache's nodes in host memory beside it."""

    def __init__(
        self, model: LlamaCppModel, config: SchedulerConfig, threads: int = 0, flash_attn: str = "auto"
    ) -> None:
        llama = self._llama = model._llama
        self.model = model
        # tokens one step may feed; llama.cpp aborts (no error return) on a context whose batch is smaller
        # than its sequence count, so never below LLAMA_MAX_SEQ
        self.capacity = max(LLAMA_MAX_SEQ, config.max_prefill_tokens + config.max_batch_size)
        params = llama.llama_context_default_params()
        params.n_ctx = config.max_batch_total_tokens  # the live rows' budget: cached prefixes are in host memory
        params.n_batch = self.capacity
        params.n_ubatch = min(512, self.capacity)
        params.n_seq_max = LLAMA_MAX_SEQ
        params.kv_unified = True  # one cell pool: seq_cp shares cells instead of copying them
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.no_perf = True
        _log_tail.clear()
        self.context = llama.llama_init_from_model(model.pointer, params)
        if not self.context:
            said = "; ".join(_log_tail[-3:]) or "no reason given"
            raise FailedPrecondition(
                f"llama.cpp could not make a context of {params.n_ctx} tokens for {model.path}: {said}"
                " (lower --max-batch-total-tokens)"
            )
        self.kv = llama.llama_get_memory(self.context)
        self.batch = llama.llama_batch_init(self.capacity, 0, 1)
        self.kv_cells = int(params.n_ctx)
        self.layout: StateLayout | None = None  # how this context saves a sequence (read from the first save)
        logger.info(
            "llama.cpp context for {}: {} KV cells ({:.0f} MiB), {} threads, flash attention {}, batches of up to"
            " {} tokens; prefix cache in host memory, up to {:.0f} MiB",
            model.path.name,
            self.kv_cells,
            self.kv_cells * model.kv_bytes_per_token / 2**20,
            params.n_threads,
            flash_attn,
            self.capacity,
            config.prefix_cache_bytes / 2**20,
        )
        self._reset_state()

    def _reset_state(self) -> None:
        self.slots = _Slots()
        self.scratch = self.slots.take()  # where a store tags a row's cells to save them from
        self.rows: list[int] = []  # the running batch: each row's sequence id, in the scheduler's row order
        self.lengths: dict[int, int] = {}  # sequence id -> positions it holds (its next token's position)
        self.joining: list[_Joining] = []
        self.nodes: dict[int, SavedKV] = {}  # prefix-cache node id -> its KV in host memory
        self._joined = np.empty(0, np.uint8)  # see _join_buffer

    @property
    def cached_bytes(self) -> int:
        """Host memory the prefix cache's nodes hold."""
        return sum(node.nbytes for node in self.nodes.values())

    def memory(self) -> RunnerMemory:
        # a row leaving is seq_rm, which copies nothing: the scheduler drops finished rows at once; a saved
        # token holds what a pool cell does (float16 keys and values), so the tree's bytes are the host's
        return RunnerMemory(self.model.kv_bytes_per_token, free_row_drops=True)

    def apply_cache_ops(self, ops: Sequence[CacheOp]) -> None:
        for op in ops:
            self._apply(op)

    def keep_rows(self, rows: Sequence[int]) -> None:
        kept = set(rows)
        for row, seq in enumerate(self.rows):
            if row not in kept:
                self._drop(seq)
        self.rows = [self.rows[row] for row in rows]

    def forward(self, decode: Sequence[DecodeRow], prefill: PrefillChunk | None) -> torch.Tensor | None:
        assert len(self.rows) == len(decode) or not decode, "rows out of step"
        fed, outputs = 0, 0
        for seq, row in zip(self.rows, decode, strict=False):
            if row.rejected:
                self._forget_last(seq, row.rejected)
            for token in (row.token, *row.draft):
                self._add(fed, token, seq, logits=True)
                fed, outputs = fed + 1, outputs + 1
        if prefill is not None:
            if prefill.prompts:
                self._start_group(prefill)
            for row in self.joining:
                for column in range(max(prefill.start, row.first_column), prefill.end):
                    last = prefill.last and column == prefill.end - 1  # the prompt's last token: its logits are sampled
                    self._add(fed, row.tokens[column - row.first_column], row.seq, logits=last)
                    fed, outputs = fed + 1, outputs + last
        if fed == 0:
            return None
        self._decode(fed)
        logits = self._logits(outputs)
        if prefill is not None and prefill.last:
            self.rows += [row.seq for row in self.joining]
            self.joining = []
        return logits

    def reset(self) -> None:
        self._llama.llama_memory_clear(self.kv, True)
        self._reset_state()

    # -- the steps -------------------------------------------------------------------------------------

    def _apply(self, op) -> None:
        """One prefix-cache decision, on the nodes' saved cells in host memory."""
        if isinstance(op, StoreKV):
            llama, memory = self._llama, self.kv
            llama.llama_memory_seq_cp(memory, self.rows[op.row], self.scratch, op.start, op.end)
            try:
                self.nodes[op.node] = self._save(self.scratch)
            finally:
                llama.llama_memory_seq_rm(memory, self.scratch, -1, -1)
        elif isinstance(op, SplitKV):
            saved = self.nodes[op.node]
            self.nodes[op.new] = saved.part(op.at, saved.cells, copy=True)
            self.nodes[op.node] = saved.part(0, op.at, copy=True)
        elif isinstance(op, EvictKV):
            del self.nodes[op.node]
        else:
            raise TypeError(f"unknown cache operation {op!r}")

    def _start_group(self, chunk) -> None:
        """Each prompt gets a sequence, starting from the cached prefix it reuses; its own tokens sit in
        the group's columns as ``PrefillJob`` lays them out (right-aligned to the group's width)."""
        reuse = chunk.reuse or [None] * len(chunk.prompts)
        cached = [r.tokens if r is not None else 0 for r in reuse]
        if not self.lengths:
            # Nothing is live: every cell is free, but llama.cpp's allocation head stays where the last rows
            # ended, and a restored prefix is placed from the head, past that gap. Attention covers every
            # cell up to the last one used, so each step over the gap cost as if the pool held both: turn
            # 10 of a conversation (275 new tokens after 3.5k cached) prefilled in 3.25 s against 2.3 s.
            self._llama.llama_memory_clear(self.kv, False)
        width = chunk.start + max(len(p) - c for p, c in zip(chunk.prompts, cached, strict=True))
        self.joining = []
        for prompt, used, taken in zip(chunk.prompts, reuse, cached, strict=True):
            seq = self.slots.take()
            if used is not None and used.tokens:
                self._take_prefix(seq, prompt, used, chunk.prompts)
            rest = list(prompt[taken:])
            self.joining.append(_Joining(seq, rest, width - len(rest), taken))
            self.lengths[seq] = taken

    def _take_prefix(self, seq: int, prompt: Sequence[int], used: Reuse, prompts: Sequence[Sequence[int]]) -> None:
        """Puts the cached prefix ``used`` into ``seq``: shared with an earlier row of the group (``prompts``,
        ``self.joining`` so far) that holds the same tokens already (``seq_cp`` tags its cells, copying
        nothing), else restored from host memory."""
        head = prompt[: used.tokens]
        for row, other in zip(self.joining, prompts, strict=False):
            if row.cached >= used.tokens and other[: used.tokens] == head:
                self._llama.llama_memory_seq_cp(self.kv, row.seq, seq, 0, used.tokens)
                return
        parts = [self.nodes[node].part(0, tokens) for node, tokens in used.segments]
        self._restore(seq, join_state(self._state_layout(), parts, self._join_buffer(parts)))

    def _join_buffer(self, parts: Sequence[SavedKV]) -> np.ndarray:
        """Where a restored prefix is joined: one buffer, grown to the longest prefix restored so far (at most
        twice that, never more than the pool holds) and reused. A new array each time made every restore
        fault in fresh pages: joining a 3.5k-token conversation (76 MiB) took 180-245 ms into new memory,
        15 ms into memory already touched, and the restore itself 10 ms, so most of a long conversation's
        cache hit went to the kernel zeroing pages."""
        layout = self._state_layout()
        needed = state_size(layout, sum(part.cells for part in parts))
        if self._joined.size < needed:  # doubled, as a conversation grows turn by turn, up to the whole pool
            self._joined = np.empty(
                max(needed, min(2 * self._joined.size, state_size(layout, self.kv_cells))), np.uint8
            )
        return self._joined

    def _save(self, seq: int) -> SavedKV:
        """``seq``'s cells, copied out of the pool into host memory."""
        llama = self._llama
        size = llama.llama_state_seq_get_size(self.context, seq)
        data = np.empty(size, np.uint8)
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if size == 0 or llama.llama_state_seq_get_data(self.context, pointer, size, seq) != size:
            raise RuntimeError(f"llama.cpp could not save sequence {seq} ({size} bytes)")
        try:
            layout, saved = parse_state(data)
        except StateFormatError as error:
            raise RuntimeError(f"llama.cpp saved a sequence in a layout this runner does not read: {error}") from None
        self.layout = self.layout or layout
        return saved.part(0, saved.cells, copy=True)  # its own arrays: llama.cpp's cell table is not kept

    def _state_layout(self) -> StateLayout:
        assert self.layout is not None, "a prefix is reused before any was saved"
        return self.layout

    def _restore(self, seq: int, data: np.ndarray) -> None:
        """Loads a saved sequence into ``seq`` (which it replaces), into any free cells (llama.cpp 0.3.36 needs
        no unbroken run). The scheduler admits a row only when its prompt and answer fit the pool, so this
        fails only if a runner bug overfilled it."""
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if self._llama.llama_state_seq_set_data(self.context, pointer, data.size, seq) != data.size:
            raise ResourceExhausted(f"llama.cpp found no room in its {self.kv_cells} KV cells for a cached prefix")

    def _add(self, index: int, token: int, seq: int, logits: bool) -> None:
        if index >= self.capacity:  # llama_batch_init's arrays end there: never write past them
            raise ResourceExhausted(f"a step fed more than the {self.capacity} tokens llama.cpp's batch holds")
        batch = self.batch
        batch.token[index] = token
        batch.pos[index] = self.lengths[seq]
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq
        batch.logits[index] = logits
        self.lengths[seq] += 1

    def _decode(self, tokens: int) -> None:
        self.batch.n_tokens = tokens
        status = self._llama.llama_decode(self.context, self.batch)
        if status == 1:
            raise ResourceExhausted(
                f"llama.cpp found no room for {tokens} tokens in its {self.kv_cells} KV cells"
                " (raise --max-batch-total-tokens or lower --prefix-cache-bytes)"
            )
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _logits(self, rows: int) -> torch.Tensor | None:
        """The asked-for rows' logits, in batch order (llama.cpp returns them that way), copied out."""
        if rows == 0:
            return None
        pointer = self._llama.llama_get_logits(self.context)
        array = np.ctypeslib.as_array(pointer, shape=(rows, self.model.vocab_size))
        return torch.from_numpy(array.copy())

    def _forget_last(self, seq: int, tokens: int) -> None:
        self.lengths[seq] -= tokens
        self._llama.llama_memory_seq_rm(self.kv, seq, self.lengths[seq], -1)

    def _drop(self, seq: int) -> None:
        self._llama.llama_memory_seq_rm(self.kv, seq, -1, -1)
        self.lengths.pop(seq, None)
        self.slots.give(seq)

    def __del__(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None and getattr(self, "context", None):
            llama.llama_batch_free(self.batch)
            llama.llama_free(self.context)
            self.context = None
