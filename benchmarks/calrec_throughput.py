"""CALRec speed in fp32 and under bf16 autocast: training tokens/s against the backbone's raw forward+backward,
the backbone's forward tokens/s, and evaluation users/s, all in one run on one machine.

    python benchmarks/calrec_throughput.py               # ml-100k, --preset=cpu, 4 batches, 64 users
    python benchmarks/calrec_throughput.py --preset=none --batches=20 --users=512   # GPU, paper-like defaults

Modes: ``llm_dtype: fp32`` (no autocast) and ``llm_dtype: auto``, which autocasts to bf16 where the hardware has
native bf16 (a CPU with AVX512-BF16 / AMX, or a GPU) over fp32 master weights; on other CPUs both rows are fp32.
raw: Hugging Face forward + backward (LM loss on every position) over exactly the tensors a CALRec step feeds the
backbone (the joint history+target pass and the target-only pass), no optimizer. forward: the same passes without
gradients. CALRec: the trainer's real steps on the same batches (prompt assembly, both towers, three losses,
backward, clipping, optimizer step). Loss: CALRec's weighted loss on the first batch, before any update.
"""

from __future__ import annotations

import argparse
import time

import recbole_llm  # noqa: F401,I001  (before torch: huge pages for large tensors; compat shims)
import torch

from recbole_llm.model.calrec import CALRecTrainer, TextBatch
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config

from calrec_ml100k import machine  # noqa: E402  (same folder)


def measure(dataset: str, preset: str, dtype: str, n_batches: int, n_users: int) -> dict:
    overrides = {"show_progress": False, "state": "ERROR", "train_max_samples": 0, "llm_dtype": dtype}
    if preset != "none":
        overrides["preset"] = preset
    config = make_config("CALRec", dataset, config_dict=overrides)
    _, (train, _, test), model = build_model_and_data(config)
    trainer = CALRecTrainer(config, model)
    device = config["device"]
    batches = []
    for interaction in train:
        batches.append(interaction.to(device))
        if len(batches) == n_batches + 1:
            break
    prepared = [model.text_batch(b) for b in batches]
    passes = lambda batch: ((batch.joint_ids, batch.joint_mask), (batch.target_ids, batch.target_only_mask))  # noqa: E731

    def raw_step(batch: TextBatch, backward: bool) -> int:
        for ids, mask in passes(batch):
            with trainer.autocast(), torch.set_grad_enabled(backward):
                loss = model.llm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            if backward:
                loss.backward()
        return batch.tokens

    def tokens_per_second(backward: bool) -> float:
        raw_step(prepared[0], backward)  # warm-up
        start, tokens = time.perf_counter(), 0
        for batch in prepared[1:]:
            tokens += raw_step(batch, backward)
        return tokens / (time.perf_counter() - start)

    model.train()
    with torch.no_grad(), trainer.autocast():
        first_loss = float(sum(model.weighted_loss(prepared[0])))
    raw = tokens_per_second(backward=True)
    model.zero_grad(set_to_none=True)
    forward = tokens_per_second(backward=False)

    trainer._train_epoch(batches[:1], epoch_idx=0)  # warm-up (optimizer state allocation)
    trainer.train_tokens, trainer.train_seconds = 0, 0.0
    trainer._train_epoch(batches[1:], epoch_idx=0)
    calrec = trainer.train_tokens / trainer.train_seconds

    model.eval()
    interaction = next(iter(test))[0]
    users = interaction[torch.arange(min(n_users, interaction.length))].to(device)
    start = time.perf_counter()
    with torch.no_grad(), trainer.autocast():
        model.full_sort_predict(users)
    eval_seconds = time.perf_counter() - start
    return {"mode": f"{dtype} ({'bf16 autocast' if trainer.autocast_dtype else 'no autocast'})", "raw": raw,
            "forward": forward, "calrec": calrec, "users_per_s": users.length / eval_seconds, "loss": first_loss,
            "num_samples": config["num_samples"], "batch": config["train_batch_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--dtypes", default="fp32,auto", help="llm_dtype values to measure, in order")
    args = parser.parse_args()

    rows = [measure(args.dataset, args.preset, dtype, args.batches, args.users) for dtype in args.dtypes.split(",")]
    print(f"commit {git_commit()}; {machine()}; preset {args.preset}; batch {rows[0]['batch']}; "
          f"{args.batches} timed batches; {args.users} users, {rows[0]['num_samples']} samples each")
    print("| llm_dtype | backbone raw fwd+bwd tok/s | backbone forward tok/s | CALRec training tok/s | "
          "eval users/s | first-batch loss |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['raw']:.0f} | {row['forward']:.0f} | {row['calrec']:.0f} | "
              f"{row['users_per_s']:.2f} | {row['loss']:.4f} |")
    if len(rows) == 2:
        base, fast = rows
        print(f"\nspeed-up: raw training {fast['raw'] / base['raw']:.2f}x, forward {fast['forward'] / base['forward']:.2f}x, "
              f"CALRec training {fast['calrec'] / base['calrec']:.2f}x, evaluation {fast['users_per_s'] / base['users_per_s']:.2f}x")


if __name__ == "__main__":
    main()
