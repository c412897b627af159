"""CALRec against RecBole's sequential baselines on ml-100k, with the paper's ablations.

    python benchmarks/calrec_ml100k.py                  # 2-core CPU budget (--preset=cpu), about an hour
    python benchmarks/calrec_ml100k.py --preset=none    # the paper-like defaults (GPU)

Every model runs through recbole_llm's pipeline on one protocol (leave-one-out by time, full ranking;
Recall@1, Recall@10, NDCG@10, MRR@10; ``exclude_history`` resolved once and applied to every model, RecBole's
sequential default unless ``--exclude_history`` is given). Ablations: CALRec without the contrastive terms
(alpha = beta = 0), Stage II only (no multi-domain Stage I), and BM25 normalised by each sample's self-score
instead of the paper's min-max. Writes a markdown report with the command, commit and machine, and
appends every run's record to a JSON Lines file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.quick_start import comparison_protocol, comparison_table, git_commit, run_in_comparison

BASELINES = ["Pop", "GRU4Rec", "SASRec", "BERT4Rec"]
CALREC_RUNS = [
    ("CALRec", {}),
    ("CALRec (no contrastive)", {"contrastive": False}),
    ("CALRec (Stage II only)", {"calrec_stages": [2]}),
    ("CALRec (self-normalised BM25)", {"bm25_normalization": "self"}),
]
PROTOCOL = {"metrics": ["Recall", "NDCG", "MRR"], "topk": [1, 10], "valid_metric": "NDCG@10"}


def machine() -> str:
    import torch

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu", help="properties/presets/<Model>-<preset>.yaml, or 'none'")
    parser.add_argument("--models", default=",".join(BASELINES), help="RecBole baselines to run")
    parser.add_argument("--skip_ablations", action="store_true")
    parser.add_argument("--exclude_history", choices=["True", "False"], default=None,
                        help="the protocol's history exclusion for every model (default: RecBole's for sequential)")
    parser.add_argument("--out", default="saved/benchmarks/calrec-ml-100k.md")
    parser.add_argument("--results", default="saved/benchmarks/calrec-ml-100k.jsonl")
    args = parser.parse_args(argv)

    common = {**PROTOCOL, "show_progress": False}
    if args.exclude_history is not None:
        common["exclude_history"] = args.exclude_history == "True"
    if args.preset != "none":
        common["preset"] = args.preset
    baselines = [m for m in args.models.split(",") if m]
    protocol = comparison_protocol(["CALRec", *baselines], args.dataset, config_dict=common)
    runs = [(name, name, {}) for name in baselines]
    calrec_runs = CALREC_RUNS[:1] if args.skip_ablations else CALREC_RUNS
    runs += [(label, "CALRec", overrides) for label, overrides in calrec_runs]

    started, commit = time.strftime("%Y-%m-%d %H:%M"), git_commit()  # the code that runs, not HEAD at the end
    records = [
        run_in_comparison(model, args.dataset, protocol, config_dict={**common, **overrides}, results_path=args.results,
                          label=label, fresh_process=len(runs) > 1)
        for label, model, overrides in runs
    ]

    command = "python benchmarks/calrec_ml100k.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (
        f"CALRec vs RecBole sequential models on {args.dataset} (preset: {args.preset})\n\n"
        f"- command: `{command.strip()}`\n- commit: {commit}\n- machine: {machine()}\n- started: {started}\n"
        f"- protocol: {protocol}\n\n{comparison_table(records)}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
