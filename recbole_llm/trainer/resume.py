"""Resumable runs of RecBole's own trainers (SASRec, BERT4Rec, LightGCN, DeepFM, ...), as :class:`LLMTrainer` has.

A converged baseline can take hours on a CPU (SASRec: about 5 minutes an epoch on 2 cores, tens of epochs to early
stopping), so an interrupted run must continue where it stopped and end exactly where an uninterrupted one ends.
With ``resume: True`` (the default) and a saved run, the trainer works in the run directory
``<checkpoint_dir>/<model>-<dataset>-<fingerprint>`` (keyed like every other run: :mod:`recbole_llm.fingerprint`)::

    best.pth    RecBole's checkpoint of the best validation (its own format, read by RecBole's tools)
    last.pth    after every validation: the weights, the optimizer, early-stopping progress, the loss and
                validation history, every random stream training draws from (torch, numpy, Python, the training
                loader's shuffling generator) and the best weights; only tensors, numbers and strings, so it
                loads with torch's ``weights_only`` in any later process

A rerun of the same configuration loads ``last.pth`` and goes on with the next epoch; one that had stopped early
does not train again. RecBole's ``best.pth`` pickles its Config, which recbole_llm only unpickles when this process
wrote it (:func:`recbole_llm.compat.load_recbole_checkpoint`), so a resumed run writes it again from the best
weights kept in ``last.pth``. ``epochs`` is not part of the key: a longer run continues a shorter one.

Models whose extra state (``other_parameter``) holds more than tensors (ItemKNN's sparse matrices, EASE's arrays)
cannot be saved that way; they train as RecBole trains them, without a resume point (said once in the log).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from recbole.utils import set_color

from recbole_llm import distributed
from recbole_llm.compat import trust_checkpoint
from recbole_llm.fingerprint import run_fingerprint
from recbole_llm.locks import exclusive

BEST, LAST = "best.pth", "last.pth"


def random_state(generator: torch.Generator | None = None) -> dict:
    """Every random stream a RecBole training epoch draws from, as tensors and numbers."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
        "generator": None if generator is None else generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore what :func:`random_state` took."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shuffle_generator(loader) -> torch.Generator | None:
    """The torch generator a RecBole training loader shuffles with (None for loaders without one)."""
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def tensor_state(model: torch.nn.Module) -> dict | None:
    """The model's weights and extra state (``other_parameter``: tensors; sub-modules are in the weights), cloned
    to the CPU; None when the extra state holds anything else."""
    extra = {}
    for name, value in model.other_parameter().items():
        if isinstance(value, torch.nn.Module):
            continue  # its tensors are in the state dict
        if value is not None and not isinstance(value, torch.Tensor):
            return None
        extra[name] = None if value is None else value.detach().to("cpu").clone()
    weights = {name: tensor.detach().to("cpu").clone() for name, tensor in model.state_dict().items()}
    return {"state_dict": weights, "other_parameter": extra}


def load_tensor_state(model: torch.nn.Module, state: dict) -> None:
    model.load_state_dict(state["state_dict"])
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    model.load_other_parameter({name: None if value is None else value.to(device)
                                for name, value in state["other_parameter"].items()})


class ResumableTrainer:
    """Mixed into a RecBole trainer whose ``fit`` is RecBole's own (see the module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.resume = bool(config["resume"])
        self.run_dir = Path(self.checkpoint_dir) / f"{config['model']}-{config['dataset']}-{run_fingerprint(config)}"
        self.saved_model_file = str(self.run_dir / BEST)
        self.valid_scores: list[list] = []  # [epoch, valid score] of every validation, resumed ones included
        self._best_state = None
        self._train_data = None
        self._validating = False
        self._unsaveable = False

    # -------------------------------------------------------------------------------------------- saving
    def _save_checkpoint(self, epoch, *args, **kwargs):
        if epoch < 0 and Path(self.saved_model_file).is_file():
            return  # RecBole's fit with no epochs left would overwrite the best checkpoint with the last weights
        self.run_dir.mkdir(parents=True, exist_ok=True)
        super()._save_checkpoint(epoch, *args, **kwargs)
        if epoch >= 0:
            self._best_state = tensor_state(self.model)
            if not self._validating:  # no validation: every epoch's save is also the resume point
                self._save_last(epoch)

    def _save_last(self, epoch: int) -> None:
        if not distributed.is_main():  # rank 0 writes; every process trains alike (trainer.parallel)
            return
        state = tensor_state(self.model)
        if state is None:
            if not self._unsaveable:
                self._unsaveable = True
                self.logger.info(f"{self.config['model']} keeps non-tensor state (other_parameter): this run "
                                 "has no resume point")
            return
        progress = {
            "epoch": epoch,
            "finished": self.cur_step > self.stopping_step,  # RecBole's early-stopping condition
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "train_loss_dict": {int(k): (list(v) if isinstance(v, tuple) else float(v))
                                for k, v in self.train_loss_dict.items()},
            "valid_scores": self.valid_scores,
        }
        torch.save({**state, "optimizer": self.optimizer.state_dict(), "progress": progress,
                    "random": random_state(shuffle_generator(self._train_data)),
                    "best": self._best_state}, _partial(self.run_dir / LAST))
        _partial(self.run_dir / LAST).replace(self.run_dir / LAST)  # atomic: a crash keeps the previous one

    # ------------------------------------------------------------------------------------------- resuming
    def _resume_from_last(self, train_data) -> None:
        path = self.run_dir / LAST
        if not path.is_file():
            return
        last = torch.load(path, map_location="cpu", weights_only=True)
        load_tensor_state(self.model, last)
        self.optimizer.load_state_dict(last["optimizer"])
        progress = last["progress"]
        self.start_epoch = self.epochs if progress["finished"] else progress["epoch"] + 1
        self.cur_step = progress["cur_step"]
        self.best_valid_score = progress["best_valid_score"]
        self.best_valid_result = progress["best_valid_result"] or None
        self.train_loss_dict = {int(k): tuple(v) if isinstance(v, list) else v
                                for k, v in progress["train_loss_dict"].items()}
        self.valid_scores = [list(row) for row in progress["valid_scores"]]
        set_random_state(last["random"], shuffle_generator(train_data))
        self._best_state = last["best"]
        if self._best_state is not None:
            self._rewrite_best(progress["epoch"])
        self.logger.info(set_color("Resuming", "blue") + f" from {path} (epoch {progress['epoch']} done, best "
                         f"valid score {self.best_valid_score:.4f}" + (", stopped early)" if progress["finished"]
                                                                        else ")"))

    def _rewrite_best(self, epoch: int) -> None:
        """RecBole's ``best.pth`` again, from the best weights, written (so trusted) by this process."""
        if not distributed.is_main():  # rank 0 writes it; the others load it after a barrier
            trust_checkpoint(self.saved_model_file)
            return
        current = tensor_state(self.model)
        load_tensor_state(self.model, self._best_state)
        super()._save_checkpoint(epoch, verbose=False)
        load_tensor_state(self.model, current)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._validating = bool(valid_data) and self.eval_step > 0
        self._train_data = train_data

        def after_validation(epoch, valid_score):
            self.valid_scores.append([epoch, float(valid_score)])
            if saved:
                self._save_last(epoch)
            if callback_fn is not None:
                callback_fn(epoch, valid_score)

        if not saved:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)
        with exclusive(self.run_dir, f"the run {self.run_dir.name}"):
            if self.resume:
                self._resume_from_last(train_data)
            return super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")
