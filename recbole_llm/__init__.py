"""recbole_llm: LLM-based recommenders as a RecBole 1.2.1 plugin.

Importing the package first asks torch for huge pages under large CPU tensors (:mod:`recbole_llm.memory`), then
applies the compatibility shims in :mod:`recbole_llm.compat` (numpy 2, torch >= 2.6,
hyperopt >= 0.2.6, scipy >= 1.13), so RecBole runs on a current stack.
"""

from recbole_llm.memory import huge_pages_for_large_tensors

huge_pages_for_large_tensors()  # before torch is imported (torch reads it at its first allocation)

from recbole_llm import compat  # noqa: F401,E402  (patches RecBole before anything uses it)
from recbole_llm import metrics  # noqa: F401,E402  (registers Accuracy with RecBole's evaluator)

__version__ = "0.1.0"

from recbole_llm.config import Config  # noqa: E402
from recbole_llm.quick_start import (  # noqa: E402
    compare_models,
    load_model,
    objective_function,
    run_recbole_llm,
    tune,
)
from recbole_llm.registry import get_model, get_trainer, list_models, register_model  # noqa: E402



def __getattr__(name):
    # ``recbole_llm.chat(model, message, ...)``: the chat module is callable, and loaded (with ILM) on first use only
    if name == "chat":
        import importlib

        return importlib.import_module("recbole_llm.chat")
    raise AttributeError(f"module 'recbole_llm' has no attribute {name!r}")


__all__ = [
    "Config",
    "chat",
    "compare_models",
    "get_model",
    "get_trainer",
    "list_models",
    "load_model",
    "objective_function",
    "register_model",
    "run_recbole_llm",
    "tune",
]
