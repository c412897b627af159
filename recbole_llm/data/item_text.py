"""One text string per item, built from a RecBole dataset's item features.

The ``.item`` atomic file is read directly (tab-separated, ``name:type`` headers), so values keep their exact
spelling (a ``token_seq`` title is not re-joined from split tokens) and nothing has to be added to RecBole's
``load_col``: RecBole baselines run on exactly the data they would without recbole_llm.

Rendering follows CALRec's flattening of items into ``attribute: value`` pairs (CALRec §3.1, METHODS.md §1.1),
e.g. ``Title: Toy Story, Genres: Animation Children's Comedy, Year: 1995``, with missing values written as
``unknown``. A format template (``{movie_title} ({release_year})``) can replace the pair list.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recbole_llm.errors import InputFileError

logger = logging.getLogger(__name__)

# Above this share of items without any text, building item texts warns.
TEXTLESS_WARNING_SHARE = 0.05


def read_item_table(path: str | Path) -> pd.DataFrame:
    """Read a RecBole ``.item`` file as strings, with the ``:type`` suffixes stripped from column names."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    return table.rename(columns=lambda column: column.split(":")[0])


@dataclass
class ItemTextBuilder:
    """Render items as text.

    Args:
        fields: ordered ``{label: field}``; an item renders as ``"label: value, label: value"``.
            ``None`` uses every non-id column of the item file, labelled by its field name.
        template: optional ``str.format`` template over field names; replaces the pair list.
        missing: text for an empty or absent value.
        separator: between ``label: value`` pairs.
    """

    fields: Mapping[str, str] | None = None
    template: str | None = None
    missing: str = "unknown"
    separator: str = ", "

    def render(self, record: Mapping[str, str], values_only: bool = False) -> str:
        """The item's text; ``values_only`` gives just its field values, space-separated (no labels, no template
        words), which is what a retrieval index should match on."""
        value = lambda name: (str(record.get(name, "") or "").strip() or self.missing)  # noqa: E731
        names = self._field_names()
        if values_only:
            return " ".join(value(name) for name in names)
        if self.template is not None:
            return self.template.format(**{name: value(name) for name in names})
        return self.separator.join(f"{label}: {value(name)}" for label, name in self.fields.items())

    def _field_names(self) -> list[str]:
        """The item-file fields a text reads: the template's, else the values of ``fields``."""
        if self.template is not None:
            return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        return list(self.fields.values())

    @property
    def labels(self) -> list[str]:
        """The labels written before values (none with a template)."""
        return [] if self.template is not None else list(self.fields)

    def _check_fields(self, columns: Sequence[str], id_field: str, source: Path) -> None:
        if self.fields is None:
            self.fields = {name: name for name in columns if name != id_field}
        unknown = [name for name in self._field_names() if name not in columns]
        if unknown:
            raise InputFileError(
                f"item text fields {unknown} are not columns of {source} (columns: {list(columns)}). "
                "Set item_text_fields (e.g. {'Title': 'title'}) or item_text_template for this dataset."
            )

    def render_rows(self, table: pd.DataFrame, id_field: str) -> list[str]:
        """One text per row of an item table, in table order."""
        self._check_fields(list(table.columns), id_field, Path("?"))
        return [self.render(record) for record in table.to_dict("records")]

    def records_from_table(self, table: pd.DataFrame, id_field: str, item_tokens: Sequence[str],
                           source=Path("?")) -> list[Mapping[str, str]]:
        """The item-file row of each of ``item_tokens`` (RecBole's internal id order; ``{}`` where none).

        Logs a warning when many items have no text (no row in the item file, or every field empty)."""
        self._check_fields(list(table.columns), id_field, source)
        records = table.drop_duplicates(id_field).set_index(id_field).to_dict("index")
        rows = [records.get(str(token), {}) for token in item_tokens]
        self._warn_if_textless(rows[1:], source)
        return rows

    def texts(self, rows: Sequence[Mapping[str, str]], values_only: bool = False) -> list[str]:
        """One text per row of :meth:`records`; index 0 (the padding item) is empty."""
        return [""] + [self.render(row, values_only) for row in rows[1:]]

    def build_from_table(self, table: pd.DataFrame, id_field: str, item_tokens: Sequence[str], source=Path("?")):
        """Texts aligned with ``item_tokens`` (RecBole's internal id order); index 0 is the padding item."""
        return self.texts(self.records_from_table(table, id_field, item_tokens, source))

    def _warn_if_textless(self, rows: list[Mapping[str, str]], source) -> None:
        names = self._field_names()
        empty = sum(1 for row in rows if not any(str(row.get(name, "") or "").strip() for name in names))
        if rows and empty / len(rows) > TEXTLESS_WARNING_SHARE:
            logger.warning(
                f"{empty} of {len(rows)} items ({empty / len(rows):.0%}) have no text in {source} (no row, or the "
                f"fields {names} all empty): they read '{self.render({})}'. Check the item ids of the .item file "
                "against the .inter file, or item_text_fields."
            )

    def records(self, dataset) -> list[Mapping[str, str]]:
        """The item-file row of every internal item id of a RecBole ``Dataset`` (read once; render with
        :meth:`texts`, in as many forms as needed)."""
        source = Path(dataset.dataset_path) / f"{dataset.dataset_name}.item"
        if not source.is_file():
            raise InputFileError(
                f"{dataset.dataset_name} has no item file ({source}); LLM recommenders need item text. "
                "Add a RecBole .item atomic file with at least a title column."
            )
        return self.records_from_table(read_item_table(source), dataset.iid_field,
                                       dataset.field2id_token[dataset.iid_field], source)

    def build(self, dataset) -> list[str]:
        """Texts for every internal item id of a RecBole ``Dataset`` (``texts[i]`` is item ``i``)."""
        return self.texts(self.records(dataset))

    @classmethod
    def from_config(cls, config) -> "ItemTextBuilder":
        return cls(
            fields=config["item_text_fields"],
            template=config["item_text_template"],
            missing=config["item_text_missing"] or "unknown",
        )
