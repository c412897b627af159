"""Semantic item IDs: residual codebooks (quantizer), code tokens (tokens) and the prefix trie for decoding (trie)."""

from recbole_llm.semantic_ids.quantizer import CodebookStats, learn_semantic_ids, random_semantic_ids
from recbole_llm.semantic_ids.tokens import CodeVocabulary, code_token_names
from recbole_llm.semantic_ids.trie import CodeTrie, TrieConstrainedLogitsProcessor

__all__ = ["CodebookStats", "CodeTrie", "CodeVocabulary", "TrieConstrainedLogitsProcessor", "code_token_names",
           "learn_semantic_ids", "random_semantic_ids"]
