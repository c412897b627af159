"""Each LLM method at its two-hour CPU budget (``--preset=cpu-2h``) against RecBole's converged baselines.

    python benchmarks/budget_2h.py --model=SemConv            # train and test, then the report with the baselines
    python benchmarks/budget_2h.py --model=SemConv --report   # the report only (the records so far)

The method runs with ``properties/presets/<Model>-cpu-2h.yaml`` under its family's protocol, the one
``benchmarks/baselines.py`` trains the baselines with (sequential: leave-one-out by time, full ranking of every
user, Recall/NDCG/MRR/Hit at 1, 5, 10, validated on NDCG@10; CTR: RALLRec's labeled rows), so the records pair user
by user (row by row) for the paired intervals. Its record (with the learning curve of ``valid_curve_steps``: the
valid metric against training seconds and targets) is appended to ``benchmarks/results/budget-2h-<Model>-<dataset>.jsonl``
(kept in the repository with the baselines' records); the report puts it beside every baseline record in
``benchmarks/results/baselines-<family>-<dataset>.jsonl``
(``...-rows<N>.jsonl`` with ``--eval_max_interactions=N``: RALLRec cannot score all ~19k valid and test rows in
its budget, so its comparison samples rows, and the CTR baselines train under that protocol too)
(whatever has converged so far: the table says how many epochs each trained and whether early stopping ended it).
A run stopped by the end of a session resumes at its last curve point when started again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)

sys.path.insert(0, str(Path(__file__).parent))
from baselines import details, family_protocol, results_name  # noqa: E402
from calrec_ml100k import machine  # noqa: E402
from common import RESULTS, report_from_results, run_and_report  # noqa: E402

FAMILY = {"SemConv": "sequential", "CALRec": "sequential", "ILM": "sequential", "RALLRec": "ctr"}


def curve_details(records) -> str:
    """The learning curve of each record that has one: the valid metric after each share of the training."""
    lines = []
    for r in records:
        curve = r.get("valid_curve") or []
        if not curve:
            continue
        lines += [f"\nLearning curve of {r['model']} (valid {r['valid_metric']}):\n",
                  "| epochs | optimizer steps | training seconds | targets trained | valid score |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['epochs']:.3f} | {p['optimizer_steps']} | {p['train_seconds']:.0f} | {p['train_targets']} "
                  f"| {p['valid_score']:.4f} |" for p in curve]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(FAMILY), required=True)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu-2h")
    parser.add_argument("--eval_max_interactions", type=int, default=None, metavar="N",
                        help="CTR: the protocol's sample of N valid and N test rows (the baselines trained with "
                             "baselines.py --family=ctr --eval_max_interactions=N); default every row")
    parser.add_argument("--report", action="store_true", help="train nothing: the report of the records so far")
    parser.add_argument("--stopping_step", type=int, default=10,
                        help="the baselines' early stopping (baselines.py's --stopping_step), for their 'stopped "
                             "early' column")
    args = parser.parse_args(argv)

    family = FAMILY[args.model]
    results = f"{RESULTS}/budget-2h-{args.model}-{args.dataset}.jsonl"
    out = f"saved/benchmarks/{Path(results).stem}.md"
    baseline_results = results_name(family, args.dataset, args.eval_max_interactions)
    title = (f"{args.model} at a 2-hour CPU budget (--preset={args.preset}) against RecBole's converged {family} "
             f"baselines on {args.dataset}")
    # the baselines' epochs and early stopping; the method's budget is its preset's epochs, drawn as its curve
    both = lambda records: (  # noqa: E731
        details([r for r in records if r["model"] != args.model], args.stopping_step) + "\n" + curve_details(records))
    if not args.report:
        protocol = family_protocol(family, args.dataset, args.eval_max_interactions)
        run_and_report([(args.model, args.model, {"preset": args.preset, "show_progress": False})], args.dataset,
                       protocol, script="benchmarks/budget_2h.py", argv=argv, results=results, out=out,
                       title=title, details=both, machine=machine())
    command = "python benchmarks/budget_2h.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report_from_results([baseline_results, results], out, title=title, command=command, machine=machine(),
                        details=both)


if __name__ == "__main__":
    main()
