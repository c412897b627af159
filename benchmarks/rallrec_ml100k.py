"""RALLRec against RecBole's CTR models on ml-100k: one labeled split and the same scored rows for every model.

    python benchmarks/rallrec_ml100k.py                          # 2-core CPU budget (--preset=cpu)
    python benchmarks/rallrec_ml100k.py --preset=none            # the paper-like defaults (GPU)
    python benchmarks/rallrec_ml100k.py --only=ablations --runs="no retrieval"   # some runs of one part
    python benchmarks/rallrec_ml100k.py --only=before --only=rallrec   # layer-0 vectors + constant lr vs the defaults

Protocol (RALLRec's, recorded with every result): label = rating >= 4, rows with >= 5 earlier interactions,
global temporal 8:1:1 split over rows in exact (time, user, item) order, AUC / LogLoss / Accuracy on a seeded sample
of ``eval_max_interactions`` test rows that every model scores. Parts: baselines (RecBole's LR, FM, DeepFM,
WideDeep, DIN, trained on every training row), RALLRec, ablations (no retrieval = trained and scored on the last K
items, TALLRec-style; text-only and collaborative-only retrieval; no reranker = the K most similar items), and a
training-set size curve (a quarter and twice the configured prompts).
The report holds the command, commit and machine, train / scoring prompts per second and peak memory; every
run's record is appended to a JSON Lines file.
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

BASELINES = ["LR", "FM", "DeepFM", "WideDeep", "DIN"]


def rallrec_runs(samples: int) -> dict[str, list[tuple[str, dict]]]:
    """The RALLRec runs by part; the curve scales the configuration's number of training prompts."""
    return {
        "rallrec": [("RALLRec", {})],
        # issue 15, items 3 and 5: LightGCN's layer-0 table and a constant rate, as before that issue
        "before": [("RALLRec (layer-0 vectors, constant lr)", {"rallrec_cf_vectors": "table",
                                                                "lr_scheduler": "constant"})],
        "ablations": [
            ("RALLRec (no retrieval: last K)", {"rallrec_prompt": "simple", "rallrec_train_prompts": ["simple"]}),
            ("RALLRec (text-only retrieval)", {"rallrec_embedding": "text"}),
            ("RALLRec (collaborative-only retrieval)", {"rallrec_embedding": "colla"}),
            ("RALLRec (no reranker)", {"rallrec_prompt": "high"}),
        ],
        "curve": [(f"RALLRec ({n} prompts)", {"rallrec_train_samples": n}) for n in (samples // 4, samples * 2)],
    }


def details(records) -> str:
    lines = ["| run | embedding | prompt | train prompts | train tokens/s | scored prompts/s | train s | eval s | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        report = r.get("model_report") or {}
        if "train_prompts" not in report:
            continue
        lines.append(f"| {r['model']} | {report['embedding']} | {report['prompt']} | {report['train_prompts']} | "
                     f"{r.get('train_tokens_per_second')} | {report['score_prompts_per_second']} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu", help="properties/presets/<Model>-<preset>.yaml, or 'none'")
    parser.add_argument("--models", default=",".join(BASELINES), help="RecBole CTR baselines to run")
    parser.add_argument("--only", choices=["baselines", "rallrec", "before", "ablations", "curve"], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--runs", action="append", default=[],
                        help="run only the runs whose label contains this text (repeatable); default: all")
    parser.add_argument("--out", default="saved/benchmarks/rallrec-ml-100k.md")
    parser.add_argument("--results", default="saved/benchmarks/rallrec-ml-100k.jsonl")
    args = parser.parse_args(argv)

    common = {"show_progress": False, **({"preset": args.preset} if args.preset != "none" else {})}
    baselines = [m for m in args.models.split(",") if m]
    protocol = comparison_protocol(["RALLRec", *baselines], args.dataset, config_dict=common)
    samples = int(make_config("RALLRec", args.dataset, config_dict=common)["rallrec_train_samples"])
    parts = args.only or ["baselines", "rallrec", "before", "ablations", "curve"]
    runs = [(name, name, common) for name in baselines] if "baselines" in parts else []
    for part, part_runs in rallrec_runs(samples).items():
        if part in parts:
            runs += [(label, "RALLRec", {**common, **overrides}) for label, overrides in part_runs]
    runs = filter_runs(parser, runs, args.runs)
    title = f"RALLRec vs RecBole CTR models on {args.dataset} (preset: {args.preset})"
    run_and_report(runs, args.dataset, protocol, script="benchmarks/rallrec_ml100k.py", argv=argv,
                   results=args.results, out=args.out, title=title, details=details, machine=machine())


if __name__ == "__main__":
    main()
