"""ILM against its own baselines (MLP adaptor, ILM-rand), RecBole's SASRec and Pop, CALRec and SemConv on ml-100k,
with the paper's phase-1 loss ablations and the number of queries.

    python benchmarks/ilm_ml100k.py                               # 2-core CPU budget (--preset=cpu), every part
    python benchmarks/ilm_ml100k.py --only=ilm --only=baselines   # parts: baselines | ilm | switches | losses | queries
    python benchmarks/ilm_ml100k.py --only=queries --runs="N=1"   # some runs of a part
    python benchmarks/ilm_ml100k.py --eval_max_users=300          # rank for a seeded sample of 300 users (all: ~8 min per ILM run)
    python benchmarks/ilm_ml100k.py --preset=none                 # the paper-like defaults (GPU)

Every model runs through recbole_llm's pipeline on one protocol (leave-one-out by time, full ranking, Recall@5/@10
and NDCG@5/@10, ``exclude_history`` resolved once for all: RecBole's sequential default, history kept). The
switches are the paper's comparisons (ILM with an MLP adaptor instead of the Q-Former, CoLLM-style; ILM-rand:
phase 2 without phase 1); the losses part is the paper's Table 4 (ILM-IT: ITC+ITM+ITG; +IIC; +UIC; all); the
queries part N in {1, 2, 4, 8}. The report holds the command, commit and machine, peak memory, training tokens/s
and evaluation users/s; every run's record is appended to a JSON Lines file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.quick_start import comparison_protocol

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402
from common import filter_runs, run_and_report  # noqa: E402

BASELINES = ["Pop", "SASRec", "CALRec", "SemConv"]
PROTOCOL = {"metrics": ["Recall", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10"}
IT = {"itc": 1.0, "itm": 1.0, "itg": 1.0}

ILM_RUNS = {
    "ilm": [("ILM", {})],
    "switches": [("ILM (MLP adaptor)", {"ilm_adaptor": "mlp"}), ("ILM-rand (no phase 1)", {"ilm_phase1": False})],
    "losses": [
        ("ILM-IT (ITC+ITM+ITG)", {"ilm_phase1_losses": IT}),
        ("ILM-IT-II (+IIC)", {"ilm_phase1_losses": {**IT, "iic": 1.0}}),
        ("ILM-IT-UI (+UIC)", {"ilm_phase1_losses": {**IT, "uic": 1.0}}),
    ],
    "queries": [(f"ILM (N={n})", {"ilm_queries": n}) for n in (1, 2, 8)],  # N=4 is the default run
}


def details(records) -> str:
    lines = ["| run | train tokens/s | eval users/s | train s | eval s | peak RSS MiB | peak GPU MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r.get('train_tokens_per_second')} | "
                     f"{r['test_rows'] / r['eval_seconds']:.2f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_gpu_mib']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu", help="properties/presets/<Model>-<preset>.yaml, or 'none'")
    parser.add_argument("--models", default=",".join(BASELINES), help="baselines to run")
    parser.add_argument("--only", choices=["baselines", *ILM_RUNS], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--runs", action="append", default=[],
                        help="run only the runs whose label contains this text (repeatable); default: all")
    parser.add_argument("--eval_max_users", type=int, default=None,
                        help="rank for a seeded sample of this many users (the same for every run); default: all")
    parser.add_argument("--out", default="saved/benchmarks/ilm-ml-100k.md")
    parser.add_argument("--results", default="saved/benchmarks/ilm-ml-100k.jsonl")
    args = parser.parse_args(argv)

    common = {**PROTOCOL, "show_progress": False, "eval_max_users": args.eval_max_users}
    if args.preset != "none":
        common["preset"] = args.preset
    baselines = [m for m in args.models.split(",") if m]
    protocol = comparison_protocol(["ILM", *baselines], args.dataset, config_dict=common)
    parts = args.only or ["baselines", *ILM_RUNS]
    runs = [(name, name, common) for name in baselines] if "baselines" in parts else []
    for part, part_runs in ILM_RUNS.items():
        if part in parts:
            runs += [(label, "ILM", {**common, **overrides}) for label, overrides in part_runs]
    runs = filter_runs(parser, runs, args.runs)
    run_and_report(runs, args.dataset, protocol, script="benchmarks/ilm_ml100k.py", argv=argv, results=args.results,
                   out=args.out, title=f"ILM vs baselines on {args.dataset} (preset: {args.preset})",
                   details=details, machine=machine())


if __name__ == "__main__":
    main()
