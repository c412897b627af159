"""Retrieval and reranking: BM25 over item texts (more to come: faiss dense index, rerankers)."""

from recbole_llm.retrieval.bm25 import BM25Index, tokenize

__all__ = ["BM25Index", "tokenize"]
