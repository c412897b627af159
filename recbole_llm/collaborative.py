"""Collaborative item embeddings from a RecBole model trained on this run's training split only.

SemConv (and RALLRec) start from item vectors learnt from interactions. Any RecBole model with an item embedding
table works (``LightGCN`` by default, its ``item_embedding``); it is trained with RecBole's own Trainer on the
*training* split that the run's ``eval_args`` give, so no valid/test interaction shapes the vectors. The result is
cached under ``<cache>/collaborative/<model>-<dataset>-<fingerprint>.safetensors``, keyed by the CF model's
resolved configuration (its YAML layers, the split keys copied from the run, its epochs), the data files' content
and the recbole_llm version: another split, dataset edit or CF setting trains anew.

Rows are returned in the run's internal item-id order (matched by item token, as two RecBole datasets of one
file need not number items alike).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recbole_llm.data.assets import cache_root, write_dir_atomically
from recbole_llm.settings import SettingError
from recbole_llm.trainer.fingerprint import run_fingerprint

logger = logging.getLogger(__name__)

# Keys copied from the run so that the CF model sees the same interactions and split.
SPLIT_KEYS = ("eval_args", "load_col", "unload_col", "unused_col", "user_inter_num_interval",
              "item_inter_num_interval", "val_interval", "rm_dup_inter", "filter_inter_by_user_or_item",
              "USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD", "seed", "reproducibility",
              "gpu_id", "checkpoint_dir", "state", "show_progress", "min_history_length")


def cf_config(config, model: str, epochs: int, settings: dict | None = None):
    """The RecBole Config of the CF model: the run's dataset and split, the model's own YAML, ``settings``."""
    from recbole_llm.quick_start import make_config

    # every split key the run resolved, None included (``load_col: ~`` means every column, not the CF model's own)
    values = {key: config[key] for key in SPLIT_KEYS if key in config.final_config_dict}
    values.update(settings or {})
    values["epochs"] = epochs
    values["data_path"] = str(Path(config["data_path"]).parent)  # RecBole appended the dataset name
    values["eval_step"] = 0  # no validation: the embeddings of the last epoch are used
    return make_config(model, config["dataset"], config_dict=values)


def collaborative_item_embeddings(config, dataset, *, model: str = "LightGCN", table: str = "item_embedding",
                                  epochs: int = 50, settings: dict | None = None) -> torch.Tensor:
    """``[dataset.item_num, D]`` item vectors of ``model``'s ``table`` (row 0, the padding item, is zeros)."""
    other = cf_config(config, model, epochs, settings)
    # ``epochs`` is volatile for resumable runs (a longer run continues a shorter one) but shapes these vectors
    key = f"{model}-{config['dataset']}-{run_fingerprint(other)}-{epochs}ep"
    folder = Path(config["llm_cache_dir"] or cache_root()) / "collaborative" / key
    file = folder / "items.safetensors"
    if not file.is_file():
        tokens, vectors = _train(other, table)
        write_dir_atomically(folder, lambda tmp: save_file({"vectors": vectors}, tmp / file.name,
                                                           metadata={"tokens": "\n".join(tokens)}), overwrite=True)
        logger.info("Collaborative embeddings (%s.%s, %d epochs) cached in %s", model, table, epochs, folder)
    with safe_open(file, "pt") as handle:
        tokens = handle.metadata()["tokens"].split("\n")
        vectors = handle.get_tensor("vectors")
    row_of = {token: row for row, token in enumerate(tokens)}
    ours = dataset.field2id_token[dataset.iid_field]
    out = torch.zeros(len(ours), vectors.shape[1])
    missing = [token for token in ours[1:] if token not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} items of the run (e.g. {missing[:3]}) have no {model} embedding; the CF "
                         "model's dataset was filtered differently")
    out[1:] = vectors[[row_of[token] for token in ours[1:]]]
    return out


def _train(config, table: str) -> tuple[list[str], torch.Tensor]:
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_llm.registry import create_dataset, get_model, get_trainer

    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    module = getattr(model, table, None)
    if not isinstance(module, torch.nn.Embedding):
        raise SettingError(f"{config['model']} has no item embedding table named {table!r} (an nn.Embedding); set "
                         "the table name of the CF model, e.g. item_embedding for LightGCN, BPR or NGCF.")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    logger.info("Training %s for %d epochs on the training split for item embeddings", config["model"],
                config["epochs"])
    trainer.fit(train, valid_data=None, saved=False, show_progress=bool(config["show_progress"]))
    tokens = [str(token) for token in dataset.field2id_token[dataset.iid_field]]
    return tokens, module.weight.detach().float().cpu().contiguous()
