"""Why a whole CALRec cpu-2h run trained slower than its profiled first steps: three explanations, each measured
in a fresh process on the preset's batches with ``profile_step.step`` (BENCHMARKS.md, "CALRec at a 2-hour CPU
budget").

    python benchmarks/calrec_step_rate.py --check=stage1    # the same steps before and after Stage I
    python benchmarks/calrec_step_rate.py --check=trainer   # LLMTrainer._train_epoch against step() on the same batches
    python benchmarks/calrec_step_rate.py --check=later     # the epoch's first batches against its later ones

Settings as the first run (commit ``c94449f``: each user's latest 32 targets); run it alone.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from itertools import islice

import psutil

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.memory import release_memory
from recbole_llm.quick_start import build_model_and_data, make_config
from recbole_llm.registry import get_trainer

from profile_step import step  # noqa: E402  (same folder)


def build(**settings):
    # a checkpoint folder of its own: Stage I trains here every time (not loaded from an earlier run's cache)
    config = make_config("CALRec", "ml-100k", config_dict={"preset": "cpu-2h", "show_progress": False,
                                                          "state": "ERROR", "train_targets_per_user": 32,
                                                          "checkpoint_dir": tempfile.mkdtemp(), **settings})
    _, (train_data, _, _), model = build_model_and_data(config)
    trainer = get_trainer(config["MODEL_TYPE"], "CALRec")(config, model)
    return trainer, model, train_data


def batches_at(model, train_data, indices) -> dict:
    """The epoch-0 batches at ``indices``, in the trainer's order."""
    wanted = set(indices)
    epoch = islice(model.epoch_batches(train_data.dataset, 0), max(wanted) + 1)  # built no further than needed
    return {i: b for i, b in enumerate(epoch) if i in wanted}


def timed(label, trainer, model, batches) -> None:
    """The steps' rate, and per step the page faults the process took and its system (kernel) seconds."""
    before, start, tokens = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    for batch in batches:
        tokens += step(trainer, model.batch_loss, [batch])[0]
    seconds, after, n = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF), len(batches)
    print(f"{label}: {seconds / n:.2f} s/step, {tokens / n:.0f} tokens/step, {tokens / seconds:.0f} tokens/s, "
          f"{(after.ru_minflt - before.ru_minflt) / n:.0f} page faults/step, "
          f"{(after.ru_stime - before.ru_stime) / n:.2f} system s/step, "
          f"resident {psutil.Process().memory_info().rss / 2**30:.1f} GiB", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", choices=("stage1", "trainer", "later"), required=True)
    parser.add_argument("--stage1_steps", type=int, default=4)
    args = parser.parse_args(argv)
    trainer, model, train_data = build(stage1_steps=args.stage1_steps)
    indices = [0, 1, 2, 3] + ([200, 201, 202, 400, 401, 402] if args.check == "later" else [4])
    batches = batches_at(model, train_data, indices)
    model.train()
    step(trainer, model.batch_loss, [batches[0]])  # warm-up
    first = [batches[i] for i in (1, 2, 3)]
    if args.check == "stage1":
        timed("fresh", trainer, model, first)
        trainer._stage_one(train_data, False)
        model.train()
        timed(f"after {args.stage1_steps} Stage-I steps", trainer, model, first)
        release_memory()
        timed("after Stage I and release_memory()", trainer, model, first)
        timed("again", trainer, model, first)
    elif args.check == "trainer":
        four = [batches[i] for i in (1, 2, 3, 4)]
        for round_ in range(2):
            timed(f"round {round_}, profile_step.step", trainer, model, four)
            start = time.perf_counter()
            trainer._train_epoch(four, epoch_idx=0, loss_func=model.batch_loss, show_progress=False)
            seconds = (time.perf_counter() - start) / len(four)
            print(f"round {round_}, LLMTrainer._train_epoch: {seconds:.2f} s/step", flush=True)
    else:
        for group in ((1, 2, 3), (200, 201, 202), (400, 401, 402), (1, 2, 3)):
            timed(f"batches {list(group)}", trainer, model, [batches[i] for i in group])


if __name__ == "__main__":
    main()
