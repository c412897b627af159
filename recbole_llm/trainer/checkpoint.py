"""Checkpoints that hold only what training changed, as safetensors, plus a JSON description.

A checkpoint is a directory::

    model.safetensors    trainable parameters and the model's own (non-backbone) state
    recbole_llm.json     model, dataset, the user's config, training progress, package versions
    optimizer.pt         optimizer state (resume checkpoints only; tensors and numbers, loads with weights_only)

Nothing is pickled, so everything loads with torch's safe defaults. A model sharded by FSDP (``llm_parallel: fsdp``)
is saved whole, gathered by every process together (:func:`trainable_state_dict`, :func:`optimizer_state`, both
collective then), and loaded into the shards. The frozen pretrained backbone is not
saved: it is rebuilt from ``llm_path``. A model marks its backbone sub-modules with a class attribute
``backbone_modules = ("llm",)``; parameters under them are saved only when trainable (LoRA adapters, new
token rows). Models without the attribute are saved whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recbole_llm import distributed
from recbole_llm.cache import write_dir_atomically
from recbole_llm.errors import UsageError
from recbole_llm.fingerprint import to_jsonable
from recbole_llm.trainer.data_parallel import is_sharded

WEIGHTS = "model.safetensors"
META = "recbole_llm.json"
OPTIMIZER = "optimizer.pt"
FORMAT_VERSION = 1


class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be loaded as it is: damaged, incomplete, or made from other inputs."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """A path that holds no recbole_llm checkpoint."""


def _saved(model: torch.nn.Module):
    """``(name, tensor)`` of the state a checkpoint holds: everything outside ``model.backbone_modules``, plus the
    trainable tensors inside them."""
    prefixes = tuple(f"{name}." for name in getattr(model, "backbone_modules", ()))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return ((name, tensor) for name, tensor in model.state_dict().items()
            if not name.startswith(prefixes) or name in trainable)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State to save (see :func:`_saved`), on the CPU. A sharded model's tensors are gathered whole: every process
    must call this, in step; rank 0 gets the state, the others an empty dict."""
    from torch.distributed.tensor import DTensor

    keep = distributed.is_main() or not is_sharded(model)
    state = {}
    for name, tensor in _saved(model):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # a collective: every process gathers each tensor in the same order
        if keep:  # clone: safetensors refuses shared storage
            state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state to save; for a sharded model gathered whole (keyed by parameter names, every process
    calls this in step, rank 0 gets it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, state: dict, meta: dict, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint directory of ``state`` (:func:`trainable_state_dict`), ``meta`` and the optimizer's state
    atomically (an interrupted save never leaves a broken checkpoint)."""

    def fill(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({"format": FORMAT_VERSION, **to_jsonable(meta)}, indent=2))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)

    return write_dir_atomically(Path(path), fill, overwrite=True)


def read_meta(path) -> dict:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise NotACheckpointError(f"{path} is not a recbole_llm checkpoint (no {META}): pass the run's checkpoint "
                                  "directory, e.g. saved/<Model>-<dataset>-<hash>/best.")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file} is not valid JSON ({err}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise CheckpointError(f"{meta_file} does not describe a recbole_llm checkpoint (no config mapping).")
    return meta


def load_weights(path, model: torch.nn.Module) -> None:
    """Load a checkpoint's tensors into ``model``: every saved tensor must find its place, and every tensor the
    model trains must be in the checkpoint (otherwise the model would silently keep untrained weights)."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise NotACheckpointError(f"{path} is not a recbole_llm checkpoint (no {WEIGHTS}): pass the run's "
                                  "checkpoint directory, e.g. saved/<Model>-<dataset>-<hash>/best.")
    try:
        state = load_file(file, device="cpu")
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"{file} cannot be read as safetensors ({err}); the checkpoint is damaged.") from None
    missing = sorted({name for name, _ in _saved(model)} - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not match {type(model).__name__}: "
            + (f"missing tensors {missing[:5]} ({len(missing)} in all); " if missing else "")
            + (f"unexpected tensors {unexpected[:5]}; " if unexpected else "")
            + "was it saved by another model configuration, or damaged?"
        )
    if is_sharded(model):  # every process read the whole file and keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)


def load_optimizer(path, model: torch.nn.Module, optimizer) -> bool:
    """Load the optimizer state saved with a checkpoint (into the shards of a sharded model); False if none."""
    file = Path(path) / OPTIMIZER
    if not file.is_file():
        return False
    state = torch.load(file, map_location="cpu", weights_only=True)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
    return True
