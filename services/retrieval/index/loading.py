"""Opening an index: ``load_index`` reads the committed state from the store, checks every segment file
against its size and digest and the counts against each other, and refuses with an IndexLoadError that says
what is wrong and how to rebuild (``rebuild_hint``). It migrates format 2 (one vectors file, which becomes the
one segment) in memory, and on a writable open records the migration and removes files that unfinished
commits or compactions left."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
from loguru import logger

from services.retrieval.index.factory import apply_search_params, empty_index, keep_reconstructible
from services.retrieval.index.files import WriterLock, describe_file, write_manifest_copy, write_vectors
from services.retrieval.index.manifest import (
    DEFAULT_INDEX_NAME,
    FORMAT_VERSION,
    MIGRATABLE_FORMATS,
    STORE_FILE,
    IndexLoadError,
    IndexSettings,
    Manifest,
    Segment,
    trained_file_name,
)
from services.retrieval.index.passage_index import PassageIndex
from services.retrieval.index.search import LoadedSegment, SearchView, dead_in
from services.retrieval.store import PassageStore, StoreDamagedError


def rebuild_hint(folder: Path) -> str:
    if folder.parent.name == "indexes":
        command = f"python -m services.retrieval build-default --name {folder.name} --var-dir {folder.parent.parent}"
        make_up = " (`make up` builds the default one)" if folder.name == DEFAULT_INDEX_NAME else ""
        return (
            f"build it with `{command}`{make_up}, or start an empty one to feed with "
            f"`python -m services.retrieval serve --index {folder.name} --create`"
        )
    return "rebuild it (`python -m services.retrieval build-default` builds the default corpus under var/)"


def load_index(folder: Path, settings: IndexSettings | None = None, writable: bool = False) -> PassageIndex:
    """Opens the last committed state of an index or raises IndexLoadError saying what is wrong.

    ``writable`` takes the index's writer lock (held until ``close``), clears what unfinished commits left and
    records a migrated older format (read-only opens migrate in memory only)."""

    def refuse(problem: str) -> IndexLoadError:
        return IndexLoadError(f"retrieval index at {folder} {problem}; {rebuild_hint(folder)}")

    if not folder.is_dir():
        raise refuse("does not exist")
    if not (folder / STORE_FILE).is_file():
        if (folder / "index.faiss").is_file():  # format 1 kept its state in manifest.json, not in the store
            raise refuse("was written by an older nightcap (format 1); rebuild it")
        raise refuse(f"is incomplete: it has no {STORE_FILE}")
    try:
        store = PassageStore.open(folder / STORE_FILE)
    except StoreDamagedError as error:
        raise refuse(f"is damaged: {STORE_FILE} could not be read ({error})") from error
    try:
        state = store.read_state()
        if state is None:
            raise refuse(f"is incomplete: {STORE_FILE} holds no committed state")
        migrated_from = state.get("format")
        if migrated_from in MIGRATABLE_FORMATS:
            state = _migrate_format_2(state)
        elif migrated_from != FORMAT_VERSION:
            raise refuse(f"has format {migrated_from}, this code reads {FORMAT_VERSION}")
        else:
            migrated_from = None
        try:
            manifest = Manifest.from_state(state)
        except TypeError as error:
            raise refuse(f"has a state this code cannot read ({error})") from error
        settings = settings or IndexSettings(factory=manifest.factory)
        if settings.factory != manifest.factory:
            settings = replace(settings, factory=manifest.factory)
        dead = frozenset(store.dead_rows())
        segments = tuple(
            LoadedSegment(segment, _read_vectors(folder, segment, settings, refuse), dead_in(segment, dead))
            for segment in manifest.segments
        )
        template = _read_vectors(folder, manifest.trained, replace(settings, mmap=False), refuse) if manifest.trained \
            else None  # fmt: skip
        if migrated_from is not None and segments and not empty_index(manifest.factory, manifest.dimension).is_trained:
            template = faiss.read_index(str(folder / segments[0].segment.file))  # in memory, even when mapped
            template.reset()  # keeps what training learned, drops the vectors
        vectors = sum(s.vectors.ntotal for s in segments)
        counts = (vectors, store.count_passages(), store.count_documents(), len(dead))
        expected = (manifest.passages + manifest.dead_rows, manifest.passages, manifest.documents, manifest.dead_rows)
        wrong_dimension = [s.segment.file for s in segments if s.vectors.d != manifest.dimension]
        if counts != expected or wrong_dimension or any(s.vectors.ntotal != s.segment.vectors for s in segments):
            raise refuse(
                f"is inconsistent: its {len(segments)} segments hold {counts[0]} vectors, the store "
                f"{counts[1]} passages of {counts[2]} documents and {counts[3]} tombstones, its state says "
                f"{manifest.passages} of {manifest.documents} with {manifest.dead_rows} tombstones"
                + (f"; {', '.join(wrong_dimension)} not of dimension {manifest.dimension}" if wrong_dimension else "")
            )
        for loaded in segments:
            apply_search_params(loaded.vectors, settings.search_params)
            keep_reconstructible(loaded.vectors)
    except BaseException:
        store.close()
        raise
    writer = None
    if writable:
        try:
            writer = WriterLock(folder)
        except BaseException:
            store.close()
            raise
        if migrated_from is not None:
            manifest = _record_migration(folder, store, manifest, template, migrated_from)
        _remove_orphans(folder, manifest)
    return PassageIndex(folder, manifest, SearchView(segments, dead), template, store, settings, writer)


def _migrate_format_2(state: dict[str, Any]) -> dict[str, Any]:
    """Format 2 kept one vectors file holding every vector: it becomes the one segment of format 3."""
    state = dict(state)
    file, size, sha256 = state.pop("vectors_file"), state.pop("vectors_bytes"), state.pop("vectors_sha256")
    vectors = state["passages"] + state.get("dead_rows", 0)
    number = int(file.removeprefix("vectors-").removesuffix(".faiss"))
    state["segments"] = [
        {"file": file, "bytes": size, "digest": f"sha256:{sha256}", "vectors": vectors, "first_row": 0,
         "end_row": state.get("next_row", 0)}
    ] if vectors else []  # fmt: skip
    state.update(format=FORMAT_VERSION, next_file=number + 1, trained=None)
    return state


def _record_migration(
    folder: Path, store: PassageStore, manifest: Manifest, template: faiss.Index | None, old_format: int
) -> Manifest:
    if template is not None:
        trained = write_vectors(template, folder / trained_file_name(manifest.next_file), 0, 0)
        manifest = replace(manifest, trained=trained, next_file=manifest.next_file + 1)
    store.commit(manifest.to_state())
    write_manifest_copy(folder, manifest)
    logger.info("migrated the index at {} from format {} to {} (its vectors file is now one segment)",
                folder, old_format, FORMAT_VERSION)  # fmt: skip
    return manifest


def _read_vectors(folder: Path, segment: Segment, settings: IndexSettings, refuse: Any) -> faiss.Index:
    path = folder / segment.file
    algorithm = segment.digest.split(":", 1)[0]
    try:
        actual = describe_file(path, algorithm)
    except OSError as error:
        raise refuse(f"is missing {segment.file} ({error.strerror})") from error
    if actual != (segment.bytes, segment.digest):
        raise refuse(f"is damaged: {segment.file} is not the file its state describes ({actual[0]} bytes, {actual[1]})")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if settings.mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise refuse(f"could not be read: {segment.file}: {error}") from error


def _remove_orphans(folder: Path, manifest: Manifest) -> None:
    # Files of commits and compactions that never reached the store (a crash between the two writes), and
    # segments a compaction replaced but had not deleted yet.
    current = {segment.file for segment in manifest.segments} | ({manifest.trained.file} if manifest.trained else set())
    for pattern in ("vectors-*.faiss", "trained-*.faiss", "*.partial"):
        for path in folder.glob(pattern):
            if path.name not in current and not path.name.startswith("."):
                logger.info("removing {}: left by a commit or compaction that did not finish", path)
                path.unlink(missing_ok=True)
