"""A passage index on disk that can be fed while it serves: faiss vector segments plus the passage store.

Layout of ``var/indexes/<name>/``:
  ``passages.sqlite``       the PassageStore, the tombstones of removed passages, and the committed state: which
                            segment files are current, counts, the embedder, the faiss factory; the staged
                            passages a build has not embedded yet
  ``words/``                the keyword index (tantivy), committed after each store transaction with the version
                            the store counted for it; read again from the store when the two differ
  ``vectors-<n>.faiss``     one segment: the vectors one commit added (ids are store rows, never reused); a
                            segment is written once and never changed
  ``trained-<n>.faiss``     IVF/PQ factories only: the empty index trained at the first commit, cloned for every
                            later segment so all segments share one quantizer and their scores compare
  ``manifest.json``         a readable copy of the committed state, rewritten after each commit (never read)

A commit costs what it adds: it writes one new segment file (its passages' vectors) and fsyncs it, then one SQLite
transaction adds the passages, turns removed passages into tombstones and appends the segment to the state. No
existing file is read or rewritten. A crash before the transaction leaves the new file an orphan (removed at the
next writable open); after it, the commit is whole. Searches query every segment and merge the per-segment top-k,
skipping tombstones. Compaction (``compact``, explicit or in the background past a segment threshold) merges the
segments into one, drops the tombstoned vectors, and commits that the same way.
A new index is made in a hidden sibling folder and renamed into place, so a folder that exists is complete.

Modules, by what they hold:
  ``manifest``       file names, format constants, IndexSettings, Segment and Manifest (the committed state)
  ``files``          the folder an index name maps to, creating an index atomically, the writer lock, durable writes
  ``factory``        faiss indexes from a factory string, and search parameters applied to them
  ``search``         the view a search sees, and the search of every segment with the merge of their top lists
  ``words``          the keyword index (tantivy, in words/): the passages' words, bm25 searches of a question
  ``compaction``     merging segments into one without the tombstoned vectors
  ``passage_index``  PassageIndex: searches, commits and compaction of an open index
  ``loading``        load_index: checks and opens an index, migrating format 2
"""

from services.retrieval.index.files import WriterLock, create_index, index_folder, move_into_place, remove_leftovers
from services.retrieval.index.loading import load_index
from services.retrieval.index.manifest import (
    DEFAULT_INDEX_NAME,
    FORMAT_VERSION,
    INDEX_FACTORY,
    MANIFEST_FILE,
    STORE_FILE,
    IndexLoadError,
    IndexSettings,
)
from services.retrieval.index.passage_index import Change, PassageIndex
from services.retrieval.index.search import Hit

__all__ = [
    "DEFAULT_INDEX_NAME",
    "FORMAT_VERSION",
    "INDEX_FACTORY",
    "MANIFEST_FILE",
    "STORE_FILE",
    "Change",
    "Hit",
    "IndexLoadError",
    "IndexSettings",
    "PassageIndex",
    "WriterLock",
    "create_index",
    "index_folder",
    "load_index",
    "move_into_place",
    "remove_leftovers",
]
