"""CALRec's ranking stage with perfect generations: every sample is the user's true next-item text.

    python benchmarks/calrec_oracle.py                 # ml-100k, --preset=cpu item texts, all 943 test users

Only the generation is replaced (tests/oracle.py's pattern); BM25, the merge, RecBole's full-sort loader and
evaluator run for real. This is the ceiling the retrieval stage allows: a Recall@1 below 1.0 counts targets whose
text another item shares (ml-100k lists a few films twice) or that BM25 cannot single out. Also run with
made-up samples beside the right one, to show what each BM25 setting does with noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import recbole_llm  # noqa: F401,I001  (before torch: huge pages for large tensors; compat shims)
import torch

from recbole_llm.quick_start import build_model_and_data, comparison_protocol, git_commit, make_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import evaluate_with_recbole, history_key, targets_by_history  # noqa: E402

from calrec_ml100k import PROTOCOL, machine  # noqa: E402  (same folder)

MADE_UP = ["Title: Qwzx Blorp, Year: 1996", "Title: Vrrn Zzt, Year: 1995", "Title: Mmm, Year: 1997"]
SETTINGS = [
    ("values, min-max (default)", {}),
    ("values, self-normalised", {"bm25_normalization": "self"}),
    ("labels indexed, min-max (before)", {"bm25_index_labels": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()

    common = {**PROTOCOL, "show_progress": False, "state": "ERROR", "num_samples": 4, "preset": args.preset}
    protocol = comparison_protocol(["CALRec"], args.dataset, config_dict=common)
    print(f"commit {git_commit()}; {machine()}; {args.dataset}, preset {args.preset}; protocol {protocol}")
    print("| BM25 setting | samples | test recall@1 | test recall@10 | test ndcg@10 |")
    print("|---|---|---|---|---|")
    for label, settings in SETTINGS:
        config = make_config("CALRec", args.dataset, config_dict={**common, **protocol, **settings})
        _, (_, _, test), model = build_model_and_data(config)
        truth = targets_by_history(test)
        for samples, made_up in (("4 x the target text", []), ("3 made-up + the target (log-prob -50)", MADE_UP)):
            def generate(histories, made_up=made_up):
                texts = []
                for history in histories:
                    target = model.item_texts[truth[history_key(history)]]
                    texts += made_up + [target] * (model.num_samples - len(made_up))
                log_probs = torch.tensor([[-1.0] * len(made_up) + [-50.0] * (model.num_samples - len(made_up))])
                return texts, log_probs.repeat(len(histories), 1)

            model.generate_item_texts = generate
            result = evaluate_with_recbole(config, model, test)
            print(f"| {label} | {samples} | {result['recall@1']:.4f} | {result['recall@10']:.4f} | "
                  f"{result['ndcg@10']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
