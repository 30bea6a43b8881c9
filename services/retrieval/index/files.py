"""Where an index's files live and how they are written so a crash never leaves half of one: ``index_folder``
maps a name to its folder, ``create_index`` makes an empty index in a hidden sibling and renames it into place
(``move_into_place``, ``remove_leftovers``), ``WriterLock`` keeps a second writer out, ``write_vectors`` and
``write_manifest_copy`` replace a file atomically, and ``describe_file`` gives the size and digest a segment
is checked against."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import xxhash

from services.common.errors import FailedPrecondition
from services.common.paths import VarLayout
from services.retrieval.index.factory import empty_index
from services.retrieval.index.manifest import (
    MANIFEST_FILE,
    STORE_FILE,
    IndexLoadError,
    IndexSettings,
    Manifest,
    Segment,
    now,
)
from services.retrieval.store import PassageStore


def index_folder(name_or_path: str | Path, layout: VarLayout) -> Path:
    """A bare name ("wikipedia-en") lives under var/indexes/; anything with a slash is a path."""
    text = str(name_or_path)
    if "/" in text or os.sep in text or text in (".", ".."):
        return Path(text).expanduser().resolve()
    return layout.indexes / text


def write_vectors(vectors: faiss.Index, path: Path, first_row: int, end_row: int) -> Segment:
    temporary = path.with_suffix(".partial")
    faiss.write_index(vectors, str(temporary))
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(path.parent)
    size, digest = describe_file(path)
    return Segment(path.name, size, digest, int(vectors.ntotal), first_row, end_row)


def write_manifest_copy(folder: Path, manifest: Manifest) -> None:
    temporary = folder / f".{MANIFEST_FILE}.partial"
    temporary.write_text(json.dumps(manifest.to_state(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST_FILE)


def describe_file(path: Path, algorithm: str = "xxh3_128") -> tuple[int, str]:
    """Size and digest of a file. xxh3 hashes at memory speed (~10 GB/s; sha256 ~1 GB/s, which made opening
    a 1M-vector index cost seconds); format 2's sha256 digests are still checked as sha256."""
    digest = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return path.stat().st_size, f"{algorithm}:{digest.hexdigest()}"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class WriterLock:
    """One process writes an index (by name) at a time: an flock on a file beside the folder, held while open."""

    def __init__(self, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        self._file = (folder.parent / f".{folder.name}.lock").open("w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise IndexLoadError(
                f"another process is writing the retrieval index at {folder}; stop it, or open the index read-only"
            ) from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def create_index(
    destination: Path,
    embedder: str,
    dimension: int,
    settings: IndexSettings = IndexSettings(),  # noqa: B008 -- frozen, so one shared default is safe
    details: dict[str, Any] | None = None,
    replace_existing: bool = False,
) -> Path:
    """Makes an empty index at ``destination`` atomically: a hidden sibling folder renamed into place."""
    empty_index(settings.factory, dimension)  # refuses a factory faiss does not know before anything is written
    parent = destination.parent
    remove_leftovers(destination)
    temporary = parent / f".{destination.name}.building-{os.getpid()}"
    temporary.mkdir()
    try:
        manifest = Manifest(
            embedder=embedder,
            dimension=dimension,
            passages=0,
            documents=0,
            factory=settings.factory,
            created=now(),
            updated=now(),
            details=details or {},
        )
        store = PassageStore.open(temporary / STORE_FILE)
        store.commit(manifest.to_state())
        store.checkpoint()
        store.close()
        write_manifest_copy(temporary, manifest)
        _fsync(temporary)
        move_into_place(temporary, destination, replace_existing)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return destination


def remove_leftovers(destination: Path) -> None:
    """Deletes what interrupted builds of ``destination`` left beside it (hidden building/replaced folders)."""
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{destination.name}.building-*", f".{destination.name}.replaced-*"):
        for leftover in parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def move_into_place(temporary: Path, destination: Path, replace_existing: bool) -> None:
    # rename(2) cannot replace a non-empty folder: move the old index aside first, delete it after.
    if destination.exists():
        if not replace_existing:
            raise FailedPrecondition(f"an index already exists at {destination}")
        aside = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        os.replace(destination, aside)
        os.replace(temporary, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(temporary, destination)
    _fsync(destination.parent)
