"""SemConv's loss with the whole vocabulary at code targets (LC-Rec's training) against the code rows only.

    python benchmarks/semconv_code_softmax.py                  # cpu preset, ml-100k, the first 6 batches, 2 rounds

One model (the preset's settings, ``semconv_code_softmax`` switched between the two on the same weights), the
first ``--batches`` training batches of epoch 0 as the trainer takes them; each batch's loss and backward pass run
in both modes alternately (full, codes, full, codes, ... for ``--rounds``), so both see the same batches and the
same machine state. Prints seconds per batch in each mode, the share of targets that are code tokens, and the mean
loss in each mode (codes-only is smaller: fewer rows in the softmax). Run it alone.
"""

from __future__ import annotations

import argparse
import time

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config

from calrec_ml100k import machine  # noqa: E402  (same folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    config = make_config("SemConv", args.dataset, config_dict={"preset": args.preset, "state": "ERROR",
                                                               "semconv_code_softmax": "codes"})
    _, (train_data, _, _), model = build_model_and_data(config)
    rows = model.code_rows
    batches = []
    for batch in model.epoch_batches(train_data.dataset, 0):
        batches.append(batch)
        if len(batches) == args.batches:
            break
    targets = [batch.ids[:, 1:][batch.targets[:, 1:].bool()] for batch in batches]
    codes = sum(int(((t >= rows.start) & (t < rows.stop)).sum()) for t in targets)
    model.train()
    seconds, losses = {"full": 0.0, "codes": 0.0}, {"full": 0.0, "codes": 0.0}
    for _ in range(args.rounds):
        for batch in batches:
            for mode in ("full", "codes"):
                model.code_rows = rows if mode == "codes" else None
                start = time.perf_counter()
                loss = model.token_losses(batch).mean()
                loss.backward()
                seconds[mode] += time.perf_counter() - start
                losses[mode] += loss.item()
                model.zero_grad(set_to_none=True)
    n = args.rounds * len(batches)
    print(f"SemConv ({args.preset} preset, {args.dataset}): {len(batches)} batches x {args.rounds} rounds, "
          f"{codes} of {sum(len(t) for t in targets)} targets are code tokens; commit {git_commit()}; {machine()}")
    for mode in ("full", "codes"):
        print(f"  {mode:5s}: {seconds[mode] / n:.3f} s per batch (loss and backward), mean loss {losses[mode] / n:.3f}")
    print(f"  codes / full time: {seconds['codes'] / seconds['full']:.3f}")


if __name__ == "__main__":
    main()
