"""The transformers runner: sequences of different lengths decoding as one batch of a transformers model.

Written over the models' own KV cache (transformers' DynamicCache) with left padding and an attention
mask, the way TGI batches models it has no custom kernels for: a batch is one left-padded cache;
a new group joins by padding both to a common length and concatenating rows (``merge``); finished rows
leave by index (``keep_rows``), and columns that became padding for every row are trimmed.

Why not transformers' own continuous batching (``generate_batch``)? Measured on this 2-core CPU it
reached only 0.4x a static batch of 16 for a Llama-135M shape, and for GPT-NeoX it fails ("PagedAttention
Cache.update() missing 1 required positional argument: 'kwargs'"); this path works for both, and on CPU
matches the static batch (see `make bench`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from services.generation.engine.prefix_cache import CacheOp, KVStore, Layers, Reuse
from services.generation.engine.runner import RunnerMemory
from services.generation.engine.scheduler import DecodeRow, PrefillChunk


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); older 5.x only
    # know past_key_values. Asking the signature keeps both working.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None,
    scored: int = 1,
) -> tuple[torch.Tensor, DynamicCache]:
    """One model call; returns the logits of the last ``scored`` columns (batch, scored, vocab) and the grown
    cache."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=scored,
        **{_cache_keyword(type(model)): cache if cache is not None else DynamicCache()},
    )
    new_cache = output["cache"] if "cache" in output else output["past_key_values"]
    return output.logits[:, -scored:, :], new_cache


@dataclass
class KVBatch:
    """Rows decoding together: ``mask`` (rows, columns) marks real tokens in the shared left-padded cache."""

    cache: DynamicCache
    mask: torch.Tensor  # long, 1 = a real token's keys and values, 0 = padding

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def decode_step(self, model: torch.nn.Module, rows: Sequence[DecodeRow], pad_id: int) -> torch.Tensor:
        """Feeds every row its token and draft, the shorter ones right-padded; returns the logits of each
        row's 1 + len(draft) positions, row after row (positions, vocab)."""
        for row, entry in enumerate(rows):
            if entry.rejected:
                self.forget_last(row, entry.rejected)
        if any(entry.rejected for entry in rows):
            self._drop_empty_tail()
        fed = [[entry.token, *entry.draft] for entry in rows]
        width = max(len(tokens) for tokens in fed)
        device = self.mask.device
        ids = torch.tensor([tokens + [pad_id] * (width - len(tokens)) for tokens in fed], device=device)
        new = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in fed], device=device)
        # each new token's index among its row's real tokens
        positions = self.mask.sum(dim=1, keepdim=True) + torch.arange(width, device=device)
        self.mask = torch.cat([self.mask, new], dim=1)
        logits, self.cache = forward(model, ids, self.mask, positions, self.cache, scored=width)
        logits = logits.flatten(0, 1)
        return logits if all(len(tokens) == width for tokens in fed) else logits[new.flatten().bool()]

    def forget_last(self, row: int, tokens: int) -> None:
        """Masks out row ``row``'s last ``tokens`` real tokens: later tokens never attend to them, and
        positions (counted from the mask) go on as if they had never been fed."""
        columns = self.mask[row].nonzero().squeeze(1)[-tokens:]
        self.mask[row, columns] = 0

    def _drop_empty_tail(self) -> None:
        """Cuts the columns at the end that no row holds (refused draft positions of every row), so that refused
        guesses do not leave the cache, and each step's attention, wider; one row alone always gets them back."""
        empty = int((self.mask.sum(dim=0).flip(0) == 0).long().cumprod(0).sum())
        if empty:
            length = self.mask.shape[1] - empty
            self.mask = self.mask[:, :length]
            layers = [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in self.cache.layers]
            self.cache = _cache_from(layers)

    def row_kv(self, row: int, start: int, end: int) -> Layers:
        """Row ``row``'s real tokens ``start:end`` (padding skipped), one (keys, values) per layer."""
        columns = self.mask[row].nonzero().squeeze(1)[start:end]
        return [(layer.keys[row][:, columns], layer.values[row][:, columns]) for layer in self.cache.layers]

    def keep_rows(self, rows: list[int]) -> KVBatch | None:
        """The batch without the other rows (None when no row is left), trimmed of all-padding columns."""
        if not rows:
            return None
        if rows == list(range(self.rows)):
            return self
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        drop = int((mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading columns that are all padding
        layers = [
            (layer.keys.index_select(0, index)[:, :, drop:], layer.values.index_select(0, index)[:, :, drop:])
            for layer in self.cache.layers
        ]
        return KVBatch(_cache_from(layers), mask[:, drop:])


def merge(running: KVBatch | None, joining: KVBatch) -> KVBatch:
    """One batch holding the rows of both: the shorter is left-padded to the longer's length."""
    if running is None:
        return joining
    length = max(running.mask.shape[1], joining.mask.shape[1])
    layers = []
    for ours, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
        keys = torch.cat([_left_pad(ours.keys, length), _left_pad(theirs.keys, length)], dim=0)
        values = torch.cat([_left_pad(ours.values, length), _left_pad(theirs.values, length)], dim=0)
        layers.append((keys, values))
    mask = torch.cat([_left_pad_mask(running.mask, length), _left_pad_mask(joining.mask, length)], dim=0)
    return KVBatch(_cache_from(layers), mask)


@dataclass
class PrefillJob:
    """Prompts entering together: left-padded to one length and run through the model in column chunks,
    so a long prompt shares the engine with decode steps instead of stalling them."""

    input_ids: torch.Tensor  # (rows, prompt columns), left-padded
    mask: torch.Tensor
    done: int = 0  # columns already in the cache
    cache: DynamicCache | None = None

    @classmethod
    def of(
        cls,
        prompts: list[list[int]],
        pad_id: int,
        device: torch.device,
        reuse: tuple[Reuse, ...] = (),
        store: KVStore | None = None,
    ) -> PrefillJob:
        """The group's columns: first each row's cached prefix (``reuse``, read from ``store``) right-aligned
        in as many columns as the longest one, then each row's remaining tokens, left-padded. A row's
        positions come from its mask, so the gap between its prefix and the rest changes nothing."""
        cached = [r.tokens for r in reuse] if reuse else [0] * len(prompts)
        prefix = max(cached)
        width = prefix + max(len(p) - c for p, c in zip(prompts, cached, strict=True))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (prompt, skip) in enumerate(zip(prompts, cached, strict=True)):
            rest = prompt[skip:]
            ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[row, width - len(rest) :] = 1
            mask[row, prefix - skip : prefix] = 1
        job = cls(ids.to(device), mask.to(device), done=prefix)
        if prefix:
            assert store is not None, "a reused prefix needs the prefix cache's store"
            prefixes = [store.read(r.segments) if r.tokens else None for r in reuse]
            job.cache = _cache_from(_stack_prefixes(prefixes, prefix))
        return job

    @property
    def finished(self) -> bool:
        return self.done >= self.input_ids.shape[1]

    def run_columns(self, model: torch.nn.Module, end: int) -> torch.Tensor:
        """Prefills the columns from ``done`` to ``end``; returns the last position's logits."""
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, self.done : end]
        logits, self.cache = forward(
            model, self.input_ids[:, self.done : end], self.mask[:, :end], positions, self.cache
        )
        self.done = end
        return logits[:, -1]

    def into_batch(self) -> KVBatch:
        assert self.cache is not None and self.finished
        return KVBatch(self.cache, self.mask)


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers)


def _stack_prefixes(rows: list[Layers | None], width: int) -> Layers:
    """Per layer (rows, heads, width, head_dim): each row's prefix right-aligned, zeros before it (and for
    a row that reuses nothing)."""
    sample = next(r for r in rows if r is not None)
    layers = []
    for layer, (keys, values) in enumerate(sample):
        heads, _, dim = keys.shape
        stacked_keys = keys.new_zeros((len(rows), heads, width, dim))
        stacked_values = values.new_zeros((len(rows), heads, width, values.shape[-1]))
        for row, prefix in enumerate(rows):
            if prefix is not None:
                k, v = prefix[layer]
                stacked_keys[row, :, width - k.shape[1] :] = k
                stacked_values[row, :, width - v.shape[1] :] = v
        layers.append((stacked_keys, stacked_values))
    return layers


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]  # (rows, heads, columns, head_dim)
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))


class TransformersRunner:
    """Runs steps on a transformers model: the running batch's KV cache and the group being prefilled, the same
    cache operations on every rank. Rank 0 samples from the logits it returns; other ranks discard them."""

    def __init__(self, model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.batch: KVBatch | None = None
        self.prefill: PrefillJob | None = None
        self.prefixes = KVStore()

    def memory(self) -> RunnerMemory:
        # dropping rows copies the batch's cache (the scheduler batches the drops), and the prefix tree may
        # have any number of nodes: only --prefix-cache-bytes bounds it
        return RunnerMemory(kv_bytes_per_token(self.model.config, self.model.dtype))

    @torch.inference_mode()
    def apply_cache_ops(self, ops: Sequence[CacheOp]) -> None:
        for op in ops:
            self.prefixes.apply(op, self._row_kv)

    @torch.inference_mode()
    def keep_rows(self, rows: Sequence[int]) -> None:
        if self.batch is not None:
            self.batch = self.batch.keep_rows(list(rows))

    @torch.inference_mode()
    def forward(self, decode: Sequence[DecodeRow], prefill: PrefillChunk | None) -> torch.Tensor | None:
        outputs = []
        if decode:
            assert self.batch is not None and self.batch.rows == len(decode), "rows out of step"
            outputs.append(self.batch.decode_step(self.model, decode, self.pad_id))
        if prefill is not None:
            if prefill.prompts:
                prompts = [list(p) for p in prefill.prompts]
                self.prefill = PrefillJob.of(prompts, self.pad_id, self.device, prefill.reuse, self.prefixes)
            assert self.prefill is not None and self.prefill.done == prefill.start, "prefill out of step"
            logits = self.prefill.run_columns(self.model, prefill.end)
            if prefill.last:
                outputs.append(logits)
                self.batch = merge(self.batch, self.prefill.into_batch())
                self.prefill = None
        return torch.cat(outputs) if outputs else None

    def reset(self) -> None:
        self.batch, self.prefill = None, None
        self.prefixes.clear()

    def _row_kv(self, row: int, start: int, end: int) -> Layers:
        assert self.batch is not None, "a prefix-cache store from an empty batch"
        return self.batch.row_kv(row, start, end)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token holds across the whole model (all ranks together)."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
