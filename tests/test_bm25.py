"""The vectorised BM25 index gives rank_bm25's BM25Okapi scores."""

from pathlib import Path

import numpy as np
import pytest
import recbole
from rank_bm25 import BM25Okapi

from recbole_llm.data import ItemTextBuilder, read_item_table
from recbole_llm.retrieval import BM25Index, tokenize


@pytest.fixture(scope="module")
def ml100k_item_texts():
    table = read_item_table(Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item")
    builder = ItemTextBuilder(fields={"Title": "movie_title", "Genres": "class", "Year": "release_year"})
    return builder.render_rows(table, "item_id")


def test_scores_equal_rank_bm25_on_movielens_titles(ml100k_item_texts):
    corpus = [tokenize(text) for text in ml100k_item_texts]
    queries = [tokenize(q) for q in (
        "Title: Toy Story, Genres: Animation Children's Comedy, Year: 1995",
        "Title: Star Wars Year: 1977 Sci-Fi Sci-Fi",  # a repeated term counts twice
        "Genres: Comedy Romance",
        "a query with words no item has zzzz",
        "",
    )]
    reference = BM25Okapi(corpus)
    expected = np.stack([reference.get_scores(q) for q in queries])
    actual = BM25Index(corpus).scores(queries)
    assert actual.shape == (len(queries), len(corpus))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    assert actual[0].argmax() == ml100k_item_texts.index(
        "Title: Toy Story, Genres: Animation Children's Comedy, Year: 1995")


def test_epsilon_floor_for_terms_in_most_documents():
    corpus = [["movie", "a"], ["movie", "b"], ["movie", "c"], ["d"]]
    index = BM25Index(corpus, epsilon=0.25)
    reference = BM25Okapi(corpus, epsilon=0.25)
    assert index.idf[index.vocabulary["movie"]] == pytest.approx(reference.idf["movie"])
    assert reference.idf["movie"] > 0  # floored: "movie" is in 3 of 4 documents
    np.testing.assert_allclose(index.scores([["movie"]])[0], reference.get_scores(["movie"]), atol=1e-12)
