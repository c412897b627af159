"""LLMTrainer: RecBole's Trainer for models with an LLM backbone.

RecBole's ``fit`` loop (validation, early stopping, logging) is kept as is; only its hooks are overridden:

* ``_build_optimizer``: optimises trainable parameters only (LoRA adapters, heads), not the frozen backbone.
* ``_train_epoch``: a model's own examples per epoch when it has ``epoch_batches`` / ``batch_loss``
  (:mod:`recbole_llm.llm.examples`), gradient accumulation, bf16 autocast where the hardware has native bf16, clipping over trainable parameters,
  a progress bar with the running loss, and throughput in tokens and targets (:func:`take_batch_counts`: the
  ``model.last_batch_tokens``, ``last_batch_targets`` and ``last_batch_predictions`` of each batch, where the model
  sets them).
* ``_save_checkpoint`` / ``evaluate``: checkpoints are safetensors directories holding only trainable weights
  (see :mod:`recbole_llm.trainer.checkpoint`); nothing is pickled.
* resume: after every epoch the trainer writes ``<run dir>/last`` (weights, optimizer, progress); a rerun of the
  same configuration continues from it instead of retraining (``resume: False`` to start over).
* learning-rate schedule (``lr_scheduler``: constant | linear | cosine, ``lr_warmup``: steps, or a share of the
  run's optimizer steps when below 1): :func:`lr_factor`, the formulas of Hugging Face's schedulers (which the
  official code of RALLRec and LC-Rec trains with), applied before every optimizer step of ``fit``; the step count
  is saved with ``last``, so a resumed run continues the schedule where it stopped.
* learning curve (``valid_curve_steps: N``): inside ``fit``'s epochs, every N optimizer steps, a validation pass
  recorded in ``valid_curve`` (with the optimizer step, training seconds and targets so far; epoch-end validations
  join it) and a resume point: a stopped run continues inside the epoch, skipping the batches it trained. These
  validations choose nothing (the best checkpoint and early stopping stay RecBole's, at epoch ends) and change
  nothing trained: the random streams are put back after them.

The run directory ``<checkpoint_dir>/<model>-<dataset>-<fingerprint>`` is keyed by the resolved configuration (every
YAML layer), the data files' content and the recbole_llm version (:mod:`recbole_llm.fingerprint`), so a
changed input never resumes or reuses another run's weights.

Several processes (torchrun; :mod:`recbole_llm.distributed`): the processes share each optimizer step's batches
instead of multiplying them, so a run computes the same thing on any number of processes (:func:`deal`). The
epoch's batches (RecBole's, or a model's own examples, Stage I or phase 1 batches) come in the one seeded order every
process draws alike; each window of ``gradient_accumulation_steps`` batches is one optimizer step, its batches dealt
out in turns (whole batches, so in-batch negatives stay what they are), the loss runs through a
``DistributedDataParallel`` wrapper (the forward inside it, so DDP sees every parameter the loss used) and the
all-reduce runs on each process's last pass of the window only (``no_sync`` before). Dropout masks are drawn from a
seed per batch (:func:`batch_seed`), not from the process's stream. A speed-up needs windows of at least as many
batches as processes (``gradient_accumulation_steps`` a multiple of the number of processes); with fewer, the
processes without a batch run a stand-in pass of weight 0 to keep step with the others. Rank 0 alone writes
checkpoints; see :mod:`recbole_llm.trainer.parallel` for evaluation.

Mixed precision: bf16 autocast on a CUDA GPU with bf16, and on a CPU with native bf16 instructions (AVX512-BF16 or
AMX), when ``llm_dtype`` is ``auto`` (see :func:`recbole_llm.llm.backbone.autocast_dtype`); weights, gradients
and optimizer state stay in the backbone's dtype (fp32 master weights). Evaluation runs under the same autocast.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from recbole_llm import distributed
from recbole_llm.compute import matmul_weights, mfu_peak
from recbole_llm.errors import UsageError
from recbole_llm.fingerprint import resolved_settings, run_fingerprint, to_jsonable
from recbole_llm.llm.backbone import autocast_dtype
from recbole_llm.locks import exclusive
from recbole_llm.memory import release_memory, trim_heap
from recbole_llm.trainer import data_parallel
from recbole_llm.trainer.resume import shuffle_generator
from recbole_llm.trainer.checkpoint import (META, load_optimizer, load_weights, optimizer_state, read_meta,
                                            save_checkpoint, trainable_state_dict)

SCHEDULES = ("constant", "linear", "cosine")
# the run's training totals, kept with the resume point
TOTALS = ("train_seconds", "train_tokens", "train_targets", "train_predictions")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``, as a multiple of the base rate.

    Warm-up: ``step / warmup`` for the first ``warmup`` steps; then ``constant`` 1, ``linear`` decay
    ``(total - step) / (total - warmup)`` to 0, ``cosine`` decay ``(1 + cos(pi * progress)) / 2`` with
    ``progress = (step - warmup) / (total - warmup)`` (Hugging Face's ``get_*_schedule_with_warmup``)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward of a process: batch ``index`` of the epoch, its loss weight, and whether the optimizer
    steps after it."""

    index: int
    batch: object
    weight: float
    last_in_window: bool


def deal(batches, accumulation: int, rank: int = 0, world: int = 1):
    """This process's micro-batches of an epoch, as :class:`MicroBatch` es.

    The epoch's batches, in their one seeded order, form windows of ``accumulation`` consecutive batches (the last
    one may be shorter), one optimizer step each, whatever the number of processes ``world``. Within a window,
    process ``r`` takes batches ``r, r + world, ...``, each weighted ``world / window`` (DDP averages the gradients
    over processes, so a step's gradient is the mean over its window's batches, as in one process). Every process
    runs ``ceil(window / world)`` passes per window; one with fewer batches repeats the window's first batch with
    weight 0, so all processes step in lockstep."""
    window: list = []
    for index, batch in enumerate(batches):
        window.append((index, batch))
        if len(window) == accumulation:
            yield from _share(window, rank, world)
            window = []
    if window:
        yield from _share(window, rank, world)


def _share(window: list, rank: int, world: int):
    mine = window[rank::world]
    passes = math.ceil(len(window) / world)
    weight = world / len(window)
    stand_ins = [window[0]] * (passes - len(mine))
    for position, (index, batch) in enumerate(mine + stand_ins):
        yield MicroBatch(index, batch, weight if position < len(mine) else 0.0, position + 1 == passes)


def micro_batches(n_batches: int, accumulation: int, world: int = 1) -> int:
    """How many passes :func:`deal` gives each process in an epoch of ``n_batches``."""
    full, rest = divmod(n_batches, accumulation)
    return full * math.ceil(accumulation / world) + math.ceil(rest / world)


def batch_seed(seed: int, epoch: int, salt: int, *index: int) -> int:
    """The seed of an epoch's order, or of the random draws (dropout) of its batch ``index``: one per epoch and
    batch, not per process or per resumed run."""
    return int(np.random.SeedSequence([int(seed or 0), epoch, salt, *index]).generate_state(1)[0])


def add_losses(total, values):
    """``total + values`` for an epoch's loss (a number or a tuple of loss terms); None is nothing yet."""
    if total is None or values is None:
        return values if total is None else total
    return tuple(a + b for a, b in zip(total, values)) if isinstance(values, tuple) else total + values


BATCH_COUNTS = ("last_batch_tokens", "last_batch_targets", "last_batch_predictions")


def clear_batch_counts(model) -> None:
    """Forget the counts of the model's previous batch, so :func:`take_batch_counts` never reads one twice."""
    for name in BATCH_COUNTS:
        setattr(model, name, None)


def take_batch_counts(model) -> tuple[int, int, int]:
    """The training tokens, targets and LM-head positions a model reported for the batch it just ran (after
    :func:`clear_batch_counts`); 0 for what it does not report. A model that reports tokens must report targets:
    else its run would record no targets/s without a word, a bug of the model, raised as one."""
    tokens, targets, predictions = (getattr(model, name, None) for name in BATCH_COUNTS)
    if tokens is not None and targets is None:
        raise RuntimeError(f"{type(model).__name__} set last_batch_tokens but not last_batch_targets for its batch: "
                           "a model that counts its training tokens must count the targets they train too")
    return int(tokens or 0), int(targets or 0), int(predictions or 0)


class LLMTrainer(Trainer):
    """Trainer for recbole_llm models; see the module docstring for what differs from RecBole's."""

    def __init__(self, config, model):
        # the data-parallel wrapper comes first: FSDP replaces the parameters the optimizer will hold
        self.llm_parallel = config["llm_parallel"] or "ddp"
        if self.llm_parallel == "fsdp" and (config["llm_quantization"] or "none") != "none":
            raise UsageError("llm_parallel: fsdp cannot shard a quantized backbone (llm_quantization: "
                             f"{config['llm_quantization']}): use llm_parallel: ddp, or llm_quantization: none")
        self._parallel = (data_parallel.wrap(model, self.llm_parallel, config["device"])
                          if distributed.is_distributed() else None)
        super().__init__(config, model)
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"] or 1))
        self.resume = bool(config["resume"])
        self.fingerprint = run_fingerprint(config)
        self.run_dir = Path(self.checkpoint_dir) / f"{config['model']}-{config['dataset']}-{self.fingerprint}"
        self.saved_model_file = str(self.run_dir / "best")
        self.last_checkpoint = self.run_dir / "last"
        self.autocast_dtype = autocast_dtype(config["llm_dtype"] or "auto", self.device)
        # freed pages back to the system after every optimizer step: on a CPU the heap otherwise grows from batch
        # to batch far beyond what training holds (RALLRec's cpu preset: 4.47 -> 3.79 GiB, BENCHMARKS.md)
        self.trim_memory = bool(config["llm_trim_memory"]) and self.device.type == "cpu"
        self.train_tokens = 0
        self.train_targets = 0  # next-item targets (or examples) trained on, where the model counts them
        self.train_predictions = 0  # positions through the LM head, where the model counts them (compute_report)
        self.train_seconds = 0.0
        # (loss function, epoch, batch index, loss) of each training batch: stages (CALRec's Stage I, ILM's phase
        # one) train through other loss functions than fit's
        self.batch_losses: list[tuple[str, int, int, float]] = []
        self._validating = False
        self.valid_scores: list[list] = []  # [epoch, valid score] of every validation, resumed ones included
        self.curve_steps = int(config["valid_curve_steps"] or 0)
        self.valid_curve: list[dict] = []  # the learning curve: every validation with its training progress
        self._curve_data = None  # fit's validation data when it draws a curve
        self._partial: dict | None = None  # the epoch a resumed run continues, and what it had trained of it
        self.schedule = config["lr_scheduler"] or "constant"
        self.warmup = float(config["lr_warmup"] or 0)
        self.optimizer_steps = 0  # of fit's schedule (a resumed run restores it)
        self.learning_rates: list[float] = []  # the rate of each optimizer step of this process
        self._scheduled, self._total_steps = False, None
        world = distributed.world_size()
        if self.accumulation_steps % world:
            self.logger.warning(
                f"gradient_accumulation_steps={self.accumulation_steps} is not a multiple of the {world} processes: "
                "in each optimizer step some processes run a stand-in pass while others compute; for a speed-up set "
                f"gradient_accumulation_steps to a multiple of {world} (and divide train_batch_size to keep the step)")

    # ---------------------------------------------------------------------------------------------- training
    def _build_optimizer(self, **kwargs):
        # Called by Trainer.__init__; which parameters train is fixed once the model is built.
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        kwargs.setdefault("params", self.trainable_parameters)
        return super()._build_optimizer(**kwargs)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        fit_epoch, batches = loss_func is None, None  # fit's epochs (a stage passes its own loss function)
        if loss_func is None and hasattr(self.model, "epoch_batches"):
            # the model builds its own examples per epoch (recbole_llm.llm.examples) from RecBole's training split,
            # or returns None to train on RecBole's rows
            batches = self.model.epoch_batches(train_data.dataset, epoch_idx)
        if batches is not None:
            self.logger.info(set_color(f"{self.config['model']} examples", "blue")
                             + f": {getattr(batches, 'counts', None) or '-'}, {len(batches)} batches")
            train_data, loss_func = batches, self.model.batch_loss
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        n_batches, world = len(train_data), distributed.world_size()
        loss_name = getattr(loss_func, "__name__", "loss")
        salt = zlib.crc32(loss_name.encode())
        generator = shuffle_generator(train_data)
        if generator is not None:
            # RecBole's loader shuffles with one generator seeded once and samples negatives from numpy's global
            # stream: its epoch k would depend on the epochs this process ran before (a resumed run would replay
            # epoch 0); both seeded per epoch instead
            epoch_seed = batch_seed(self.config["seed"], epoch_idx, salt)
            generator.manual_seed(epoch_seed)
            np.random.seed(epoch_seed % 2**32)
        steps = deal(train_data, self.accumulation_steps, distributed.rank(), world)
        n_steps = math.ceil(n_batches / self.accumulation_steps)  # optimizer steps of the epoch
        curve = fit_epoch and self._curve_data is not None
        total_loss, done, batch_losses = None, 0, []
        partial = self._partial if fit_epoch and self._partial and self._partial["epoch"] == epoch_idx else None
        if fit_epoch:
            self._partial = None
        if partial:  # what the stopped run trained of this epoch (its counts are in the run's totals already)
            done = partial["steps"]
            total_loss = (tuple(partial["loss"]) if isinstance(partial["loss"], list) else partial["loss"]) \
                if distributed.is_main() else None
        progress = tqdm(
            steps, total=micro_batches(n_batches, self.accumulation_steps, world), ncols=100,
            desc=set_color(f"Train {epoch_idx:>5}", "pink"), disable=not show_progress,
        )
        start, tokens, targets, predictions, stepped = time.perf_counter(), 0, 0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for step in progress:
            if stepped < done:  # trained before the resume point: drawn (the random streams advance alike), skipped
                stepped += step.last_in_window
                continue
            interaction = step.batch.to(self.device)
            clear_batch_counts(self.model)
            # dropout masks drawn from the batch's own seed: the same whatever the number of processes
            torch.manual_seed(batch_seed(self.config["seed"], epoch_idx, salt, step.index))
            with self._gradient_sync(step.last_in_window), self.autocast():
                losses = self._loss(loss_func, interaction)
                loss = sum(losses) if isinstance(losses, tuple) else losses
                self._check_nan(loss)
                (loss * step.weight).backward()
            if step.last_in_window:
                if self.clip_grad_norm:
                    clip_grad_norm_(self.trainable_parameters, **self.clip_grad_norm)
                self._schedule_step(n_batches)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.trim_memory:
                    trim_heap()
                stepped += 1
            if step.weight:  # not a process's stand-in pass (its window had fewer batches than processes)
                total_loss = add_losses(total_loss, tuple(l.item() for l in losses) if isinstance(losses, tuple)
                                        else loss.item())
                batch_losses.append((loss_name, epoch_idx, step.index, loss.item()))
                batch_tokens, batch_targets, batch_predictions = take_batch_counts(self.model)
                tokens, targets, predictions = tokens + batch_tokens, targets + batch_targets, \
                    predictions + batch_predictions
                progress.set_postfix(loss=f"{loss.item():.4f}")
            if curve and step.last_in_window and stepped % self.curve_steps == 0 and stepped < n_steps:
                # the epoch so far joins the run's totals, so the point and its resume point count it
                self._add_counts(time.perf_counter() - start, tokens, targets, predictions)
                total_loss, rows = self._gathered(total_loss, batch_losses)
                self._curve_point(epoch_idx, stepped / n_steps)
                self._save_last(epoch_idx - 1, partial={"epoch": epoch_idx, "steps": stepped,
                                                        "loss": to_jsonable(total_loss)}, pending=rows)
                if not distributed.is_main():
                    total_loss = None  # rank 0 carries the gathered loss on
                self.batch_losses.extend(rows)
                start, tokens, targets, predictions, batch_losses = time.perf_counter(), 0, 0, 0, []
        self._add_counts(time.perf_counter() - start, tokens, targets, predictions)
        total_loss, rows = self._gathered(total_loss, batch_losses)
        self.batch_losses.extend(rows)
        return total_loss

    def _add_counts(self, seconds: float, tokens: int, targets: int, predictions: int) -> None:
        """Add training time and every process's tokens, targets and LM-head positions to the run's totals."""
        self.train_seconds += seconds
        self.train_tokens += distributed.total(tokens)  # every process's tokens: the run's throughput
        self.train_targets += distributed.total(targets)
        self.train_predictions += distributed.total(predictions)

    @staticmethod
    def _gathered(total_loss, batch_losses: list) -> tuple:
        """The loss summed over every process's batches, and every process's batch losses, as one process has them."""
        if distributed.world_size() == 1:
            return total_loss, batch_losses
        return (reduce(add_losses, distributed.all_gather(total_loss)),
                sorted(row for rows in distributed.all_gather(batch_losses) for row in rows))

    def _curve_point(self, epoch_idx: int, fraction: float) -> None:
        """Validate inside an epoch for the learning curve; the random streams training draws from are put back."""
        streams = np.random.get_state(), random.getstate(), torch.get_rng_state()
        score, _ = self._valid_epoch(self._curve_data)
        np.random.set_state(streams[0]), random.setstate(streams[1]), torch.set_rng_state(streams[2])
        self.model.train()
        self._add_curve(epoch_idx + fraction, score)
        self.logger.info(set_color(f"epoch {epoch_idx} step {self.optimizer_steps} evaluating", "green")
                         + f" [{set_color('valid_score', 'blue')}: {score:f}] (learning curve)")

    def _add_curve(self, epochs: float, score: float) -> None:
        self.valid_curve.append({"epochs": round(epochs, 6), "optimizer_steps": self.optimizer_steps,
                                 "train_seconds": round(self.train_seconds, 3), "train_targets": self.train_targets,
                                 "valid_score": float(score)})

    def compute_report(self) -> dict | None:
        """What training computed, for the run's record: the backbone's FLOPs per training token (its weights
        counted by role, :mod:`recbole_llm.compute`; the LM head over the positions the model reported; attention
        products not counted), the FLOP/s reached, the dtype it computed in (autocast's, else the backbone's
        weights'), the machine's matrix-multiply peak for it (:func:`~recbole_llm.compute.mfu_peak`, measured in
        this process, times the number of processes) and their ratio, the model-FLOPs utilisation."""
        names = getattr(self.model, "backbone_modules", ())
        if not (self.train_tokens and self.train_seconds and names):
            return None
        backbone = getattr(self.model, names[0])
        weights = matmul_weights(backbone)
        flops = weights.training_flops(self.train_tokens, self.train_predictions)
        dtype = self.autocast_dtype or next((p.dtype for p in backbone.parameters() if p.is_floating_point()),
                                            torch.float32)
        peak, peak_dtype = mfu_peak(dtype, self.device.type)
        peak *= distributed.world_size()
        achieved = flops / self.train_seconds
        return {"flops_per_token": round(flops / self.train_tokens), "tflops": round(achieved / 1e12, 4),
                "compute_dtype": str(dtype).removeprefix("torch."), "peak_tflops": round(peak / 1e12, 4),
                "peak_dtype": str(peak_dtype).removeprefix("torch."), "mfu": round(achieved / peak, 4)}

    def _loss(self, loss_func, batch):
        """``loss_func(batch)``; in a distributed run through the data-parallel wrapper, so its gradient
        synchronisation covers every parameter the loss used."""
        return loss_func(batch) if self._parallel is None else self._parallel.loss(loss_func, batch)

    def _gradient_sync(self, last_in_window: bool):
        """No gradient synchronisation on the passes before the last one of an accumulation window."""
        return nullcontext() if self._parallel is None else self._parallel.sync(last_in_window)

    @property
    def collective_checkpoints(self) -> bool:
        """Whether saving a checkpoint takes every process (the weights are sharded: each holds a part)."""
        return self._parallel is not None and data_parallel.is_sharded(self.model)

    def _schedule_step(self, n_batches: int) -> None:
        """Set the learning rate of the next optimizer step of ``fit`` (other loops, such as CALRec's Stage I,
        train at the base rate)."""
        if not self._scheduled:
            return
        if self._total_steps is None:  # every epoch has as many batches as the first
            self._total_steps = self.epochs * math.ceil(n_batches / self.accumulation_steps)
        warmup = round(self.warmup * self._total_steps) if self.warmup < 1 else int(self.warmup)
        rate = self.learning_rate * lr_factor(self.optimizer_steps, self._total_steps, warmup, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.learning_rates.append(rate)
        self.optimizer_steps += 1

    def autocast(self):
        """The mixed-precision context of training and evaluation (a no-op without an autocast dtype)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ----------------------------------------------------------------------------------------- checkpoints
    def _meta(self, epoch: int, **extra) -> dict:
        import recbole

        import recbole_llm

        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "config": to_jsonable(self.config.external_config_dict),
            "resolved_config": resolved_settings(self.config),
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "optimizer_steps": self.optimizer_steps,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "versions": {"recbole_llm": recbole_llm.__version__, "recbole": recbole.__version__,
                         "torch": torch.__version__},
            **extra,
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        path = Path(kwargs.get("saved_model_file", self.saved_model_file))
        if epoch < 0 and (path / META).is_file():
            return  # fit() with no epochs left: keep the best checkpoint it already has
        self._write_checkpoint(path, self._meta(epoch))
        if not self._validating:  # no validation this run: every epoch's save is also the resume point
            self._save_last(epoch)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def _save_last(self, epoch: int, partial: dict | None = None, pending: list = ()) -> None:
        """The resume point after ``epoch``; ``partial``: the next epoch's progress when saved inside it
        (``pending``: its batch losses so far)."""
        finished = self.cur_step > self.stopping_step  # RecBole's early-stopping condition
        history = {"train_loss_dict": {str(k): to_jsonable(v) for k, v in self.train_loss_dict.items()},
                   "valid_scores": self.valid_scores, "valid_curve": self.valid_curve,
                   "batch_losses": [list(row) for row in [*self.batch_losses, *pending]],
                   **{name: getattr(self, name) for name in TOTALS}}
        self._write_checkpoint(self.last_checkpoint, self._meta(epoch, finished=finished, history=history,
                                                                partial=partial), self.optimizer)

    def _write_checkpoint(self, path, meta: dict, optimizer=None) -> None:
        """Save the trainable weights (and ``optimizer``) to ``path``; in a distributed run rank 0 alone writes
        (the others read it after a barrier: :mod:`recbole_llm.trainer.parallel`'s ``evaluate``, or the lock of
        :meth:`fit`)."""
        if not (distributed.is_main() or self.collective_checkpoints):
            return
        state = trainable_state_dict(self.model)  # gathered by every process when sharded
        optimizer = None if optimizer is None else optimizer_state(self.model, optimizer)
        if distributed.is_main():
            save_checkpoint(path, state, meta, optimizer)

    def _resume_from_last(self) -> None:
        if not (self.last_checkpoint / META).is_file():
            return
        meta = read_meta(self.last_checkpoint)
        if meta.get("fingerprint") != self.fingerprint:
            return
        load_weights(self.last_checkpoint, self.model)
        load_optimizer(self.last_checkpoint, self.model, self.optimizer)
        self.start_epoch = self.epochs if meta.get("finished") else meta["epoch"] + 1
        self.cur_step = meta["cur_step"]
        self.optimizer_steps = int(meta.get("optimizer_steps", 0))
        self.best_valid_score = meta["best_valid_score"]
        self.best_valid_result = meta["best_valid_result"] or None
        history = meta.get("history") or {}  # the record of a resumed run covers the epochs before it too
        self.train_loss_dict = {int(k): tuple(v) if isinstance(v, list) else v
                                for k, v in history.get("train_loss_dict", {}).items()}
        self.valid_scores = [list(row) for row in history.get("valid_scores", [])]
        self.valid_curve = list(history.get("valid_curve", []))
        self.batch_losses = [tuple(row) for row in history.get("batch_losses", [])]
        for name in TOTALS:  # the record's throughput and the curve's progress count the earlier processes' work
            setattr(self, name, type(getattr(self, name))(history.get(name, 0)))
        self._partial = meta.get("partial")
        self.logger.info(
            set_color("Resuming", "blue") + f" from {self.last_checkpoint} (epoch {meta['epoch']} done"
            + (f", epoch {self._partial['epoch']} to step {self._partial['steps']}" if self._partial else "")
            + f", best valid score {self.best_valid_score:.4f})"
        )

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        release_memory()  # what an earlier phase freed (CALRec's Stage I, ILM's phase 1): not under this one's peak
        self._validating = bool(valid_data) and self.eval_step > 0
        self._scheduled = True
        self._curve_data = valid_data if self.curve_steps and valid_data else None

        def after_validation(epoch_idx, valid_score):
            self.valid_scores.append([epoch_idx, float(valid_score)])
            self._add_curve(epoch_idx + 1, valid_score)
            if saved:
                self._save_last(epoch_idx)
            if callback_fn is not None:
                callback_fn(epoch_idx, valid_score)

        if not saved:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)
        # one process trains a run directory at a time; an identical run started meanwhile waits, then resumes
        # from what it finished (or, with resume off, trains after it)
        with exclusive(self.run_dir, f"the run {self.run_dir.name}"):
            if self.resume:
                self._resume_from_last()
            return super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        release_memory()  # what training freed, before the generation caches are built on top of it
        if load_best_model and eval_data:
            checkpoint = model_file or self.saved_model_file
            load_weights(checkpoint, self.model)
            self.logger.info(f"Loading trainable weights from {checkpoint}")
        unsharded = nullcontext() if self._parallel is None else self._parallel.unsharded()
        with unsharded, self.autocast():  # each process ranks its own users with the whole model
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
