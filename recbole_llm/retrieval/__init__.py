"""Retrieval and reranking: BM25 over item texts, and history selection by similarity and recency."""

from recbole_llm.retrieval.bm25 import BM25Index, tokenize
from recbole_llm.retrieval.history import SELECTIONS, history_similarity, select_history

__all__ = ["BM25Index", "SELECTIONS", "history_similarity", "select_history", "tokenize"]
