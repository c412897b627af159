"""Data helpers: bundled assets, dataset preparation and item text."""

from recbole_llm.data.assets import DatasetNotFoundError, ensure_dataset_files
from recbole_llm.data.item_text import ItemTextBuilder, read_item_table

__all__ = ["DatasetNotFoundError", "ensure_dataset_files", "ItemTextBuilder", "read_item_table"]
