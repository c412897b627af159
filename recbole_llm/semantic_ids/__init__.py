"""Semantic item IDs: residual codebooks (quantizer) and code tokens (tokens). Decoding constrained to the
catalogue's codes is :mod:`recbole_llm.llm.token_trie`, shared with every method that writes items as tokens."""

from recbole_llm.semantic_ids.quantizer import CodebookStats, learn_semantic_ids, random_semantic_ids
from recbole_llm.semantic_ids.tokens import CodeVocabulary, code_token_names

__all__ = ["CodebookStats", "CodeVocabulary", "code_token_names", "learn_semantic_ids", "random_semantic_ids"]
