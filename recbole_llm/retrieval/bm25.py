"""BM25 (Okapi, ATIRE idf with an epsilon floor) as sparse-matrix algebra.

Scores are identical to ``rank_bm25.BM25Okapi`` (the reference; a test checks equality to 1e-6), but a
batch of queries is one sparse product instead of a Python loop over query terms and documents:

    W[d, v] = idf(v) * tf(v, d) * (k1 + 1) / (tf(v, d) + k1 * (1 - b + b * |d| / avgdl))
    scores  = Q @ W.T,    Q[q, v] = count of term v in query q

with ``idf(v) = log(N - n_v + 0.5) - log(n_v + 0.5)``, negative values replaced by ``epsilon * mean idf``
(rank_bm25's floor). CALRec ranks items by BM25 between generated item texts and the catalogue (CALRec §3.4).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _TOKEN.findall(text.lower())


class BM25Index:
    """A BM25 index over tokenised documents; ``scores(queries)`` returns a dense ``[n_queries, n_docs]`` array."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.vocabulary: dict[str, int] = {}
        tf = self._count_matrix(documents, grow=True).tocsc().astype(np.float64)  # [n_docs, V]
        n_docs = tf.shape[0]
        doc_len = np.asarray(tf.sum(axis=1)).ravel()
        doc_freq = np.diff(tf.indptr)  # documents containing each term (CSC column counts)
        idf = np.log(n_docs - doc_freq + 0.5) - np.log(doc_freq + 0.5)
        idf[idf < 0] = epsilon * idf.mean()
        self.avgdl = doc_len.mean()
        norm = k1 * (1 - b + b * doc_len / self.avgdl)  # per document
        tf = tf.tocoo()
        weights = idf[tf.col] * tf.data * (k1 + 1) / (tf.data + norm[tf.row])
        # [n_docs, V], column-compressed so that a batch only touches the columns of its query terms
        self.weights = sp.csc_matrix((weights, (tf.row, tf.col)), shape=tf.shape)
        self.idf = idf

    def _count_matrix(self, token_lists: Sequence[Sequence[str]], grow: bool) -> sp.csr_matrix:
        """Term counts ``[len(token_lists), V]``; with ``grow`` unseen tokens extend the vocabulary."""
        rows, cols = [], []
        for row, tokens in enumerate(token_lists):
            for token in tokens:
                column = self.vocabulary.get(token)
                if column is None:
                    if not grow:
                        continue  # a query term absent from the corpus scores 0 everywhere
                    column = self.vocabulary[token] = len(self.vocabulary)
                rows.append(row)
                cols.append(column)
        data = np.ones(len(rows), dtype=np.float64)
        # duplicates are summed: a repeated query term counts twice, as in rank_bm25
        return sp.csr_matrix((data, (rows, cols)), shape=(len(token_lists), len(self.vocabulary)))

    def scores(self, queries: Sequence[Sequence[str]]) -> np.ndarray:
        """BM25 score of every document for every tokenised query: ``[len(queries), n_docs]``."""
        counts = self._count_matrix(queries, grow=False).tocsc()
        terms = np.flatnonzero(np.diff(counts.indptr))  # vocabulary columns the batch uses
        if terms.size == 0:
            return np.zeros((len(queries), self.weights.shape[0]))
        # sparse [n_docs, k] @ dense [k, n_queries]: memory grows with the batch's terms, not the vocabulary
        return np.asarray(self.weights[:, terms] @ counts[:, terms].toarray().T).T

    def self_scores(self, queries: Sequence[Sequence[str]]) -> np.ndarray:
        """BM25 of each query against itself as a document of this corpus: the score of a document that says exactly
        what the query says. Query terms absent from the corpus count with the idf of a term no document has, so a
        made-up word is evidence that no item explains. Dividing by it keeps absolute evidence, where min-max
        normalisation stretches even a query that matches nothing but common words over [0, 1]."""
        n_docs = self.weights.shape[0]
        unseen_idf = np.log(n_docs + 0.5) - np.log(0.5)
        out = np.zeros(len(queries))
        for row, tokens in enumerate(queries):
            norm = self.k1 * (1 - self.b + self.b * len(tokens) / self.avgdl)
            for token, tf in Counter(tokens).items():
                column = self.vocabulary.get(token)
                idf = unseen_idf if column is None else self.idf[column]
                out[row] += idf * tf * tf * (self.k1 + 1) / (tf + norm)
        return out
