"""Time BM25 scoring of 32 queries against the ml-1m catalogue: rank_bm25 (reference) vs BM25Index.

    .venv/bin/python benchmarks/bm25_speed.py

Queries are item texts of 32 random items (seed 0), as CALRec's generated next-item texts would be.
Prints both timings (median of repeated runs), the speed-up and the largest absolute score difference.
"""

import platform
import random
import statistics
import time

import numpy as np
from rank_bm25 import BM25Okapi

import recbole_llm  # noqa: F401
from recbole_llm.data import ItemTextBuilder, ensure_dataset_files, read_item_table
from recbole_llm.retrieval import BM25Index, tokenize


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(n_queries: int = 32, data_path: str = "dataset/ml-1m") -> None:
    folder = ensure_dataset_files("ml-1m", data_path)
    table = read_item_table(folder / "ml-1m.item")
    builder = ItemTextBuilder(fields={"Title": "movie_title", "Genres": "genre", "Year": "release_year"})
    texts = builder.render_rows(table, "item_id")
    corpus = [tokenize(t) for t in texts]
    queries = [tokenize(t) for t in random.Random(0).sample(texts, n_queries)]

    start = time.perf_counter()
    reference = BM25Okapi(corpus)
    build_ref = time.perf_counter() - start
    expected = np.stack([reference.get_scores(q) for q in queries])
    score_ref = median_seconds(lambda: [reference.get_scores(q) for q in queries], repeats=5)

    start = time.perf_counter()
    index = BM25Index(corpus)
    build_ours = time.perf_counter() - start
    actual = index.scores(queries)
    score_ours = median_seconds(lambda: index.scores(queries), repeats=50)

    print(f"ml-1m catalogue: {len(corpus)} items, {n_queries} queries; machine: {platform.processor() or platform.machine()}")
    print(f"rank_bm25 BM25Okapi: build {build_ref:.3f} s, score {score_ref * 1000:.1f} ms")
    print(f"BM25Index (sparse):  build {build_ours:.3f} s, score {score_ours * 1000:.2f} ms")
    print(f"scoring speed-up: {score_ref / score_ours:.0f}x; max |difference|: {np.abs(actual - expected).max():.2e}")


if __name__ == "__main__":
    main()
