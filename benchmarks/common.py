"""What the benchmark scripts share: picking runs by label, and running them into a report kept after every run."""

from __future__ import annotations

import sys
import time

from recbole_llm.quick_start import git_commit, run_in_comparison, write_report


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
    """Run ``(label, model, settings)`` under ``protocol``; rewrite the markdown report at ``out`` after every run
    (an interruption keeps what finished) and append each record to ``results``."""
    started, commit = time.strftime("%Y-%m-%d %H:%M"), git_commit()
    command = f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv)
    records, report = [], ""
    for label, model, settings in runs:
        records.append(run_in_comparison(model, dataset, protocol, config_dict=settings, results_path=results,
                                         label=label))
        header = (
            f"{title}\n\n- command: `{command.strip()}`\n- commit: {commit}\n- machine: {machine}\n"
            f"- started: {started}\n- protocol: {protocol}\n- test rows per model: {records[-1]['test_rows']}"
        )
        # the table with paired intervals, and the figures beside it, rewritten after every run
        report, _ = write_report(records, out, header, title=title.split("\n")[0], footer=details(records))
    print(report)
    return records
