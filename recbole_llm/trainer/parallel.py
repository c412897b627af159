"""Every run's trainer (RecBole's or :class:`recbole_llm.trainer.LLMTrainer`), in one process or several.

Evaluation is exact. Each process ranks (or scores) only its shard of the users (:mod:`recbole_llm.data.eval_sample`
cuts the valid and test parts to them, contiguous blocks without padding); :class:`RowCollector` gathers the
per-user rows RecBole's evaluator reads (the top-K hits and positive counts, mean ranks, scores and labels) from
every process, so RecBole's evaluator computes every metric once over exactly the users of a single-process run
(not RecBole's ``_map_reduce``, which averages per-process means and counts padded users twice). Every process
gets the same result, so early stopping decides alike everywhere. The collector also keeps each row's user id and
the last evaluation's rows (:attr:`RowCollector.last`), from which the run's record keeps every user's share of
the test metrics (:func:`recbole_llm.metrics.evaluation_units`). One process is the case of a single shard.

Checkpoints are written by rank 0 only, under one name every process knows, and read after a barrier.

Training: :class:`recbole_llm.trainer.LLMTrainer` runs data-parallel (DDP or FSDP, each optimizer step's batches
shared out between the processes: the same steps as one process). RecBole's own trainers train their (small)
models on every process alike: the same seed, data and order give the same weights, and every process tests rank
0's best checkpoint.
"""

from __future__ import annotations

from functools import cache

import torch
from recbole.evaluator import Collector
from recbole.trainer import Trainer

from recbole_llm import distributed
from recbole_llm.compat import trust_checkpoint
from recbole_llm.trainer.resume import ResumableTrainer

# the DataStruct entries that hold one row per evaluated user (or scored row); the others describe the dataset
ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label", "rec.users")


class RowCollector(Collector):
    """RecBole's Collector that also keeps each evaluated row's user id (``rec.users``), holds the rows of every
    process in rank order, and keeps the data of its last evaluation in :attr:`last`."""

    def __init__(self, config):
        super().__init__(config)
        self.last = None

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        uid = self.config["USER_ID_FIELD"]
        if uid in interaction:
            self.data_struct.update_tensor("rec.users", interaction[uid].reshape(-1).cpu())

    def get_data_struct(self):
        if "rec.users" in self.data_struct:  # a row field: cleared with the others (RecBole's list lacks it)
            users = self.data_struct["rec.users"]
            del self.data_struct["rec.users"]
            struct = super().get_data_struct()
            struct.set("rec.users", users)
        else:
            struct = super().get_data_struct()
        if distributed.is_distributed():
            shards = distributed.all_gather({key: struct[key] for key in ROW_KEYS if key in struct})
            for key in dict.fromkeys(key for shard in shards for key in shard):
                struct.set(key, torch.cat([shard[key] for shard in shards if key in shard]))
        self.last = struct
        return struct


class ParallelTrainer:
    """Mixed into a trainer class by :func:`parallel_trainer`: gathered evaluation and rank-0 checkpoints."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = RowCollector(config)
        if distributed.is_distributed():
            self.saved_model_file = distributed.broadcast(self.saved_model_file)  # RecBole's name holds a time stamp

    def _save_checkpoint(self, epoch, *args, **kwargs):
        # the arguments pass through as given: RecBole's decision-tree trainers take the epoch alone
        if distributed.is_main() or getattr(self, "collective_checkpoints", False):  # sharded weights: all gather
            super()._save_checkpoint(epoch, *args, **kwargs)
        if not distributed.is_main():  # the group's file, written by rank 0: this process may load it
            trust_checkpoint(kwargs.get("saved_model_file", self.saved_model_file))

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        distributed.barrier()  # every checkpoint rank 0 wrote before is complete
        if eval_data is not None and len(eval_data) == 0:
            # none of the evaluated users is this process's: it still takes part in the gather
            return self.evaluator.evaluate(self.eval_collector.get_data_struct())
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)


@cache
def parallel_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` for a run in one process or several (see the module docstring); RecBole's trainers whose
    ``fit`` is RecBole's own also resume an interrupted run (:mod:`recbole_llm.trainer.resume`; LLMTrainer has
    its own checkpoints and resumes by itself)."""
    if issubclass(trainer_cls, ParallelTrainer):
        return trainer_cls
    resumable = trainer_cls.fit is Trainer.fit
    bases = (ParallelTrainer, ResumableTrainer, trainer_cls) if resumable else (ParallelTrainer, trainer_cls)
    return type(trainer_cls.__name__, bases, {"__module__": trainer_cls.__module__})
