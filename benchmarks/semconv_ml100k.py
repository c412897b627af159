"""SemConv against RecBole's sequential baselines (and CALRec) on ml-100k, with ablations and a learning curve.

    python benchmarks/semconv_ml100k.py                         # 2-core CPU budget (--preset=cpu)
    python benchmarks/semconv_ml100k.py --preset=none           # the paper-like defaults (GPU)
    python benchmarks/semconv_ml100k.py --only=ablations        # one part: baselines | semconv | curve | ablations
    python benchmarks/semconv_ml100k.py --semconv_preset=cpu-long --only=semconv   # SemConv's longer CPU budget
    python benchmarks/semconv_ml100k.py --only=ablations --runs="negative task" --runs="task only"   # some runs
    python benchmarks/semconv_ml100k.py --only=before --only=semconv   # layer-0 vectors + constant lr vs the defaults

Every model runs through recbole_llm's pipeline on one protocol (leave-one-out by time, full ranking, Recall@5/@10
and NDCG@5/@10, ``exclude_history`` resolved once for all: RecBole's sequential default, history kept).
Ablations: no LLM alignment loss in the tokenizer, random codes instead of learned ones, no negative-sampling task,
the sequential task only. Learning curve: the same run with 1/4 and 1/2 of the sequential windows. The report
holds the command, commit and machine, the codebook statistics, training tokens/s and evaluation users/s;
every run's record is appended to a JSON Lines file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)
from recbole_llm.quick_start import comparison_protocol, make_config

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402
from common import filter_runs, run_and_report  # noqa: E402

BASELINES = ["Pop", "SASRec", "BERT4Rec", "CALRec"]
PROTOCOL = {"metrics": ["Recall", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10"}


def semconv_runs(weights: dict) -> dict[str, list[tuple[str, dict]]]:
    """The SemConv runs by part, given the configuration's task weights."""
    without = lambda task: {k: v for k, v in weights.items() if k != task}  # noqa: E731
    scaled = lambda share: {**weights, "sequential": weights["sequential"] * share}  # noqa: E731
    return {
        "semconv": [("SemConv", {})],
        # issue 15, items 3 and 5: LightGCN's layer-0 table and a constant rate, as before that issue
        "before": [("SemConv (layer-0 vectors, constant lr)", {"semconv_cf_vectors": "table",
                                                                "lr_scheduler": "constant", "lr_warmup": 0})],
        "curve": [(f"SemConv ({label} of the windows)", {"semconv_task_weights": scaled(share)})
                  for label, share in (("1/4", 0.25), ("1/2", 0.5))],
        "ablations": [
            ("SemConv (no alignment loss)", {"semconv_lambda_align": 0.0}),
            ("SemConv (random codes)", {"semconv_codes": "random"}),
            ("SemConv (no negative task)", {"semconv_task_weights": without("negative")}),
            ("SemConv (sequential task only)", {"semconv_task_weights": {"sequential": weights["sequential"]}}),
        ],
    }


def details(records) -> str:
    """Codebook statistics and throughput of the SemConv runs (from each record's model report)."""
    lines = ["| run | collisions before resolution | usage per level | perplexity per level | recon. error | "
             "train tokens/s | eval users/s | train s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        report = r.get("model_report") or {}
        book = report.get("codebook")
        if not book:
            continue
        usage = ", ".join(f"{u:.2f}" for u in book["usage"])
        perplexity = ", ".join(f"{p:.0f}" for p in book["perplexity"])
        lines.append(
            f"| {r['model']} | {book['collision_rate']:.3f} ({book['reassigned']} moved) | {usage} | {perplexity} | "
            f"{book['reconstruction_error']:.3f} | {r.get('train_tokens_per_second')} | "
            f"{r['test_rows'] / r['eval_seconds']:.2f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu", help="properties/presets/<Model>-<preset>.yaml, or 'none'")
    parser.add_argument("--semconv_preset", default=None, help="another preset for the SemConv runs (e.g. cpu-long)")
    parser.add_argument("--models", default=",".join(BASELINES), help="baselines to run")
    parser.add_argument("--only", choices=["baselines", "semconv", "before", "curve", "ablations"], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--runs", action="append", default=[],
                        help="run only the runs whose label contains this text (repeatable); default: all")
    parser.add_argument("--out", default="saved/benchmarks/semconv-ml-100k.md")
    parser.add_argument("--results", default="saved/benchmarks/semconv-ml-100k.jsonl")
    args = parser.parse_args(argv)

    common = {**PROTOCOL, "show_progress": False}
    if args.preset != "none":
        common["preset"] = args.preset
    baselines = [m for m in args.models.split(",") if m]
    protocol = comparison_protocol(["SemConv", *baselines], args.dataset, config_dict=common)
    semconv = {**common, "preset": args.semconv_preset} if args.semconv_preset else common
    weights = dict(make_config("SemConv", args.dataset, config_dict=semconv)["semconv_task_weights"])
    parts = args.only or ["baselines", "semconv", "before", "curve", "ablations"]
    runs = [(name, name, common) for name in baselines] if "baselines" in parts else []
    for part, part_runs in semconv_runs(weights).items():
        if part in parts:
            runs += [(label, "SemConv", {**semconv, **overrides}) for label, overrides in part_runs]
    runs = filter_runs(parser, runs, args.runs)
    title = (f"SemConv vs RecBole sequential models on {args.dataset} (preset: {args.preset}, SemConv: "
             f"{args.semconv_preset or args.preset})")
    run_and_report(runs, args.dataset, protocol, script="benchmarks/semconv_ml100k.py", argv=argv,
                   results=args.results, out=args.out, title=title, details=details, machine=machine())


if __name__ == "__main__":
    main()
