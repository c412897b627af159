"""RALLRec's scoring passes: prompts in row order, left-padded (before), against length-sorted, right-padded (now).

    python benchmarks/rallrec_scoring.py                       # the cpu-2h preset's 1,000 valid rows, 256 timed
    python benchmarks/rallrec_scoring.py --rows=1000 --rounds=1

Builds RALLRec as a run does (``--preset``, the protocol's seeded sample of ``--eval_max_interactions`` valid rows;
cached descriptions and vectors reused), writes every valid row's scoring prompt, and prints the tokens each way
computes (real tokens, and what the padded passes of ``rallrec_score_batch_size`` prompts hold), then times P(Yes)
of the first ``--rows`` prompts both ways, alternately, and the largest difference between the two. The "before"
function is the scoring of commit 12e3786, kept here for the comparison. Run it alone.
"""

from __future__ import annotations

import argparse
import time

import recbole_llm  # noqa: F401,I001  (compat shims first)
import torch

from recbole_llm.llm.generation import left_pad
from recbole_llm.llm.pooling import decoder_and_head
from recbole_llm.quick_start import build_model_and_data, git_commit, make_config

from calrec_ml100k import machine  # noqa: E402  (same folder)


@torch.no_grad()
def before(model, prompts: list[list[int]]) -> torch.Tensor:
    """P(Yes) as commit 12e3786 scored it: chunks in row order, left-padded, the last position of each."""
    decoder, lm_head = decoder_and_head(model.llm)
    out = []
    for start in range(0, len(prompts), model.score_batch_size):
        ids, mask = left_pad(prompts[start: start + model.score_batch_size], model.pad, model.device)
        last = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        out.append(torch.softmax(lm_head(last)[:, [model.yes, model.no]].float(), dim=-1)[:, 0])
    return torch.cat(out)


def padded_tokens(lengths: list[int], batch: int) -> int:
    """Positions computed when ``lengths`` are scored in chunks of ``batch``, each padded to its longest."""
    return sum(max(lengths[i: i + batch]) * len(lengths[i: i + batch]) for i in range(0, len(lengths), batch))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu-2h")
    parser.add_argument("--eval_max_interactions", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=256, help="prompts timed each way")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    config = make_config("RALLRec", args.dataset, config_dict={
        "preset": args.preset, "eval_max_interactions": args.eval_max_interactions, "show_progress": False,
        "state": "ERROR"})
    _, (_, valid, _), model = build_model_and_data(config)
    model.eval()
    inter = valid.dataset.inter_feat
    prompts = []
    for start in range(0, len(inter), 256):
        prompts += model.prompts(inter[torch.arange(start, min(start + 256, len(inter)))], model.prompt_selection)
    lengths, batch = [len(p) for p in prompts], model.score_batch_size
    real = sum(lengths)
    old, new = padded_tokens(lengths, batch), padded_tokens(sorted(lengths), batch)
    print(f"# RALLRec scoring, {args.preset} preset, {len(prompts)} valid rows of {args.dataset}\n\n"
          f"- commit {git_commit()}; machine: {machine()}; torch threads {torch.get_num_threads()}\n"
          f"- prompts: {len(prompts)}, {real / len(prompts):.1f} tokens on average (min {min(lengths)}, "
          f"max {max(lengths)}); passes of {batch}\n"
          f"- positions computed: {old:,} in row order ({old / real - 1:.1%} padding), {new:,} sorted "
          f"({new / real - 1:.1%} padding)", flush=True)
    sample = prompts[: args.rows]
    seconds = {"before (row order, left-padded)": [], "now (sorted, right-padded)": []}
    for _ in range(args.rounds):
        for name, score in zip(seconds, (lambda: before(model, sample), lambda: model.yes_probability(sample))):
            start = time.perf_counter()
            result = score()
            seconds[name].append(time.perf_counter() - start)
            if name.startswith("before"):
                reference = result
    difference = (reference - model.yes_probability(sample)).abs().max().item()
    for name, times in seconds.items():
        print(f"- {name}: {', '.join(f'{t:.1f}' for t in times)} s for {len(sample)} prompts "
              f"({len(sample) / min(times):.2f} prompts/s at best)")
    print(f"- largest |P(Yes) before - now|: {difference:.2e}")


if __name__ == "__main__":
    main()
