"""Collaborative user and item vectors from a RecBole model trained on this run's training period only.

SemConv, RALLRec (and ILM) start from vectors learnt from interactions. Any RecBole model with user / item
embedding tables works (``LightGCN`` by default); it is trained with RecBole's own Trainer on the *training* split
that the run's ``eval_args`` give, so no valid/test interaction shapes the vectors. In a labeled (CTR) run, where
``min_history_length`` only selects which rows are *scored*, the model sees every interaction of the training
period, the early ones of each user included (:mod:`recbole_llm.data.labeled`).

Which vectors (``vectors``):

* ``scoring`` (default): the representation the model itself scores with. A model whose ``forward()`` takes no
  input returns its full user and item tables from it (LightGCN and the other graph models: the mean over
  propagation layers, not the layer-0 table); any other model scores with its embedding tables.
* ``table``: the raw ``nn.Embedding`` tables (LightGCN's layer 0), as an option.

Items with no interaction in the training split (``cold_items``) keep whatever the model gave them, which for an
embedding table is its random initial row: :func:`regress_cold_items` replaces them with a ridge regression from a
text view fitted on the other items; without text, the mean of the other items' vectors stands in.

The result is cached under ``<cache>/collaborative/<model>-<dataset>-<fingerprint>-<epochs>ep-<vectors>/``, keyed by
the CF model's resolved configuration (its YAML layers, the split keys copied from the run, its epochs), the data
files' content and the recbole_llm version: another split, dataset edit or CF setting trains anew. Rows are
returned in the run's internal user / item id order, matched by token (two RecBole datasets of one file need not
number them alike).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recbole_llm.cache import cache_root, write_dir_atomically
from recbole_llm.locks import build_once
from recbole_llm.settings import SettingError
from recbole_llm.fingerprint import run_fingerprint

logger = logging.getLogger(__name__)

VECTORS = ("scoring", "table")

# Keys copied from the run so that the CF model sees the same interactions and split.
SPLIT_KEYS = ("eval_args", "load_col", "unload_col", "unused_col", "user_inter_num_interval",
              "item_inter_num_interval", "val_interval", "rm_dup_inter", "filter_inter_by_user_or_item",
              "USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD", "seed", "reproducibility",
              "gpu_id", "checkpoint_dir", "state", "show_progress", "min_history_length")


@dataclass
class CollaborativeVectors:
    """Rows in the run's id order; row 0 (RecBole's padding id) is zeros."""

    users: torch.Tensor | None  # [user_num, D], None when the model has no user representation
    items: torch.Tensor  # [item_num, D]
    cold_items: torch.Tensor  # [item_num] bool: items without an interaction in the training split


def cf_config(config, model: str, epochs: int, settings: dict | None = None):
    """The RecBole Config of the CF model: the run's dataset and split, the model's own YAML, ``settings``."""
    from recbole_llm.quick_start import make_config

    # every split key the run resolved, None included (``load_col: ~`` means every column, not the CF model's own)
    values = {key: config[key] for key in SPLIT_KEYS if key in config.final_config_dict}
    values.update(settings or {})
    values["epochs"] = epochs
    values["data_path"] = str(Path(config["data_path"]).parent)  # RecBole appended the dataset name
    values["eval_step"] = 0  # no validation: the embeddings of the last epoch are used
    values["eval_max_interactions"] = None
    values["eval_max_users"] = None
    values["train_on_training_period"] = True  # labeled runs: every interaction of the period, not the scored rows
    return make_config(model, config["dataset"], config_dict=values)


def collaborative_vectors(config, dataset, *, model: str = "LightGCN", vectors: str = "scoring",
                          item_table: str = "item_embedding", user_table: str = "user_embedding", epochs: int = 50,
                          settings: dict | None = None) -> CollaborativeVectors:
    """User and item vectors of ``model`` trained on the run's training period (see the module docstring)."""
    if vectors not in VECTORS:
        raise SettingError(f"collaborative vectors {vectors!r} are not one of {', '.join(VECTORS)}")
    other = cf_config(config, model, epochs, settings)
    # ``epochs`` is volatile for resumable runs (a longer run continues a shorter one) but shapes these vectors
    key = f"{model}-{config['dataset']}-{run_fingerprint(other)}-{epochs}ep-{vectors}-{item_table}-{user_table}"
    folder = Path(config["llm_cache_dir"] or cache_root()) / "collaborative" / key
    file = folder / "vectors.safetensors"
    def build():
        tensors, metadata = _train(other, vectors, item_table, user_table)
        write_dir_atomically(folder, lambda tmp: save_file(tensors, tmp / file.name, metadata=metadata),
                             overwrite=True)
        logger.info("Collaborative vectors (%s, %s, %d epochs) cached in %s", model, vectors, epochs, folder)

    build_once(folder, file.is_file, build, "collaborative vectors")
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    items = _in_run_order(stored["items"], metadata["item_tokens"], dataset, dataset.iid_field, model)
    cold = _in_run_order(stored["cold_items"].unsqueeze(1), metadata["item_tokens"], dataset, dataset.iid_field,
                         model).squeeze(1).bool()
    cold[0] = False
    users = None
    if "users" in stored:
        users = _in_run_order(stored["users"], metadata["user_tokens"], dataset, dataset.uid_field, model,
                              missing_ok=True)
    return CollaborativeVectors(users, items, cold)


def _in_run_order(rows: torch.Tensor, tokens: str, dataset, field: str, model: str,
                  missing_ok: bool = False) -> torch.Tensor:
    """``rows`` (in the CF dataset's order, named by ``tokens``) reordered to the run's ids; row 0 zeros."""
    row_of = {token: row for row, token in enumerate(tokens.split("\n"))}
    ours = dataset.field2id_token[field]
    out = torch.zeros(len(ours), rows.shape[1], dtype=rows.dtype)
    found = [(i, row_of[token]) for i, token in enumerate(ours[1:], start=1) if token in row_of]
    if len(found) < len(ours) - 1 and not missing_ok:
        missing = [token for token in ours[1:] if token not in row_of]
        raise ValueError(f"{len(missing)} {field} values of the run (e.g. {missing[:3]}) have no {model} vector; "
                         "the CF model's dataset was filtered differently")
    if found:
        index = torch.tensor(found)
        out[index[:, 0]] = rows[index[:, 1]]
    return out


def _train(config, vectors: str, item_table: str, user_table: str) -> tuple[dict, dict]:
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_llm.registry import create_dataset, get_model, get_trainer

    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    items_module, users_module = getattr(model, item_table, None), getattr(model, user_table, None)
    if not isinstance(items_module, torch.nn.Embedding):
        raise SettingError(f"{config['model']} has no item embedding table named {item_table!r} (an nn.Embedding); "
                           "set the table name of the CF model, e.g. item_embedding for LightGCN, BPR or NGCF.")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    logger.info("Training %s for %d epochs on the training split for collaborative vectors", config["model"],
                config["epochs"])
    trainer.fit(train, valid_data=None, saved=False, show_progress=bool(config["show_progress"]))
    model.eval()
    with torch.no_grad():
        if vectors == "scoring" and _forward_takes_no_input(model):
            users, items = model.forward()[:2]  # the propagated tables a graph model scores with
        else:
            users = users_module.weight if isinstance(users_module, torch.nn.Embedding) else None
            items = items_module.weight
    warm = torch.zeros(dataset.item_num, dtype=torch.uint8)
    warm[train._dataset.inter_feat[dataset.iid_field].unique()] = 1
    tensors = {"items": items.detach().float().cpu().contiguous(), "cold_items": 1 - warm}
    metadata = {"item_tokens": "\n".join(str(t) for t in dataset.field2id_token[dataset.iid_field])}
    if users is not None:
        tensors["users"] = users.detach().float().cpu().contiguous()
        metadata["user_tokens"] = "\n".join(str(t) for t in dataset.field2id_token[dataset.uid_field])
    return tensors, metadata


def _forward_takes_no_input(model) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def regress_cold_items(vectors: torch.Tensor, cold: torch.Tensor, text: torch.Tensor | None = None,
                       ridge: float = 1.0) -> torch.Tensor:
    """``vectors`` with the ``cold`` rows replaced: predicted from ``text`` by a ridge regression fitted on the warm
    rows (``min_W |X W - Y|^2 + ridge |W|^2`` on centred X = text, Y = vectors), or, without text, the warm rows'
    mean. Warm rows are returned unchanged."""
    if not bool(cold.any()):
        return vectors
    warm = ~cold
    out = vectors.clone()
    y = vectors[warm].double()
    if text is None:
        out[cold] = y.mean(0).to(out.dtype)
        return out
    x = text[warm].double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    weights = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - y_mean))
    out[cold] = ((text[cold].double() - x_mean) @ weights + y_mean).to(out.dtype)
    return out
