"""Compatibility shims for RecBole 1.2.1 on a current scientific Python stack.

This is the only module in recbole_llm that patches foreign code. ``import recbole_llm`` applies it once,
before anything else touches RecBole. Each shim names the breakage it fixes (see RECBOLE_NOTES.md §3)
and has a test in ``tests/test_compat.py`` that fails without it.

* numpy 2 removed ``np.float``, ``np.float_``, ``np.bool8``, ... which RecBole (and hyperopt) still use,
  and ``Config.compatibility_settings`` itself crashes assigning them.
* torch >= 2.6 loads checkpoints with ``weights_only=True``; RecBole's checkpoints pickle the whole Config,
  so ``Trainer.evaluate(load_best_model=True)`` fails. We unpickle only checkpoints that a RecBole trainer
  of *this process* wrote, and leave torch's safe default in place for everything else.
* hyperopt >= 0.2.6 wants a ``numpy.random.Generator``; RecBole's exhaustive search hands it a
  ``RandomState``. We replace it with a deterministic grid enumeration that needs no RNG at all.
* scipy >= 1.13 removed ``dok_matrix._update``, used by LightGCN, NGCF, GCMC, NCL, SpectralCF, ...
* ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` when it is
  imported, and RecBole imports it for any model it resolves by name (``get_model("DIN")`` too): from then on
  autograd checks every backward output for NaN and keeps a Python traceback per operation, which slowed every
  training run after it (RALLRec's ``cpu-2h`` step 1.5x: 28.9 s against 19.3; SemConv's ``cpu-2h`` run 8 %;
  BENCHMARKS.md). The package is imported here, and anomaly detection put back as it was.
* ``recbole.quick_start`` imports ray 2.6.3 (broken on numpy 2 / setuptools >= 82); recbole_llm never
  imports it and ships its own quick start.
* the warnings RecBole and the libraries under it raise about their *own* code on today's stack (a deprecated
  torch call inside RecBole's trainer, pandas' chained assignment inside RecBole's dataset, ...) are silenced
  here, in :data:`FOREIGN_WARNINGS`, each matched by message and by the module that raised it; a user can act on
  none of them. Every other warning, about the user's data or settings above all, is left as it is.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings

import numpy as np

# Aliases numpy 2 removed, mapped to what they meant in numpy 1.x. Names numpy 2 still defines
# (np.bool, np.long, ...) are left untouched.
_NUMPY_ALIASES = {
    "float": np.float64,
    "int": np.int_,
    "bool": np.bool_,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int_,
    "unicode": np.str_,
    "bool8": np.bool_,
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
}

# Absolute paths of checkpoints that RecBole trainers wrote in this process (and so may be unpickled).
_TRUSTED_CHECKPOINTS: set[str] = set()
_APPLIED = False


def patch_numpy_aliases() -> None:
    """Restore the numpy 1.x scalar aliases RecBole 1.2.1 and hyperopt still reference."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


class CheckpointNotTrustedError(RuntimeError):
    """A RecBole checkpoint needs full unpickling, but this process did not write it."""


def load_recbole_checkpoint(path: str, map_location=None) -> dict:
    """Load a RecBole ``.pth`` checkpoint.

    RecBole pickles its Config inside every checkpoint, which torch >= 2.6 refuses under
    ``weights_only=True``. Files written by a trainer of this process are trusted and fully unpickled;
    anything else is loaded with torch's safe default, and a clear error says how to proceed.
    """
    import torch

    real = os.path.realpath(path)
    if real in _TRUSTED_CHECKPOINTS:
        return torch.load(real, map_location=map_location, weights_only=False)
    try:
        return torch.load(real, map_location=map_location)
    except Exception as err:  # torch raises UnpicklingError wrapped in several ways
        raise CheckpointNotTrustedError(
            f"{path} is a RecBole checkpoint that pickles Python objects (its Config), and it was not written "
            "by this process, so recbole_llm will not unpickle it silently. If you trust the file, load it "
            "with torch.load(path, weights_only=False) yourself. recbole_llm's own checkpoints "
            "(recbole_llm.load_model) are safetensors and need no unpickling."
        ) from err


def _patch_config() -> None:
    from recbole.config import configurator

    configurator.Config.compatibility_settings = lambda self: patch_numpy_aliases()


def trust_checkpoint(path: str) -> None:
    """Treat RecBole's checkpoint ``path`` as written by this process: in a distributed run rank 0 writes the file
    the whole group then loads (:mod:`recbole_llm.trainer.parallel`)."""
    _TRUSTED_CHECKPOINTS.add(os.path.realpath(path))


def _patch_trainer_checkpoints() -> None:
    from recbole.trainer import trainer as recbole_trainer

    Trainer = recbole_trainer.Trainer
    original_save = Trainer._save_checkpoint
    original_evaluate = Trainer.evaluate

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        saved_model_file = kwargs.get("saved_model_file", self.saved_model_file)
        original_save(self, epoch, verbose=verbose, **kwargs)
        trust_checkpoint(saved_model_file)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and eval_data:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = load_recbole_checkpoint(checkpoint_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return original_evaluate(self, eval_data, load_best_model=False, show_progress=show_progress)

    _save_checkpoint.__wrapped__ = original_save
    evaluate.__wrapped__ = original_evaluate
    Trainer._save_checkpoint = _save_checkpoint
    Trainer.evaluate = evaluate


def grid_search(new_ids, domain, trials, seed=None):
    """hyperopt ``algo`` that walks the grid of ``hp.choice`` parameters in a fixed order.

    Replaces RecBole's ``exhaustive_search``, which draws random points from a ``RandomState`` (hyperopt
    >= 0.2.6 requires a ``Generator``) and retries until it finds an unseen one. Enumerating the Cartesian
    product instead needs no RNG, never repeats a point and stops exactly when the grid is exhausted.
    """
    from hyperopt.base import miscs_update_idxs_vals
    from recbole.trainer.hyper_tuning import ExhaustiveSearchError

    sizes, continuous = _grid_dimensions(domain.expr)
    if continuous:
        raise ExhaustiveSearchError(
            "exhaustive search enumerates 'choice' parameters only; "
            f"{sorted(continuous)} are continuous. Use --tune_algo=random or --tune_algo=bayes for those."
        )
    names = sorted(sizes)
    seen = {tuple(trial["misc"]["vals"][name][0] for name in names) for trial in trials.trials}
    untried = (p for p in itertools.product(*(range(sizes[n]) for n in names)) if p not in seen)
    docs = []
    for new_id, point in zip(new_ids, untried):
        misc = dict(tid=new_id, cmd=domain.cmd, workdir=domain.workdir)
        miscs_update_idxs_vals(
            [misc],
            {name: [new_id] for name in names},
            {name: [int(index)] for name, index in zip(names, point)},
        )
        docs.extend(trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc]))
    return docs


def _grid_dimensions(expr) -> tuple[dict[str, int], set[str]]:
    """Number of options of every ``hp.choice`` in a search space, and the labels of all other parameters."""
    from hyperopt.pyll.base import dfs

    nodes = list(dfs(expr))
    sizes = {
        node.pos_args[0].pos_args[0].obj: len(node.pos_args) - 1
        for node in nodes
        if node.name == "switch" and node.pos_args[0].name == "hyperopt_param"
    }
    labels = {node.pos_args[0].obj for node in nodes if node.name == "hyperopt_param"}
    return sizes, labels - set(sizes)


def _patch_hyper_tuning() -> None:
    from recbole.trainer import hyper_tuning

    hyper_tuning.exhaustive_search = lambda new_ids, domain, trials, seed, **_: grid_search(
        new_ids, domain, trials, seed
    )


def _patch_scipy_dok() -> None:
    import scipy.sparse as sp

    if not hasattr(sp.dok_matrix, "_update"):
        sp.dok_matrix._update = lambda self, data: self._dict.update(data)


def _undo_recbole_anomaly_detection() -> None:
    import torch

    mode, check_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (its sine.py turns anomaly detection on)

    torch.autograd.set_detect_anomaly(mode, check_nan)


# (category, message regex, module regex of the code that triggers it, why a user cannot act on it)
FOREIGN_WARNINGS = (
    (FutureWarning, r"A value is trying to be set on a copy of a DataFrame", r"recbole\.",
     "pandas 2 on RecBole's Dataset._fill_nan (fillna inplace on a column); pyproject keeps pandas < 3"),
    (FutureWarning, r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated", r"recbole\.",
     "torch on RecBole's Trainer.__init__, which builds a disabled CUDA grad scaler"),
    (UserWarning, r"torch\.sparse\.SparseTensor\(indices, values, shape", r"recbole\.",
     "torch on the sparse adjacency of RecBole's graph models (LightGCN, NGCF, ...)"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils",
     "peft's get_peft_model probes the old attribute name (transformers' warning names its own line); "
     "recbole_llm uses the current activation-checkpointing API"),
)
# Log records of foreign libraries a user cannot act on: (logger name, message substring, why)
FOREIGN_LOG_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "kernels-community",
     "bitsandbytes on CPUs with AVX512-BF16 tries to fetch an optional kernel from the Hub; its own fallback runs"),
)


class _DropRecords(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_foreign_warnings() -> None:
    """Silence :data:`FOREIGN_WARNINGS` and :data:`FOREIGN_LOG_RECORDS`, and nothing else."""
    for category, message, module, _ in FOREIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, fragment, _ in FOREIGN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropRecords(fragment))


def apply() -> None:
    """Apply every shim once. Called by ``import recbole_llm``."""
    global _APPLIED
    if _APPLIED:
        return
    patch_numpy_aliases()
    _patch_config()
    _patch_trainer_checkpoints()
    _patch_hyper_tuning()
    _patch_scipy_dok()
    _undo_recbole_anomaly_detection()
    quiet_foreign_warnings()
    _APPLIED = True


apply()
