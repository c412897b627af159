"""SemConv decoding costs on ml-100k: trie-constrained beam search against free beam search and against
transformers' PrefixConstrainedLogitsProcessor at the same beam width, and top-K cache lookups against running
the model.

    python benchmarks/semconv_decoding.py                              # untrained model, --preset=cpu
    python benchmarks/semconv_decoding.py --checkpoint saved/SemConv-ml-100k-<fp>/best

The constraint's cost does not depend on the weights, so an untrained model measures it as well as a trained one
(a checkpoint makes the top-K export meaningful). Each timing is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import recbole_llm  # noqa: F401,I001  (before torch: huge pages for large tensors; compat shims)
import torch

from recbole_llm.quick_start import build_model_and_data, git_commit, load_model, make_config
from recbole_llm.serving import TopKCache, export_top_k
from recbole_llm.fingerprint import run_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--users", type=int, default=64, help="users timed per decoding variant")
    parser.add_argument("--reference_users", type=int, default=16, help="users for the slow reference processor")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="saved/benchmarks/semconv-decoding.md")
    args = parser.parse_args(argv)

    if args.checkpoint:
        config, model, _, _, _, test = load_model(args.checkpoint)
    else:
        config = make_config("SemConv", args.dataset, config_dict={"preset": args.preset, "show_progress": False})
        _, (_, _, test), model = build_model_and_data(config)
    model.eval()
    histories = model._histories(next(iter(test))[0])
    batch = model.generation_batch_size

    def decode(constraint: str, users: list) -> None:
        for start in range(0, len(users), batch):
            model.beam_search(users[start: start + batch], constraint)

    timed = histories[: args.users]
    seconds = {kind: best_of(args.repeats, lambda kind=kind: decode(kind, timed)) for kind in ("none", "trie")}
    reference_users = histories[: args.reference_users]
    trie_small = best_of(args.repeats, lambda: decode("trie", reference_users))
    reference_small = best_of(1, lambda: decode("reference", reference_users))

    # the processors alone, on one step's scores of a full beam batch
    from transformers import PrefixConstrainedLogitsProcessor

    from recbole_llm.llm.token_trie import TrieConstrainedLogitsProcessor, reference_allowed_tokens_fn

    rows, vocab, prompt = batch * model.beams, model.llm.get_output_embeddings().out_features, 8
    prefixes = model.item_codes[1:][torch.randint(model.n_items - 1, (rows,))][:, :2]
    input_ids = torch.cat([torch.zeros(rows, prompt, dtype=torch.long), model.vocabulary.level_tokens[
        torch.arange(2), prefixes].cpu()], dim=1)
    scores = torch.randn(rows, vocab)
    ours = TrieConstrainedLogitsProcessor(model.trie.to("cpu"), prompt, model.eos)
    reference = PrefixConstrainedLogitsProcessor(reference_allowed_tokens_fn(model.code_tokens[1:], prompt, model.eos),
                                                 model.beams)
    step_ours = best_of(20, lambda: ours(input_ids, scores)) * 1e3
    step_reference = best_of(3, lambda: reference(input_ids, scores)) * 1e3

    # pre-computed top-K: export every test user once, then serve by lookup
    fingerprint = run_fingerprint(config)
    export_seconds = best_of(1, lambda: export_top_k(model, test, "saved/benchmarks/semconv-top-k.jsonl", 20,
                                                     fingerprint=fingerprint, model_name="SemConv",
                                                     dataset_name=config["dataset"]))
    cache = TopKCache.load("saved/benchmarks/semconv-top-k.jsonl", fingerprint)
    users = list(cache.lists)
    lookups = []
    for user in users:
        start = time.perf_counter()
        cache.recommend(user, 10)
        lookups.append(time.perf_counter() - start)
    one_user = best_of(args.repeats, lambda: model.beam_search(histories[:1]))

    per_user = {kind: s / len(timed) for kind, s in seconds.items()}
    command = "python benchmarks/semconv_decoding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = f"""SemConv decoding on {config['dataset']} ({'checkpoint ' + args.checkpoint if args.checkpoint else 'untrained model, preset ' + args.preset})

- command: `{command.strip()}`
- commit: {git_commit()}
- machine: {machine()}
- beams: {model.beams}, code length: {model.levels}, catalogue: {model.n_items - 1} items, users per generate call: {batch}

| decoding ({len(timed)} users) | seconds per user |
|---|---|
| free beam search (no constraint) | {per_user['none']:.3f} |
| trie-constrained (vectorised processor) | {per_user['trie']:.3f} |
| overhead of the constraint | {100 * (per_user['trie'] / per_user['none'] - 1):+.1f} % |

| constraint only | trie processor | transformers PrefixConstrainedLogitsProcessor | speed-up |
|---|---|---|---|
| beam search, {len(reference_users)} users (s/user) | {trie_small / len(reference_users):.3f} | {reference_small / len(reference_users):.3f} | {reference_small / trie_small:.1f}x |
| one processor call, {rows} beams x {vocab} tokens (ms) | {step_ours:.2f} | {step_reference:.1f} | {step_reference / step_ours:.0f}x |

| serving | time |
|---|---|
| export top-20 of {len(users)} users (once) | {export_seconds:.0f} s |
| lookup of one user's top-10 from the export (median) | {statistics.median(lookups) * 1e6:.1f} us |
| running the model for one user (beam search) | {one_user * 1e3:.0f} ms |
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
