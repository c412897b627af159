"""Name lookup for models, trainers and datasets: recbole_llm's plugin registry first, then RecBole.

Because RecBole's Config, HyperTuning and checkpoints pass models around *by name*, every place that turns a
name into a class goes through :func:`get_model`. A new method registers itself with ``@register_model``
in its own module under ``recbole_llm/model/``; the module is imported lazily the first time its name is
looked up (``recbole_llm.model.<lowercase name>``), exactly like RecBole's own convention.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

from recbole_llm import distributed
from recbole_llm.errors import UsageError

_MODELS: dict[str, type] = {}
_TRAINERS: dict[str, type] = {}
_DATASETS: dict[str, type] = {}

# RecBole's model families, in the order RecBole's own get_model searches them.
_RECBOLE_FAMILIES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


class MissingPackageError(UsageError, ModuleNotFoundError):
    """A RecBole model that needs an optional package which is not installed."""


class UnknownModelError(UsageError, ValueError):
    """A model name that neither recbole_llm nor RecBole knows."""


def register_model(cls=None, *, trainer=None, dataset=None):
    """Class decorator: make ``cls`` resolvable by name, optionally with its own trainer / dataset class."""

    def register(model_cls):
        name = model_cls.__name__
        _MODELS[name] = model_cls
        if trainer is not None:
            _TRAINERS[name] = trainer
        if dataset is not None:
            _DATASETS[name] = dataset
        return model_cls

    return register(cls) if cls is not None else register


def _import_plugin_module(name: str) -> None:
    module = f"recbole_llm.model.{name.lower()}"
    if importlib.util.find_spec(module):
        importlib.import_module(module)


def get_model(name: str) -> type:
    """Model class for ``name``: a registered plugin model, a recbole_llm model module, or a RecBole model."""
    if name not in _MODELS:
        _import_plugin_module(name)
    if name in _MODELS:
        return _MODELS[name]
    from recbole.utils import get_model as recbole_get_model

    try:
        return recbole_get_model(name)
    except ModuleNotFoundError as err:  # RecBole reached its exlib family, which imports lightgbm / xgboost
        if name.lower() in ("lightgbm", "xgboost"):
            raise MissingPackageError(f"RecBole's {name} needs the '{err.name}' package: pip install {err.name}") from err
        plugin, recbole = list_models()
        raise UnknownModelError(_unknown_message(name, plugin, recbole)) from None
    except (ValueError, AttributeError):  # AttributeError: a module exists under another spelling (sasrec)
        plugin, recbole = list_models()
        raise UnknownModelError(_unknown_message(name, plugin, recbole)) from None


def _unknown_message(name: str, plugin: list[str], recbole: list[str]) -> str:
    from recbole_llm.settings import closest

    return (
        f"Unknown model '{name}'{closest(name, [*plugin, *recbole])}. recbole_llm models: {', '.join(plugin) or '(none yet)'}. "
        f"RecBole models: {', '.join(recbole)}."
    )


def get_trainer(model_type, model_name: str) -> type:
    """Trainer class: the one registered with the plugin model, else RecBole's choice for the model type."""
    if model_name in _TRAINERS:
        return _TRAINERS[model_name]
    from recbole.utils import get_trainer as recbole_get_trainer

    return recbole_get_trainer(model_type, model_name)


def create_dataset(config):
    """Build the dataset: the plugin model's own dataset class if it registered one, else in a labeled (CTR) run
    :mod:`recbole_llm.data.labeled`'s (one row set and order for every model), else RecBole's choice; with
    ``eval_max_users`` its valid and test parts keep a seeded sample of users, and in a run of several processes
    this process's shard of them (:mod:`recbole_llm.data.eval_sample`)."""
    from recbole.data import create_dataset as recbole_create_dataset

    from recbole_llm.data.labeled import labeled_dataset_class

    dataset_cls = _DATASETS.get(config["model"]) or labeled_dataset_class(config)
    dataset = dataset_cls(config) if dataset_cls is not None else recbole_create_dataset(config)
    if config["eval_max_users"] is not None or distributed.is_distributed():
        from recbole_llm.data.eval_sample import sample_eval_users

        dataset = sample_eval_users(dataset)
    return dataset


def list_models() -> tuple[list[str], list[str]]:
    """(recbole_llm model names, RecBole model names), each sorted case-insensitively."""
    import pkgutil

    import recbole_llm.model as plugin_pkg

    for info in pkgutil.iter_modules(plugin_pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"recbole_llm.model.{info.name}")
    return sorted(_MODELS, key=str.lower), list(_recbole_model_names())


@lru_cache(maxsize=1)
def _recbole_model_names() -> tuple[str, ...]:
    from recbole.model.abstract_recommender import AbstractRecommender

    names = set()
    for family in _RECBOLE_FAMILIES:
        try:
            package = importlib.import_module(f"recbole.model.{family}")
        except ImportError:  # exlib models need optional packages (xgboost, lightgbm)
            continue
        names.update(
            attr
            for attr, value in vars(package).items()
            if isinstance(value, type) and issubclass(value, AbstractRecommender)
        )
    return tuple(sorted(names, key=str.lower))
