"""CALRec speed: training tokens/s against the backbone's raw forward+backward, and evaluation users/s.

    python benchmarks/calrec_throughput.py               # ml-100k, --preset=cpu, 4 batches, 64 users
    python benchmarks/calrec_throughput.py --preset=none --batches=20 --users=512   # GPU, paper-like defaults

raw: Hugging Face forward + backward (LM loss on every position) over exactly the tensors a CALRec step feeds the
backbone (the joint history+target pass and the target-only pass), no optimizer.
CALRec: the trainer's real steps on the same batches (prompt assembly, both towers, three losses, backward,
clipping, optimizer step). The ratio shows what CALRec's pipeline costs over the bare backbone.
"""

from __future__ import annotations

import argparse
import time

import torch

import recbole_llm  # noqa: F401
from recbole_llm.model.calrec import CALRecTrainer, TextBatch
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config

from calrec_ml100k import machine  # noqa: E402  (same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--users", type=int, default=64)
    args = parser.parse_args()

    overrides = {"show_progress": False, "state": "ERROR", "train_max_samples": 0}
    if args.preset != "none":
        overrides["preset"] = args.preset
    config = make_config("CALRec", args.dataset, config_dict=overrides)
    _, (train, _, test), model = build_model_and_data(config)
    batches = []
    for interaction in train:
        batches.append(interaction)
        if len(batches) == args.batches + 1:
            break
    device = config["device"]

    def raw_step(batch: TextBatch) -> int:
        for ids, mask in ((batch.joint_ids, batch.joint_mask), (batch.target_ids, batch.target_only_mask)):
            labels = ids.masked_fill(mask == 0, -100)
            model.llm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return batch.tokens

    model.train()
    prepared = [model.text_batch(b.to(device)) for b in batches]
    raw_step(prepared[0])  # warm-up
    start, tokens = time.perf_counter(), 0
    for batch in prepared[1:]:
        tokens += raw_step(batch)
    raw = tokens / (time.perf_counter() - start)
    model.zero_grad(set_to_none=True)

    trainer = CALRecTrainer(config, model)
    trainer._train_epoch(batches[:1], epoch_idx=0)  # warm-up (optimizer state allocation)
    trainer.train_tokens, trainer.train_seconds = 0, 0.0
    trainer._train_epoch([b.to(device) for b in batches[1:]], epoch_idx=0)
    calrec = trainer.train_tokens / trainer.train_seconds

    model.eval()
    interaction = next(iter(test))[0]
    users = interaction[torch.arange(min(args.users, interaction.length))].to(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.full_sort_predict(users)
    eval_seconds = time.perf_counter() - start

    print(f"commit {git_commit()}; {machine()}; preset {args.preset}; batch {config['train_batch_size']}; "
          f"{args.batches} timed batches, {tokens} tokens")
    print(f"| backbone raw fwd+bwd tok/s | CALRec training tok/s | ratio | eval users/s ({config['num_samples']} samples) |")
    print("|---|---|---|---|")
    print(f"| {raw:.0f} | {calrec:.0f} | {calrec / raw:.0%} | {users.length / eval_seconds:.2f} |")


if __name__ == "__main__":
    main()
