"""Retrieval service: corpus -> chunker -> embedder -> index (faiss + PassageStore) -> Retriever -> gRPC server."""
