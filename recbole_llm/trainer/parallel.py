"""Any trainer (RecBole's or :class:`recbole_llm.trainer.LLMTrainer`) in a run of several processes.

Evaluation is exact. Each process ranks (or scores) only its shard of the users (:mod:`recbole_llm.data.eval_sample`
cuts the valid and test parts to them, contiguous blocks without padding); :class:`GatheredCollector` gathers the
per-user rows RecBole's evaluator reads (the top-K hits and positive counts, mean ranks, scores and labels) from
every process, so RecBole's evaluator computes every metric once over exactly the users of a single-process run
(not RecBole's ``_map_reduce``, which averages per-process means and counts padded users twice). Every process
gets the same result, so early stopping decides alike everywhere.

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

from recbole_llm import distributed
from recbole_llm.compat import trust_checkpoint

# the DataStruct entries that hold one row per evaluated user (or scored row); the others describe the dataset
ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")


class GatheredCollector(Collector):
    """RecBole's Collector whose evaluation data holds the rows of every process, in rank order."""

    def get_data_struct(self):
        struct = super().get_data_struct()
        shards = distributed.all_gather({key: struct[key] for key in ROW_KEYS if key in struct})
        for key in dict.fromkeys(key for shard in shards for key in shard):
            struct.set(key, torch.cat([shard[key] for shard in shards if key in shard]))
        return struct


class ParallelTrainer:
    """Mixed into a trainer class by :func:`parallel_trainer`: gathered evaluation and rank-0 checkpoints."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = GatheredCollector(config)
        self.saved_model_file = distributed.broadcast(self.saved_model_file)  # RecBole's name holds a time stamp

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if distributed.is_main() or getattr(self, "collective_checkpoints", False):  # sharded weights: all gather
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
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
    """``trainer_cls`` for a run of several processes (see the module docstring)."""
    if issubclass(trainer_cls, ParallelTrainer):
        return trainer_cls
    return type(trainer_cls.__name__, (ParallelTrainer, trainer_cls), {"__module__": trainer_cls.__module__})
