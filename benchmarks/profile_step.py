"""Where one training step of each LLM method spends its time and memory (torch.profiler), at a preset's settings.

    python benchmarks/profile_step.py                              # CALRec, SemConv, RALLRec, ILM; --preset=cpu
    python benchmarks/profile_step.py --models=CALRec --set llm_gradient_checkpointing=False

For each method: the model and data are built as a run builds them (the preset's settings, cached artifacts
reused), the first training batches of epoch 0 are taken exactly as the trainer takes them (the model's own
examples where it has them, else RecBole's rows), one warm-up step runs, then ``--steps`` steps (forward, backward,
clipping, the optimizer; ``gradient_accumulation_steps`` passes each) are timed and their peak memory measured,
then one more step runs under torch.profiler. Printed per method: seconds per step, tokens and predicted
positions per step, training targets per step (where the model counts them: what a budget is sized by), the
operators with the most self CPU time, the peak resident memory of the process while
building and during the timed steps. Run it alone: profiles of a loaded machine are not the machine's.
"""

from __future__ import annotations

import argparse
import gc
import time

import psutil
import recbole_llm  # noqa: F401,I001  (before torch: huge pages for large tensors; compat shims)
import torch
from torch.profiler import ProfilerActivity, profile

from recbole_llm.memory import PeakMemory
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config
from recbole_llm.registry import get_trainer
from recbole_llm.settings import parse_value
from recbole_llm.trainer.llm_trainer import clear_batch_counts, take_batch_counts

from calrec_ml100k import machine  # noqa: E402  (same folder)

METHODS = ("CALRec", "SemConv", "RALLRec", "ILM")


def first_batches(trainer, model, train_data, n: int):
    """The first ``n`` batches of epoch 0 and the loss function the trainer would use for them."""
    batches = model.epoch_batches(train_data.dataset, 0) if hasattr(model, "epoch_batches") else None
    if batches is None:
        return [b for b, _ in zip(train_data, range(n))], model.calculate_loss
    taken = []
    for batch in batches:
        taken.append(batch)
        if len(taken) == n:
            break
    return taken, model.batch_loss


class PhasePeaks(PeakMemory):
    """:class:`PeakMemory` that also keeps the peak of each phase of a step (``peaks.phase = "backward"``)."""

    def __init__(self, interval: float = 0.02):
        super().__init__(interval)
        self.phase, self.phase_peaks = "other", {}

    def record(self, rss_mib: float) -> None:
        super().record(rss_mib)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0.0), rss_mib)


def step(trainer, loss_func, window, peaks: PhasePeaks | None = None) -> tuple[int, int, int]:
    """One optimizer step over ``window``'s batches (``gradient_accumulation_steps`` of them), as the trainer takes
    it (its mixed precision, the mean of the batches' losses); the tokens, LM-head positions and training targets
    the model counted. ``peaks`` is told the phase: forward, backward, optimizer."""
    tokens = predictions = targets = 0
    mark = (lambda phase: setattr(peaks, "phase", phase)) if peaks is not None else (lambda phase: None)
    for batch in window:
        mark("forward")
        clear_batch_counts(trainer.model)
        with trainer.autocast():
            losses = loss_func(batch.to(trainer.device) if hasattr(batch, "to") else batch)
            loss = sum(losses) if isinstance(losses, tuple) else losses
        mark("backward")
        (loss / len(window)).backward()
        batch_tokens, batch_targets, batch_predictions = take_batch_counts(trainer.model)
        tokens, predictions, targets = tokens + batch_tokens, predictions + batch_predictions, targets + batch_targets
    if trainer.clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainer.trainable_parameters, **trainer.clip_grad_norm)
    mark("optimizer")
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    mark("other")
    return tokens, predictions, targets


def profile_method(name: str, dataset: str, preset: str, steps: int, settings: dict, rows: int) -> str:
    config = make_config(name, dataset, config_dict={"preset": preset, "show_progress": False, "state": "ERROR",
                                                     **settings})
    with PeakMemory() as built:
        _, (train_data, _, _), model = build_model_and_data(config)
        trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    accumulation = trainer.accumulation_steps
    batches, loss_func = first_batches(trainer, model, train_data, (steps + 2) * accumulation)
    windows = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
    model.train()
    step(trainer, loss_func, windows[0])  # warm-up: lazy allocations, first-call dispatch, the optimizer's state
    timed, counts = windows[1:-1], [0, 0, 0]  # tokens, LM-head positions, targets
    with PhasePeaks() as stepped:  # timed and measured without the profiler (it holds its records in memory)
        start = time.perf_counter()
        for window in timed:
            counts = [a + b for a, b in zip(counts, step(trainer, loss_func, window, stepped))]
        seconds = (time.perf_counter() - start) / max(1, len(timed))
    tokens, predictions, targets = (count / max(1, len(timed)) for count in counts)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(trainer, loss_func, windows[-1])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
    out = (f"## {name} ({preset} preset{', ' + str(settings) if settings else ''})\n\n"
           f"- seconds per optimizer step: {seconds:.2f} ({accumulation} pass{'es' if accumulation > 1 else ''})\n"
           f"- tokens per step: {tokens:.0f}, LM-head positions per step: {predictions:.0f}, "
           f"tokens/s: {tokens / seconds:.0f}\n"
           + (f"- training targets per step: {targets:.1f}, tokens per target: {tokens / targets:.1f}, "
              f"targets/s: {targets / seconds:.2f}\n" if targets else "") +
           f"- peak resident memory: {built.peak_rss_mib / 1024:.2f} GiB while building, "
           f"{stepped.peak_rss_mib / 1024:.2f} GiB during the steps ("
           + ", ".join(f"{phase} {mib / 1024:.2f}" for phase, mib in stepped.phase_peaks.items() if phase != "other")
           + f")\n\n```\n{table}\n```\n")
    del trainer, model, train_data, batches
    gc.collect()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(METHODS))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per method")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every model")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    settings = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    report = [f"# One training step per method, profiled\n\n- command: `python benchmarks/profile_step.py "
              f"{' '.join(argv if argv is not None else __import__('sys').argv[1:])}`\n- commit: {git_commit()}\n"
              f"- machine: {machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB\n"
              f"- torch threads: {torch.get_num_threads()}\n"]
    for name in [m for m in args.models.split(",") if m]:
        section = profile_method(name, args.dataset, args.preset, args.steps, settings, args.rows)
        print(section, flush=True)
        report.append(section)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(report))


if __name__ == "__main__":
    main()
