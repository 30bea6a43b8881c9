"""The faiss indexes segments are made of: ``empty_index`` builds one from a factory string (always under an
IDMap, so the ids faiss returns are store rows) and ``apply_search_params`` tunes a loaded one. Both turn
faiss' errors into InvalidArgument messages that say what to pass instead."""

from __future__ import annotations

import faiss

from services.common.errors import InvalidArgument


def empty_index(factory: str, dimension: int) -> faiss.Index:
    try:
        return faiss.index_factory(dimension, _with_id_map(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InvalidArgument(
            f"faiss cannot make an index from the factory string {factory!r}: {str(error).strip()}"
        ) from error


def _with_id_map(factory: str) -> str:
    # Store rows are the ids faiss returns; IDMap2 gives every index type add_with_ids and reconstruct.
    return factory if factory.startswith("IDMap") else f"IDMap2,{factory}"


def apply_search_params(vectors: faiss.Index, search_params: str) -> None:
    if not search_params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(vectors, search_params)
    except RuntimeError as error:
        raise InvalidArgument(
            f"search parameters {search_params!r} do not apply to this index ({str(error).strip()}); "
            "use nprobe=N for IVF indexes, efSearch=N for HNSW"
        ) from error


def keep_reconstructible(vectors: faiss.Index) -> None:
    """Lets a segment give back a row's vector (hybrid search scores a passage found by its words with it): an
    IVF segment's lists cannot find a row without a direct map, 8 bytes a vector. Never written to its file."""
    ivf = faiss.try_extract_index_ivf(vectors)
    if ivf is not None:
        ivf.make_direct_map()
