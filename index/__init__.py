"""Storage: the DuckDB catalog and FAISS indexes. Knows numpy and Arrow, never torch models."""
