"""recbole_llm's Config: RecBole's Config with plugin name resolution and plugin YAML layers.

The two hooks RecBole offers for this are overridden (the RecBole-GNN pattern), plus two safety points: string
values (command line, ``config_dict``, a checkpoint's JSON) are parsed by :func:`recbole_llm.settings.parse_value`
instead of RecBole's ``eval``, so no configuration value ever runs code; and the merged configuration is
validated against :mod:`recbole_llm.settings` before anything loads. Everything else, including defaults, stays
RecBole's. Layering, later wins:

RecBole internal (overall -> model -> dataset -> quick_start_config by model type)
-> recbole_llm ``properties/overall.yaml`` -> ``properties/model/<Model>.yaml`` -> ``properties/dataset/<dataset>.yaml``
-> ``properties/presets/<Model>-<preset>.yaml`` (with ``--preset=NAME``) -> user config files -> config_dict
-> command line.

One default differs from RecBole's: a sequential model whose *resolved* ``loss_type`` is CE (SASRec, BERT4Rec,
... with their own YAML, or any sequential model given ``--loss_type=CE``) gets ``train_neg_sample_args: ~``,
because RecBole 1.2.1's own defaults make it refuse to start ("train_neg_sample_args should be None when the
loss_type is CE"); with ``loss_type: BPR`` RecBole's negative sampling stays. A user's explicit
``train_neg_sample_args`` still wins.
"""

from __future__ import annotations

from pathlib import Path

import torch
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_llm import distributed, settings
from recbole_llm.errors import UsageError
from recbole_llm.registry import get_model


def properties_dir() -> Path:
    """The ``properties/`` folder: inside the installed package (wheel) or at the root of a checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "properties", package_dir.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"recbole_llm's properties/ folder is missing (looked in {package_dir / 'properties'} and "
        f"{package_dir.parent / 'properties'}); reinstall the package."
    )


class UnknownPresetError(UsageError, ValueError):
    """``--preset=NAME`` where no ``properties/presets/*-NAME.yaml`` exists."""


def preset_file(model: str, preset: str, props: Path) -> Path:
    """``properties/presets/<model>-<preset>.yaml``; a model without that preset keeps its defaults (a comparison
    may name a preset that only some of its models have), an unknown preset name is an error."""
    known = sorted({path.stem.split("-", 1)[1] for path in (props / "presets").glob("*-*.yaml")})
    if preset not in known:
        raise UnknownPresetError(f"unknown preset '{preset}'; presets: {', '.join(known) or '(none)'} "
                         f"(files properties/presets/<Model>-<preset>.yaml)")
    return props / "presets" / f"{model}-{preset}.yaml"


class Config(RecBoleConfig):
    """RecBole Config that resolves model names through recbole_llm's registry and adds the plugin's YAML."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except (ValueError, NotImplementedError) as err:  # RecBole's Config raises these only to refuse a setting
            if isinstance(err, UsageError):
                raise
            hint = (" Value metrics (AUC, LogLoss) score given rows: use eval_args.mode labeled (or uni100), or "
                    "ranking metrics with mode full." if "value-based metrics" in str(err) else "")
            raise settings.SettingError(f"RecBole refuses the configuration: {err}{hint}") from err
        settings.validate(self.final_config_dict, self["model"])

    def _convert_config_dict(self, config_dict):
        # RecBole eval()s every string value; a checkpoint's JSON or a tuning file must never run code.
        return {key: settings.parse_value(value) if isinstance(value, str) else value
                for key, value in config_dict.items()}

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        layers = [props / "overall.yaml", props / "model" / f"{model}.yaml", props / "dataset" / f"{dataset}.yaml"]
        preset = self.external_config_dict.get("preset")
        if preset:
            layers.append(preset_file(model, preset, props))
        for layer in layers:
            if not layer.is_file():
                continue
            added = self._update_internal_config_dict(str(layer)) or {}
            if layer.parent.name == "dataset":
                # Dataset keys take part in RecBole's dataset-cache check, so a change invalidates the cache.
                self.parameters["Dataset"] = self.parameters["Dataset"] + [k for k in added if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's device setup for one process; for several (torchrun's environment, or RecBole's own
        ``local_rank`` / ``world_size`` / ``ip`` / ``port`` / ``offset`` keys) the process group of
        :mod:`recbole_llm.distributed` on ``dist_backend`` instead of RecBole's NCCL-only one, this process's own
        GPU (``LOCAL_RANK``) or the CPU, and RecBole's own distributed code paths (``single_spec: False``: its
        padded samplers, dummy-forward DDP and averaged metrics) left off."""
        final = self.final_config_dict
        recbole_way = "local_rank" in final
        if not recbole_way and not distributed.launched_by_torchrun():
            return super()._init_device()
        final["gpu_id"] = ",".join(map(str, final["gpu_id"])) if isinstance(final["gpu_id"], tuple) \
            else str(final["gpu_id"])
        use_cuda = bool(final["use_gpu"]) and final["gpu_id"] != "" and torch.cuda.is_available()
        if recbole_way:
            distributed.init(final["dist_backend"], use_cuda, rank=final["local_rank"] + final.get("offset", 0),
                             world_size=final["world_size"], init_method=f"tcp://{final['ip']}:{final['port']}")
        else:
            distributed.init(final["dist_backend"], use_cuda)
            final["local_rank"] = distributed.local_rank()
        final["world_size"] = distributed.world_size()
        final["device"] = torch.device("cuda", final["local_rank"]) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(final["device"])
        final["single_spec"] = True
        if not distributed.is_main():
            final.update(state="error", show_progress=False, verbose=False)

    def _get_final_config_dict(self):
        final = super()._get_final_config_dict()
        # decided on the merged layers: the loss type the model will train with, whichever layer set it
        if (final.get("MODEL_TYPE") == ModelType.SEQUENTIAL and final.get("loss_type") == "CE"
                and "train_neg_sample_args" not in self.external_config_dict):
            final["train_neg_sample_args"] = None
        return final
