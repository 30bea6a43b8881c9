"""Cached prefixes in host memory for the llama.cpp runner: one sequence's KV as llama.cpp saves it
(``llama_state_seq_get_data``), held as numpy arrays so that a prefix-tree node can be cut, a match can end
inside a node and a path of nodes can go back into the pool as one ``llama_state_seq_set_data`` call.

The saved state of one sequence in a unified pool (llama.cpp's ``llama_kv_cache::state_write``, the build
of llama-cpp-python 0.3.36) is, little-endian:

    u32 magic, u32 sequence id           (checked on load: the id is not, a state goes into any sequence)
    u32 streams (1: one unified pool), u32 cells
    cells x (i32 position, u32 sequence count = 1, i32 sequence id)
    u32 values transposed, u32 layers
    layers x (i32 type, u64 row bytes, cells x row bytes)                         keys
    layers x (i32 type, u64 row bytes, cells x row bytes)                         values, or when transposed:
    layers x (i32 type, u32 element bytes, u32 width, width x cells x element bytes)

Every data block is read here as an array (outer, cells, width): keys and values (1, cells, row bytes),
transposed values (width, cells, element bytes), so cutting and joining cells is the same slice for all.
A layout that does not add up to the size llama.cpp wrote is refused (``StateFormatError``), never guessed at.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

_CELL = np.dtype([("pos", "<i4"), ("count", "<u4"), ("seq", "<i4")])
_PREAMBLE = 8  # u32 magic, u32 sequence id
_BLOCK_HEADER = 12  # (i32, u64) or (i32, u32, u32)


class StateFormatError(ValueError):
    """llama.cpp saved a sequence in a layout this module does not read."""


@dataclass(frozen=True)
class StateLayout:
    """What every saved sequence of one context shares: the preamble and each data block's header and shape."""

    preamble: bytes
    values_transposed: int
    layers: int
    headers: tuple[bytes, ...]  # one per block: every layer's keys, then every layer's values
    shapes: tuple[tuple[int, int], ...]  # (outer, width) of each block; its cells sit between them

    @property
    def bytes_per_cell(self) -> int:
        return sum(outer * width for outer, width in self.shapes)


@dataclass(frozen=True)
class SavedKV:
    """The KV of positions ``start:start + cells`` of one sequence, in position order, in host memory."""

    start: int
    blocks: tuple[np.ndarray, ...]  # per block (outer, cells, width) uint8

    @property
    def cells(self) -> int:
        return self.blocks[0].shape[1] if self.blocks else 0

    @property
    def end(self) -> int:
        return self.start + self.cells

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self.blocks)

    def part(self, start: int, end: int, copy: bool = False) -> SavedKV:
        """Cells ``start:end`` (counted from this one's first); ``copy`` lets the rest be freed."""
        cut = tuple(block[:, start:end] for block in self.blocks)
        if copy:
            cut = tuple(np.ascontiguousarray(block) for block in cut)
        return SavedKV(self.start + start, cut)


def parse_state(data: np.ndarray) -> tuple[StateLayout, SavedKV]:
    """A saved sequence (uint8 array) as its layout and its cells, sorted by position (llama.cpp writes cells
    in pool order, which a row's decode tokens may not follow). The arrays are views into ``data`` unless
    sorting copied them."""
    raw = memoryview(data)
    if len(raw) < _PREAMBLE + 8:
        raise StateFormatError(f"a saved sequence of {len(raw)} bytes is shorter than its header")
    streams, cells = struct.unpack_from("<II", raw, _PREAMBLE)
    if streams != 1 or cells == 0:
        raise StateFormatError(f"expected one stream holding cells, found {streams} streams, {cells} cells")
    offset = _PREAMBLE + 8
    if offset + cells * _CELL.itemsize + 8 > len(raw):
        raise StateFormatError(f"a saved sequence of {len(raw)} bytes is shorter than its {cells} cells")
    meta = data[offset : offset + cells * _CELL.itemsize].view(_CELL)
    offset += cells * _CELL.itemsize
    if np.any(meta["count"] != 1):
        raise StateFormatError("a saved cell belongs to several sequences")
    transposed, layers = struct.unpack_from("<II", raw, offset)
    offset += 8
    headers, shapes, blocks = [], [], []
    for index in range(2 * layers):
        header = bytes(raw[offset : offset + _BLOCK_HEADER])
        if len(header) < _BLOCK_HEADER:
            raise StateFormatError("a saved sequence ends inside a block header")
        if transposed and index >= layers:  # values, transposed: element bytes and width
            element, width = struct.unpack_from("<II", header, 4)
            outer, inner = width, element
        else:
            (row,) = struct.unpack_from("<Q", header, 4)
            outer, inner = 1, row
        offset += _BLOCK_HEADER
        size = outer * cells * inner
        if offset + size > len(raw):
            raise StateFormatError("a saved sequence ends inside a data block")
        blocks.append(data[offset : offset + size].reshape(outer, cells, inner))
        headers.append(header)
        shapes.append((outer, inner))
        offset += size
    if offset != len(raw):
        raise StateFormatError(f"a saved sequence has {len(raw) - offset} bytes after its last block")
    positions = meta["pos"]
    order = np.argsort(positions, kind="stable")
    start = int(positions[order[0]])
    if not np.array_equal(positions[order], np.arange(start, start + cells)):
        raise StateFormatError("a saved sequence's positions are not one unbroken run")
    if not np.array_equal(order, np.arange(cells)):
        blocks = [block[:, order] for block in blocks]
    layout = StateLayout(bytes(raw[:_PREAMBLE]), transposed, layers, tuple(headers), tuple(shapes))
    return layout, SavedKV(start, tuple(blocks))


def state_size(layout: StateLayout, cells: int) -> int:
    """The bytes of one saved sequence of ``cells`` cells."""
    return _PREAMBLE + 8 + cells * (_CELL.itemsize + layout.bytes_per_cell) + 8 + len(layout.headers) * _BLOCK_HEADER


def join_state(layout: StateLayout, parts: Sequence[SavedKV], into: np.ndarray | None = None) -> np.ndarray:
    """One saved sequence (uint8 array, for ``llama_state_seq_set_data``) holding ``parts`` back to back; each
    part must start where the one before it ends. Written into the start of ``into`` when it is large enough
    (the returned array is then a view of it), else into a new array."""
    cells = sum(part.cells for part in parts)
    start = parts[0].start
    for before, after in pairwise(parts):
        if after.start != before.end:
            raise ValueError(f"parts {before.start}:{before.end} and {after.start}:{after.end} leave a gap")
    size = state_size(layout, cells)
    out = into[:size] if into is not None and into.size >= size else np.empty(size, np.uint8)
    out[:_PREAMBLE] = np.frombuffer(layout.preamble, np.uint8)
    out[_PREAMBLE : _PREAMBLE + 8] = np.frombuffer(struct.pack("<II", 1, cells), np.uint8)
    offset = _PREAMBLE + 8
    meta = out[offset : offset + cells * _CELL.itemsize].view(_CELL)  # a view: writing it fills ``out``
    meta["pos"], meta["count"] = np.arange(start, start + cells), 1
    meta["seq"] = struct.unpack_from("<I", layout.preamble, 4)[0]  # as saved; llama.cpp reads the target's instead
    offset += cells * _CELL.itemsize
    out[offset : offset + 8] = np.frombuffer(struct.pack("<II", layout.values_transposed, layout.layers), np.uint8)
    offset += 8
    for index, (header, (outer, inner)) in enumerate(zip(layout.headers, layout.shapes, strict=True)):
        out[offset : offset + _BLOCK_HEADER] = np.frombuffer(header, np.uint8)
        offset += _BLOCK_HEADER
        # rows of cells * inner bytes: transposed values are (width, cells, 2 bytes), and copying them as such
        # went 2 bytes at a time (290 ms to join a 3.4k-token conversation of 18 parts; now one run per row)
        block = out[offset : offset + outer * cells * inner].reshape(outer, cells * inner)
        column = 0
        for part in parts:
            block[:, column * inner : (column + part.cells) * inner] = part.blocks[index].reshape(outer, -1)
            column += part.cells
        offset += outer * cells * inner
    return out
