"""A cross-encoder that reads the query and a passage together and scores how well the passage answers it:
slower than a vector comparison (one forward per pair), so it reorders only the top of a search."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class RerankerLoadError(Exception):
    """The cross-encoder could not be loaded."""


class Reranker:
    """A sentence-transformers CrossEncoder, from a folder or a hub id; scores in 0..1 for one-label models."""

    def __init__(self, name_or_path: str, device: str = "cpu") -> None:
        from sentence_transformers import CrossEncoder  # torch and transformers load only when one is asked for

        try:
            self._model = CrossEncoder(name_or_path, device=device)
        except (OSError, ValueError) as error:
            raise RerankerLoadError(
                f"could not load the reranker {name_or_path!r} as a sentence-transformers CrossEncoder: {error}"
            ) from error
        self.name = Path(name_or_path).name if Path(name_or_path).is_dir() else name_or_path

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """Each document's relevance to ``query``, in the documents' order."""
        if not documents:
            return np.empty(0, dtype=np.float32)
        scores = self._model.predict([(query, document) for document in documents], show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32).reshape(len(documents))

    def count_tokens(self, query: str, documents: list[str]) -> int:
        """The tokens the pairs take, as the model reads them (truncated to its length)."""
        encoded = self._model.tokenizer(
            [query] * len(documents), documents, truncation=True, max_length=self._model.max_length
        )
        return sum(len(ids) for ids in encoded["input_ids"])
