"""CALRec's Stage II with one example per prefix (the paper) against packed windows, on the same targets.

    python benchmarks/calrec_packing.py                    # ml-100k, the first users' first 96 targets, fp32
    python benchmarks/calrec_packing.py --targets=400 --max_history_items=20

Both modes train the same next-item targets of RecBole's training split (the first ``--targets`` of the users in
id order, each user's in time order), with the same backbone, histories of up to ``max_history_items`` items (windows of
``max_history_items + 1`` items overlapping by half, the defaults of properties/model/CALRec.yaml) and the
trainer's real steps (both towers, three loss terms, backward, clipping, AdamW), from the same initial weights.
Reports tokens per target (both towers), targets/s and tokens/s, and the mean training loss in each mode.
"""

from __future__ import annotations

import argparse
import time

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.data.packing import sequence_windows
from recbole_llm.data.sequences import user_sequences
from recbole_llm.llm.examples import ExampleBatches
from recbole_llm.model.calrec import CALRecTrainer, PackedBatch, StageBatch
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config

from calrec_ml100k import machine  # noqa: E402  (same folder)


def train(trainer, batches, loss_func) -> dict:
    trainer.train_tokens = trainer.train_targets = 0
    trainer.train_seconds = 0.0
    start = time.perf_counter()
    loss = trainer._train_epoch(batches, epoch_idx=0, loss_func=loss_func)
    seconds = time.perf_counter() - start
    return {"targets": trainer.train_targets, "tokens": trainer.train_tokens, "seconds": seconds,
            "loss": sum(loss) / len(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--targets", type=int, default=96)
    parser.add_argument("--max_history_items", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="per-prefix examples per step (32, the paper-like "
                        "default, holds ~30k tokens of 20-item histories: more activations than a 24 GiB machine has)")
    parser.add_argument("--windows", type=int, default=3, help="packed windows per step")
    args = parser.parse_args()

    window, context = args.max_history_items + 1, (args.max_history_items + 1) // 2
    settings = {"show_progress": False, "state": "ERROR", "max_history_items": args.max_history_items,
                "calrec_window_items": window, "calrec_window_context": context, "llm_dtype": "fp32",
                "train_batch_size": args.batch, "calrec_window_batch_size": args.windows}
    config = make_config("CALRec", args.dataset, config_dict=settings)
    _, (train_data, _, _), model = build_model_and_data(config)
    start_weights = {k: v.clone() for k, v in model.state_dict().items()}

    packed, prefixes = [], []
    for sequence in user_sequences(train_data.dataset).values():
        sequence = sequence[: args.targets - len(prefixes) + 1]  # exactly --targets targets in all
        for w in sequence_windows(len(sequence), window, context):
            tokens, spans = model.prompt.window(sequence, model.item_tokens, w)
            packed.append((tokens, spans))
            for position in range(w.first_target, w.end):
                history = sequence[:position]
                prefixes.append((model.prompt.history(history, model.item_tokens),
                                 model.item_tokens[sequence[position]]))
        if len(prefixes) >= args.targets:
            break

    per_prefix = [StageBatch([p for p, _ in prefixes[i: i + args.batch]], [t for _, t in prefixes[i: i + args.batch]])
                  for i in range(0, len(prefixes), args.batch)]
    build = lambda examples, pad: PackedBatch.build(examples, pad, model.prompt.eos, model.item_tokens)  # noqa: E731
    windows = list(ExampleBatches(packed, args.windows, model.prompt.pad, seed=0, build=build))

    rows = []
    for label, batches, loss_func in (("per prefix (paper)", per_prefix, model.stage_loss),
                                      ("packed windows", windows, model.batch_loss)):
        model.load_state_dict(start_weights)
        trainer = CALRecTrainer(config, model)  # fresh optimizer
        rows.append({"label": label, "batches": len(batches), **train(trainer, batches, loss_func)})

    print(f"commit {git_commit()}; {machine()}; {args.dataset}, {rows[0]['targets']} targets of the first users, "
          f"histories <= {args.max_history_items} items (windows of {window}, context {context}), fp32\n")
    print("| mode | steps | targets | tokens per target | targets/s | tokens/s | seconds | mean batch loss |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['batches']} | {row['targets']} | {row['tokens'] / row['targets']:.0f} | "
              f"{row['targets'] / row['seconds']:.2f} | {row['tokens'] / row['seconds']:.0f} | {row['seconds']:.0f} | "
              f"{row['loss']:.4f} |")
    base, packed_row = rows
    print(f"\npacked: {base['tokens'] / base['targets'] / (packed_row['tokens'] / packed_row['targets']):.1f}x fewer "
          f"tokens per target, {packed_row['targets'] / packed_row['seconds'] / (base['targets'] / base['seconds']):.1f}x "
          "the targets per second")


if __name__ == "__main__":
    main()
