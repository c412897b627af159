"""RecBole's baselines trained the way their authors train them: until the validation metric stops improving.

    python benchmarks/baselines.py                      # Pop, GRU4Rec, SASRec, BERT4Rec on ml-100k (sequential)
    python benchmarks/baselines.py --family=ctr         # LR, FM, DeepFM, WideDeep, DIN on RALLRec's labeled rows
    python benchmarks/baselines.py --models=SASRec --epochs=300 --stopping_step=10
    python benchmarks/baselines.py --report              # the report of every model's last record so far

A stopped run resumes where it stopped when started again (``recbole_llm.trainer.resume``, from ``saved/``: SASRec
takes about 3 minutes an epoch on 2 cores, so a converged family is several sessions' work); each finished model's
record is appended to ``benchmarks/results/`` (kept in the repository), and ``--report`` assembles the family from
it.

Each model trains with RecBole's own early stopping: up to ``--epochs`` (RecBole's default 300), validated every
epoch, stopped after ``--stopping_step`` validations without improvement (RecBole's default 10), and tested with
its best validation checkpoint; the model's own RecBole defaults otherwise (no ``cpu`` preset: those two-epoch
budgets are for ``make demo`` only). The protocol is the LLM methods' (sequential: leave-one-out by time, full
ranking of every user, Recall/NDCG/MRR/Hit at 1, 5, 10, validated on NDCG@10; CTR: RALLRec's labeled rows), so
these records pair user by user with the LLM benchmarks' (``recbole_llm.significance``). The report holds the
table with paired intervals, the epochs each model trained and its best epoch, the learning curves and the bars
(PNG beside the report), the command, commit and machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.quick_start import comparison_protocol

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402
from common import RESULTS, report_from_results, run_and_report  # noqa: E402

FAMILIES = {
    # family: (baselines, the LLM method whose protocol they share, protocol settings)
    "sequential": (["Pop", "GRU4Rec", "SASRec", "BERT4Rec"], "SemConv",
                   {"metrics": ["Recall", "NDCG", "MRR", "Hit"], "topk": [1, 5, 10], "valid_metric": "NDCG@10"}),
    "ctr": (["LR", "FM", "DeepFM", "WideDeep", "DIN"], "RALLRec", {}),
}


def family_settings(family: str, rows: int | None) -> dict:
    """The family's protocol settings; ``rows``: score a seeded sample of this many valid and test rows (CTR; the
    same rows for every model), a protocol of its own for LLM scorers that cannot score them all in their budget."""
    return {**FAMILIES[family][2], **({"eval_max_interactions": rows} if rows else {})}


def family_protocol(family: str, dataset: str, rows: int | None) -> dict:
    """The family's one protocol (its LLM method's and its baselines', resolved together), shared by this script
    and benchmarks/budget_2h.py so their records pair."""
    baselines, method, _ = FAMILIES[family]
    return comparison_protocol([method, *baselines], dataset,
                               config_dict={"show_progress": False, **family_settings(family, rows)})


def results_name(family: str, dataset: str, rows: int | None) -> str:
    """``benchmarks/results/baselines-<family>-<dataset>[-rows<N>].jsonl``: one file per protocol, kept in the
    repository (a converged family takes more than one session, and ``saved/`` is not kept)."""
    return f"{RESULTS}/baselines-{family}-{dataset}" + (f"-rows{rows}" if rows else "") + ".jsonl"


def details(records, stopping_step: int) -> str:
    """Per model: epochs trained, the best validation's epoch and score, and what ended the run. The best epoch is
    the one whose weights RecBole tests: the last of equal best validations (its early stopping counts a tie as an
    improvement); RecBole stops a run after more than ``stopping_step`` validations without one, so a run with fewer
    after its best was ended by the epoch cap (``--epochs``) instead, not converged."""
    lines = ["| model | epochs trained | best epoch | best valid | stopped early |", "|---|---|---|---|---|"]
    for r in records:
        scores = r.get("valid_scores") or []
        trained = len(r.get("train_losses") or []) or len(scores)
        sign = 1 if r["valid_score_bigger"] else -1
        best = max(reversed(scores), key=lambda s: sign * s[1]) if scores else None
        after = sum(1 for s in scores if s[0] > best[0]) if best else 0
        if after > stopping_step:
            stopped = "yes"
        else:  # RecBole's TraditionalTrainer (Pop) trains one epoch whatever the config
            stopped = "no (one epoch)" if len(scores) == 1 else "no (the epoch cap ended it)"
        lines.append(f"| {r['model']} | {trained} | {best[0] + 1 if best else '–'} | "
                     f"{r['best_valid_score']:.4f} | {stopped} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sequential")
    parser.add_argument("--models", default=None, help="baselines to run (default: the family's)")
    parser.add_argument("--epochs", type=int, default=300, help="at most this many epochs (RecBole's default)")
    parser.add_argument("--stopping_step", type=int, default=10, help="validations without improvement before "
                                                                      "stopping (RecBole's default)")
    parser.add_argument("--eval_max_interactions", type=int, default=None, metavar="N",
                        help="CTR: score a seeded sample of N valid and N test rows (a protocol of its own, e.g. an LLM "
                             "method's 2-hour budget: benchmarks/budget_2h.py); default every row")
    parser.add_argument("--out", default=None, help="default saved/benchmarks/baselines-<family>-<dataset>.md")
    parser.add_argument("--results", default=None, help="records, appended (default benchmarks/results/baselines-"
                        "<family>-<dataset>.jsonl, committed with the BENCHMARKS.md section they make)")
    parser.add_argument("--report", action="store_true", help="train nothing: write the report of every model's "
                        "last record in --results (runs made by several commands or sessions)")
    args = parser.parse_args(argv)

    baselines = FAMILIES[args.family][0]
    models = [m for m in (args.models or ",".join(baselines)).split(",") if m]
    results = args.results or results_name(args.family, args.dataset, args.eval_max_interactions)
    out = args.out or f"saved/benchmarks/{Path(results).stem}.md"
    settings = {"show_progress": False, "epochs": args.epochs, "stopping_step": args.stopping_step, "eval_step": 1,
                **family_settings(args.family, args.eval_max_interactions)}
    protocol = family_protocol(args.family, args.dataset, args.eval_max_interactions)
    runs = [(model, model, settings) for model in models]
    title = (f"Converged {args.family} baselines on {args.dataset} (early stopping: at most {args.epochs} epochs, "
             f"stopping_step {args.stopping_step})")
    table = lambda records: details(records, args.stopping_step)  # noqa: E731
    if args.report:
        command = "python benchmarks/baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
        report_from_results(results, out, title=title, command=command, machine=machine(), details=table)
        return
    run_and_report(runs, args.dataset, protocol, script="benchmarks/baselines.py", argv=argv, results=results,
                   out=out, title=title, details=table, machine=machine())


if __name__ == "__main__":
    main()
