"""What the benchmark scripts share: picking runs by label, and running them into a report kept after every run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from recbole_llm.quick_start import git_commit, run_in_comparison, write_report

# The records behind the BENCHMARKS.md sections that take more than a session to make (converged baselines, the
# 2-hour budgets): committed beside the scripts, so a later session's --report finds them (saved/ is not kept).
RESULTS = "benchmarks/results"


def filter_runs(parser, runs: list[tuple[str, str, dict]], texts: list[str]) -> list[tuple[str, str, dict]]:
    """The runs chosen by ``texts`` (all without any): a text picks the run with exactly that label, else every run
    whose label contains it; an empty choice is a usage error."""
    if not texts:
        return runs
    labels = {run[0] for run in runs}
    picks = lambda text, label: label == text if text in labels else text in label  # noqa: E731
    chosen = [run for run in runs if any(picks(text, run[0]) for text in texts)]
    if not chosen:
        parser.error(f"no run label contains any of {texts}; the labels are: {[run[0] for run in runs]}")
    return chosen


def run_and_report(runs, dataset: str, protocol: dict, *, script: str, title: str, results: str, out: str,
                   details=lambda records: "", argv=None, machine: str = "") -> list[dict]:
    """Run ``(label, model, settings)`` under ``protocol``, each in a fresh process when there are several (as a
    comparison does); rewrite the markdown report at ``out`` after every run (an interruption keeps what finished;
    the intervals and figures are made once, at the end) and append each record to ``results``."""
    started, commit = time.strftime("%Y-%m-%d %H:%M"), git_commit()
    command = f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv)
    records = []
    for number, (label, model, settings) in enumerate(runs, 1):
        records.append(run_in_comparison(model, dataset, protocol, config_dict=settings, results_path=results,
                                         label=label, fresh_process=len(runs) > 1))
        header = (
            f"{title}\n\n- command: `{command.strip()}`\n- commit: {commit}\n- machine: {machine}\n"
            f"- started: {started}\n- protocol: {protocol}\n- test rows per model: {records[-1]['test_rows']}"
        )
        last = number == len(runs)
        report, _ = write_report(records, out, header, title=title.split("\n")[0], footer=details(records),
                                 significance=last, plots=last)
    print(report)
    return records


def report_from_results(results: str | list[str], out: str, *, title: str, command: str, machine: str = "",
                        details=lambda records: "") -> list[dict]:
    """The report of the records in ``results`` (JSON Lines files; the last record of each label), for runs made
    by several commands (a family trained over several sessions, each run resumed where it stopped; an LLM method
    against baselines trained by another script)."""
    files = [results] if isinstance(results, str) else list(results)
    by_label = {}
    for path in files:
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} does not exist; run the benchmark that writes it first")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_label[record["model"]] = record
    records = list(by_label.values())
    results = ", ".join(files)
    if not records:
        raise SystemExit(f"error: {results} holds no records; run the benchmark first")
    protocols = {json.dumps(r["protocol"], sort_keys=True) for r in records}
    if len(protocols) > 1:
        raise SystemExit(f"error: the records in {results} were made under {len(protocols)} protocols; a report "
                         "compares one: remove the others' lines")
    commits = ", ".join(dict.fromkeys(f"{r['model']} {r.get('commit') or '?'}" for r in records))
    header = (f"{title}\n\n- command: `{command}` (the report of {results})\n- commits: {commits}\n"
              f"- machine: {machine}\n- protocol: {records[0]['protocol']}\n"
              f"- test rows per model: {records[0]['test_rows']}")
    report, _ = write_report(records, out, header, title=title.split("\n")[0], footer=details(records))
    print(report)
    return records
