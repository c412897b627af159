"""Keys for everything recbole_llm caches or resumes: the resolved configuration, the data, the code version.

A cached artifact (a Stage-I model, item descriptions, embeddings, semantic IDs) or a resumable run is reused only
when all three match:

* the *resolved* configuration: every YAML layer (RecBole's, ``properties/overall.yaml``, the model and dataset
  files, a preset), the user's files, ``config_dict`` and the command line, as merged into the final config, less
  the keys that cannot change what is computed (:data:`VOLATILE_KEYS`: paths, logging, progress bars, devices,
  how many epochs a run may take, the number of processes: they share a step's batches, see
  :mod:`recbole_llm.trainer.llm_trainer`);
* the content of the dataset's atomic files (``<data_path>/<dataset>.*``), so the same name in another folder or
  an ``.item`` file edited in place is a different input;
* the recbole_llm version;
* for recbole_llm's models, the backbone's content (:func:`backbone_fingerprint`): ``llm_path`` names a model, and a
  local directory retrained in place or a GGUF file replaced under the same name is another model; the same for
  any other pretrained model a model declares (:func:`input_backbones`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import torch

from recbole_llm.cache import TINY_RANDOM_VERSION, file_digest, hub_snapshot, smollm2_gguf_path
from recbole_llm.registry import get_model

logger = logging.getLogger(__name__)

# Keys that change where, how verbosely or how long a run goes, not what it computes. ``epochs`` is here on
# purpose: a run with more epochs continues the shorter one's resume checkpoint.
VOLATILE_KEYS = frozenset({
    "epochs", "eval_step", "stopping_step", "show_progress", "state", "checkpoint_dir", "gpu_id", "use_gpu",
    "device", "single_spec", "local_rank", "resume", "save_dataset", "save_dataloaders", "log_wandb",
    "wandb_project", "worker", "nproc", "eval_batch_size", "data_path", "dataset_save_path",
    "dataloaders_save_path", "llm_cache_dir", "preset", "metric_decimal_place", "loss_decimal_place",
    "verbose", "world_size", "ip", "port", "offset", "dist_backend", "tune_cpus_per_trial", "tune_gpus_per_trial",
    "valid_curve_steps",  # validations inside an epoch put the random streams back: they change nothing trained
    "llm_trim_memory",  # where freed memory goes, not what is computed
})

def to_jsonable(value):
    """Config values as JSON: enums and devices become strings, unknown objects are dropped (None)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    return None


def data_fingerprint(folder, dataset: str) -> dict[str, str]:
    """``{file name: content digest}`` of the dataset's atomic files ``<folder>/<dataset>.*``."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob(f"{dataset}.*") if p.is_file())
    return {p.name: file_digest(p) for p in files}


def backbone_fingerprint(llm_path: str) -> str:
    """Content key of the backbone ``llm_path`` names (the forms :func:`recbole_llm.llm.backbone.resolve_llm_path`
    accepts): the bundled aliases by their builder version or GGUF file, a ``.gguf`` file by its content, a local
    directory by the content of every file in it, a Hub id by the commit of its cached snapshot (the id alone
    until it is downloaded)."""
    if llm_path == "tiny-random":
        return f"tiny-random-{TINY_RANDOM_VERSION}"
    if llm_path == "smollm2-135m":
        return file_digest(smollm2_gguf_path())
    local = Path(llm_path).expanduser()
    if local.is_file():
        return file_digest(local)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        if size > 1 << 30:
            logger.info("Hashing the %.1f GiB of backbone files in %s (once per process)", size / (1 << 30), local)
        digests = {str(p.relative_to(local)): file_digest(p) for p in files}
        return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return hub_snapshot(llm_path) or llm_path


def _reads_backbone(config) -> bool:
    """recbole_llm's models read ``llm_path``; RecBole's (a baseline, a CF model) carry the key but never load it."""
    return bool(config.final_config_dict.get("llm_path")) and get_model(config["model"]).__module__.startswith(
        "recbole_llm.")


def resolved_settings(config, ignore: Iterable[str] = ()) -> dict:
    """The final merged configuration as JSON values, less :data:`VOLATILE_KEYS` and ``ignore``. Under a decaying
    learning-rate schedule ``epochs`` sets every step's rate, so it is kept (a longer run is another run)."""
    volatile = VOLATILE_KEYS - ({"epochs"} if config["lr_scheduler"] in ("linear", "cosine") else set())
    skipped = volatile.union(ignore)
    return {key: to_jsonable(value) for key, value in sorted(config.final_config_dict.items()) if key not in skipped}


def input_datasets(config) -> dict[str, Path]:
    """Datasets a model reads besides the run's own, as ``{name: folder}``: a model class declares them with a
    static ``input_datasets(config)`` (CALRec's Stage-I datasets); most read none."""
    declared = getattr(get_model(config["model"]), "input_datasets", None)
    return declared(config) if declared is not None else {}


def input_backbones(config) -> dict[str, str]:
    """Pretrained models a model reads besides ``llm_path``, as ``{name: path}`` (ILM's Q-Former checkpoint): a
    model class declares them with a static ``input_backbones(config)``; their content is keyed like the LLM's."""
    declared = getattr(get_model(config["model"]), "input_backbones", None)
    return declared(config) if declared is not None else {}


def run_fingerprint(config, ignore: Iterable[str] = ()) -> str:
    """Short hash of the resolved configuration, the data files (the run's dataset and the model's
    :func:`input_datasets`), the package version and, for recbole_llm's models, the backbone's content."""
    import recbole_llm

    data = {config["dataset"]: data_fingerprint(config["data_path"], config["dataset"])}
    for name, folder in input_datasets(config).items():
        data[name] = data_fingerprint(folder, name)
    payload = {
        "settings": resolved_settings(config, ignore),
        "data": data,
        "recbole_llm": recbole_llm.__version__,
    }
    if _reads_backbone(config):
        payload["backbone"] = backbone_fingerprint(config["llm_path"])
    for name, path in input_backbones(config).items():
        payload[f"backbone:{name}"] = backbone_fingerprint(path)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
