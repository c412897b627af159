"""Orchestration: run one model, compare several on one split, tune, and reload checkpoints.

Mirrors RecBole's ``quick_start`` (Config -> create_dataset -> data_preparation -> model -> Trainer) with the
plugin's name lookup, and never imports ``recbole.quick_start`` (it imports ray). No FLOPs probe: it would run an
LLM forward pass on a dummy row for nothing.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from logging import getLogger
from pathlib import Path

from recbole.data import data_preparation
from recbole.utils import ModelType, init_logger, init_seed, set_color

from recbole_llm import distributed
from recbole_llm.config import Config
from recbole_llm.data.assets import check_interaction_columns, ensure_dataset_files
from recbole_llm.registry import create_dataset, get_model, get_trainer
from recbole_llm.protocol import apply_history_exclusion, protocol_of
from recbole_llm.errors import UsageError
from recbole_llm.memory import PeakMemory
from recbole_llm.metrics import auc_standard_error, evaluation_units
from recbole_llm.settings import SettingError, closest
from recbole_llm.fingerprint import resolved_settings, run_fingerprint, to_jsonable
from recbole_llm.fresh_process import call_in_fresh_process
from recbole_llm.trainer.checkpoint import CheckpointError, load_weights, read_meta
from recbole_llm.trainer.parallel import parallel_trainer



@contextlib.contextmanager
def sanitized_argv():
    """RecBole's Config parses every ``--key=value`` in ``sys.argv``; API calls must not inherit them."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def make_config(model=None, dataset=None, config_file_list=None, config_dict=None) -> Config:
    """A recbole_llm Config whose inputs are exactly the arguments (``sys.argv`` is ignored)."""
    with sanitized_argv():
        config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    benchmark = config["benchmark_filename"]
    ensure_dataset_files(config["dataset"], config["data_path"], benchmark)
    check_interaction_columns(config)
    return config


def _reset_logger(config) -> logging.Logger:
    # RecBole makes these folders check-then-create, which races between the processes of a distributed run
    for folder in (Path("log") / config["model"], Path(config["checkpoint_dir"])):
        folder.mkdir(parents=True, exist_ok=True)
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    return getLogger()


def package_versions() -> dict[str, str]:
    names = ("recbole-llm", "recbole", "torch", "transformers", "peft", "numpy", "pandas", "hyperopt")
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def git_commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    return None


def _floats(result) -> dict:
    return {key: float(value) for key, value in (result or {}).items()}


class EmptySplitError(UsageError, ValueError):
    """A split that evaluation needs holds no rows."""


def check_splits(config, loaders) -> None:
    """Refuse a run whose validation (when used) or test split is empty, before any model is built."""
    phases = [("test", loaders[2])] + ([("valid", loaders[1])] if config["eval_step"] else [])
    empty = [name for name, loader in phases if distributed.total(0 if loader is None else len(loader.dataset)) == 0]
    if empty:
        raise EmptySplitError(
            f"the {' and '.join(empty)} split of {config['dataset']} is empty under eval_args={config['eval_args']}: "
            "every user has too few interactions to hold one out (leave-one-out needs at least 3 per user). "
            "Use more data per user, another split (e.g. --eval_args=\"{split: {RS: [0.8, 0.1, 0.1]}, order: RO, "
            "mode: full}\"), or drop such users with --user_inter_num_interval=\"[3,inf)\"."
        )


def build_model_and_data(config):
    """``(dataset, (train, valid, test) loaders, model)`` for a Config, seeded as RecBole's quick start does.

    The evaluation loaders follow the run's protocol (:func:`recbole_llm.protocol.apply_history_exclusion`); in a
    run of several processes they hold this process's shard of the users, and every process builds the same model
    (one seed)."""
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    check_splits(config, loaders)
    apply_history_exclusion(config, *loaders)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, loaders[0]._dataset).to(config["device"])
    return dataset, loaders, model


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                    callback_fn=None) -> dict:
    """Train and test one model (ours or RecBole's) and return a JSON-ready record of the run;
    ``callback_fn(epoch, valid_score)`` runs after every validation (RecBole's ``fit`` hook)."""
    config = make_config(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    logger = _reset_logger(config)
    logger.info(config)

    with PeakMemory() as memory:
        data, (train_data, valid_data, test_data), model_obj = build_model_and_data(config)
        logger.info(data)
        logger.info(model_obj)
        # gathered evaluation in a run of several processes; in every run, each test user's share of the metrics
        trainer = parallel_trainer(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model_obj)
        valid_scores = []

        def after_validation(epoch, valid_score):
            valid_scores.append([epoch, float(valid_score)])
            if callback_fn is not None:
                callback_fn(epoch, valid_score)

        # RecBole's decision-tree trainers (XGBoost, LightGBM) take no callback: their validations go unrecorded
        hook = {"callback_fn": after_validation} if "callback_fn" in inspect.signature(trainer.fit).parameters else {}
        start = time.perf_counter()
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=saved, show_progress=config["show_progress"], **hook
        )
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
        eval_seconds = time.perf_counter() - start
        test_units = evaluation_units(trainer.eval_collector.last, config["metrics"], config["topk"] or [])

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    auc_se = _test_auc_standard_error(config, test_data, test_result)
    if auc_se is not None:
        logger.info(set_color("test AUC standard error", "yellow") + f": {auc_se:.4f} (Hanley-McNeil)")
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "model_type": config["MODEL_TYPE"].name,
        "best_valid_score": float(best_valid_score),
        "valid_score_bigger": bool(config["valid_metric_bigger"]),
        "valid_metric": config["valid_metric"],
        "best_valid_result": _floats(best_valid_result),
        "test_result": _floats(test_result),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "test_rows": distributed.total(len(test_data.dataset)),
        "processes": distributed.world_size(),
        "test_auc_se": auc_se,
        # LLM trainers: the training tokens and targets the model counted (RecBole's trainers: None), and their rates
        "train_tokens": getattr(trainer, "train_tokens", None),
        "train_targets": getattr(trainer, "train_targets", None),
        "train_tokens_per_second": _per_second(trainer, "train_tokens"),
        "train_targets_per_second": _per_second(trainer, "train_targets"),
        # the backbone's FLOPs per training token, FLOP/s reached, the matmul peak and MFU (LLM trainers)
        "train_compute": trainer.compute_report() if hasattr(trainer, "compute_report") else None,
        # the summed training loss (or loss terms) of each epoch this run trained, as RecBole's trainer logs it
        # (RecBole's decision-tree trainers, XGBoost and LightGBM, keep no such record)
        "train_losses": [[epoch, to_jsonable(loss)]
                         for epoch, loss in sorted(getattr(trainer, "train_loss_dict", {}).items())],
        # [loss function, epoch, batch, loss] of every training batch (LLM trainers); valid metric per validation
        "train_batch_losses": [list(row) for row in getattr(trainer, "batch_losses", [])],
        "valid_scores": getattr(trainer, "valid_scores", valid_scores),  # a resumed run's trainer has them all
        # LLM trainers: every validation (inside epochs too, valid_curve_steps) with the training seconds, optimizer
        # steps and targets before it, over the whole run (a resumed one included)
        "valid_curve": getattr(trainer, "valid_curve", None),
        # what each test metric averages over: every user's value (or every scored row), for paired significance
        "test_units": test_units,
        "model_report": to_jsonable(model_obj.run_report()) if hasattr(model_obj, "run_report") else None,
        "peak_rss_mib": round(memory.peak_rss_mib, 1),
        "peak_gpu_mib": None if memory.peak_gpu_mib is None else round(memory.peak_gpu_mib, 1),
        "device": str(config["device"]),
        "preset": config["preset"],  # not in "config": a preset's settings are, its name changes nothing computed
        "protocol": protocol_of(config),
        "config": resolved_settings(config),
        "versions": package_versions(),
        "commit": git_commit(),
    }


def _test_auc_standard_error(config, test_data, test_result) -> float | None:
    """The standard error of the test AUC (:func:`recbole_llm.metrics.auc_standard_error`) from the test rows'
    labels, for runs that report AUC; else None."""
    if "auc" not in (test_result or {}) or config["LABEL_FIELD"] not in test_data.dataset.inter_feat.interaction:
        return None
    labels = test_data.dataset.inter_feat[config["LABEL_FIELD"]].numpy() > 0.5
    positives, negatives = distributed.total(int(labels.sum())), distributed.total(int((~labels).sum()))
    return round(auc_standard_error(float(test_result["auc"]), positives, negatives), 5)


def _per_second(trainer, counter: str) -> float | None:
    """Training throughput of an LLM trainer (``train_tokens`` or ``train_targets`` the model reported, per second
    of training), else None."""
    count, seconds = getattr(trainer, counter, 0), getattr(trainer, "train_seconds", 0.0)
    return round(count / seconds, 2) if count and seconds else None


def objective_function(config_dict=None, config_file_list=None, saved=False) -> dict:
    """RecBole HyperTuning's objective: train on train, select on valid, report test (never used to select)."""
    record = run_recbole_llm(config_file_list=config_file_list, config_dict=config_dict, saved=saved)
    return {
        "model": record["model"],
        "best_valid_score": record["best_valid_score"],
        "valid_score_bigger": record["valid_score_bigger"],
        "best_valid_result": record["best_valid_result"],
        "test_result": record["test_result"],
    }


# ------------------------------------------------------------------------------------------------ comparison
def comparison_protocol(models, dataset, config_file_list=None, config_dict=None) -> dict:
    """One evaluation protocol for all ``models``: the first sequential model's (else the first model's).

    RecBole gives each model family its own default split (random 8:1:1 for general models, leave-one-out by
    time for sequential ones). A comparison must use one: a sequential protocol works for every ranking model,
    so it wins when any model is sequential. Settings the user gave explicitly are already shared by all.
    CTR models (value metrics) and ranking models cannot share a table.
    """
    configs = [make_config(m, dataset, config_file_list, config_dict) for m in models]
    eval_types = {c["eval_type"] for c in configs}
    if len(eval_types) > 1:
        kinds = ", ".join(f"{c['model']} ({c['eval_type'].name.lower()})" for c in configs)
        raise UsageError(
            f"Cannot compare ranking and value (CTR) models on one table: {kinds}. Compare them separately."
        )
    reference = next((c for c in configs if c["MODEL_TYPE"] == ModelType.SEQUENTIAL), configs[0])
    return protocol_of(reference)


class ComparisonInterrupted(KeyboardInterrupt):
    """Ctrl-C during a comparison; ``records`` holds the runs that finished before it."""

    def __init__(self, records: list[dict], interrupted: str):
        super().__init__(f"interrupted during {interrupted}")
        self.records, self.interrupted = records, interrupted


def compare_models(models, dataset, config_file_list=None, config_dict=None, saved=True, results_path=None,
                   fresh_processes: bool | None = None):
    """Run each model on the same dataset, split, metrics and history exclusion; return their records (also
    appended to ``results_path``). Ctrl-C raises :class:`ComparisonInterrupted` with the finished records.

    ``fresh_processes``: each model in its own process (:mod:`recbole_llm.fresh_process`), so no model starts from
    another's leftovers and each peak memory is its own; the default when several models run in a single-process
    run (a run of several processes keeps its models in its ranks' processes)."""
    protocol = comparison_protocol(models, dataset, config_file_list, config_dict)
    if fresh_processes is None:
        fresh_processes = len(models) > 1 and distributed.world_size() == 1
    records = []
    for name in models:
        try:
            records.append(run_in_comparison(name, dataset, protocol, config_file_list, config_dict, saved,
                                             results_path, fresh_process=fresh_processes))
        except KeyboardInterrupt:
            raise ComparisonInterrupted(records, name) from None
    return records


def run_in_comparison(model, dataset, protocol, config_file_list=None, config_dict=None, saved=True,
                      results_path=None, label=None, fresh_process: bool = False) -> dict:
    """One run of a comparison under its shared ``protocol``; ``label`` names the column (e.g. an ablation);
    ``fresh_process``: the run in a new process (:func:`recbole_llm.fresh_process.call_in_fresh_process`)."""
    label = label or model
    if distributed.is_main():
        print(set_color(f"=== {label} on {dataset}", "green"), flush=True)
    arguments = (model, dataset, config_file_list, {**(config_dict or {}), **protocol}, saved)
    record = call_in_fresh_process(run_recbole_llm, *arguments) if fresh_process else run_recbole_llm(*arguments)
    record.update(model=label)
    if results_path:
        append_results(results_path, record)
    return record


def append_results(path, record: dict) -> None:
    """Append one JSON record per line (JSON Lines), so earlier runs are never lost (rank 0 writes)."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _format_value(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def comparison_table(records, significance: dict | None = None) -> str:
    """Markdown table, one column per model: valid and test metrics, test rows scored (users for full ranking,
    labeled rows for CTR), train/eval seconds, peak memory.

    The best test value of each metric is in bold (for metrics where smaller is better, the smallest). With the
    comparison's ``significance`` (:func:`recbole_llm.significance.comparison_significance`), a row gives each
    model's paired difference to the best other model and its interval, ``*`` where the interval excludes 0.
    """
    from recbole.evaluator.register import smaller_metrics

    models = [r["model"] for r in records]
    metrics = list(records[0]["test_result"])
    lines = ["| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for split, key in (("valid", "best_valid_result"), ("test", "test_result")):
        for metric in metrics:
            values = [r[key].get(metric) for r in records]
            present = [v for v in values if v is not None]
            best = (min if metric.split("@")[0] in smaller_metrics else max)(present) if present else None
            cells = [
                f"**{_format_value(v)}**" if split == "test" and v == best and len(records) > 1 else _format_value(v)
                for v in values
            ]
            lines.append(f"| {split} {metric} | " + " | ".join(cells) + " |")
    if significance and significance["differences"]:
        lines.append(_difference_row(records, significance))
    # how long each model trained, and under which preset (the cpu presets cut the baselines' epochs for a demo)
    lines.append("| epochs trained (preset) | " + " | ".join(_epochs_cell(r) for r in records) + " |")
    mfu = [(r.get("train_compute") or {}).get("mfu") for r in records]
    for label, key in (("test AUC s.e.", "test_auc_se"), ("test rows", "test_rows"), ("train s", "train_seconds"),
                       ("eval s", "eval_seconds"), ("train tokens/s", "train_tokens_per_second"),
                       ("train targets/s", "train_targets_per_second"),
                       ("peak RSS MiB", "peak_rss_mib"), ("peak GPU MiB", "peak_gpu_mib")):
        if any(r.get(key) is not None for r in records):
            digits = {"test_rows": 0, "test_auc_se": 4, "train_targets_per_second": 2}.get(key, 1)
            lines.append(f"| {label} | " + " | ".join(_format_value(r.get(key), digits) for r in records) + " |")
        if key == "train_targets_per_second" and any(v is not None for v in mfu):
            lines.append("| train MFU | " + " | ".join(_format_value(v, 3) for v in mfu) + " |")
    return "\n".join(lines)


def write_report(records, path, header: str, *, significance: bool = True, plots: bool = True, title: str = "",
                 footer: str = "") -> tuple[str, list[Path]]:
    """Write a comparison's report to ``path`` (markdown: ``header``, the table, how its intervals were made,
    ``footer``) and beside it, unless switched off, the intervals (``<path>.json``) and the figures
    (``<path stem>-metrics.png``, ``<path stem>-curves.png``); return the report and the files written."""
    from recbole_llm.plots import plot_comparison, plot_curves
    from recbole_llm.significance import comparison_significance

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    intervals = comparison_significance(records, seed=int(records[0]["config"].get("seed") or 0)) \
        if significance else None
    note = f"\n{significance_note(intervals)}\n" if intervals else ""
    report = f"{header}\n\n{comparison_table(records, intervals)}\n{note}" + (f"\n{footer}\n" if footer else "")
    path.write_text(report)
    written = [path]
    if intervals:
        written.append(path.with_suffix(".json"))
        written[-1].write_text(json.dumps({"header": header, "significance": intervals}, indent=1))
    if plots:
        stem = path.with_suffix("")
        written.append(plot_comparison(records, intervals, f"{stem}-metrics.png", title=title))
        written.append(plot_curves(records, f"{stem}-curves.png"))
    return report, written


def _epochs_cell(record) -> str:
    """Epochs the run trained, and the preset that shaped it (a model without that preset's file kept its
    defaults)."""
    from recbole_llm.config import properties_dir

    epochs = len(record.get("train_losses") or []) or len(record.get("valid_scores") or [])
    preset, model = record.get("preset"), (record.get("config") or {}).get("model", record["model"])
    applied = preset and (properties_dir() / "presets" / f"{model}-{preset}.yaml").is_file()
    return f"{epochs or '–'}" + (f" ({preset} preset)" if applied else "")


def _difference_row(records, significance: dict) -> str:
    share = int(round(100 * significance["confidence"]))
    by_model = {d["model"]: d for d in significance["differences"]}
    cells = []
    for record in records:
        d = by_model.get(record["model"])
        cells.append("–" if d is None else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] vs "
                     f"{d['against']}{' *' if d['significant'] else ''}")
    return f"| test {significance['metric']} − best other, {share}% CI | " + " | ".join(cells) + " |"


def significance_note(significance: dict) -> str:
    """The line under a table that says how its intervals were made and what ``*`` marks."""
    share = int(round(100 * significance["confidence"]))
    missing = (f"; no per-{significance['unit'] or 'user'} values for {', '.join(significance['missing'])}"
               if significance["missing"] else "")
    return (f"{share}% intervals: paired percentile bootstrap over the test {significance['unit'] or 'unit'}s, "
            f"{significance['resamples']} resamples, seed {significance['seed']}; * the interval excludes 0{missing}")


# ------------------------------------------------------------------------------------------------ tuning
@dataclass
class TuningResult:
    """Outcome of :func:`tune`: ``best_params`` won on ``valid_metric``; test results are reported, never used."""

    best_params: dict
    valid_metric: str
    trials: list[dict]  # {params, valid_score, valid, test}, in run order


def tune(model, dataset, params_file, algo="exhaustive", max_evals=10, config_file_list=None, config_dict=None,
         early_stop=10) -> TuningResult:
    """RecBole HyperTuning over ``params_file`` (RecBole's syntax) for any model name, selecting on validation."""
    from recbole.trainer import HyperTuning

    base = {"model": model, "dataset": dataset, **(config_dict or {})}
    config = make_config(model, dataset, config_file_list, config_dict)
    space = read_params_file(params_file)
    check_tuned_keys(params_file, space, config)
    os.environ.setdefault("HYPEROPT_FMIN_SEED", str(config["seed"]))  # random / bayes draws are reproducible

    trials = []

    def objective(params, fixed_config_file_list=None):
        result = objective_function({**base, **params}, fixed_config_file_list)
        trials.append({"params": dict(params), "valid_score": result["best_valid_score"],
                       "valid": result["best_valid_result"], "test": result["test_result"]})
        return result

    grid = algo == "exhaustive"
    hyper = HyperTuning(
        objective, space=space, fixed_config_file_list=config_file_list, algo=algo,
        max_evals=max_evals, early_stop=10**9 if grid else early_stop,
    )
    hyper.run()
    return TuningResult(best_params=hyper.best_params, valid_metric=config["valid_metric"], trials=trials)


PARAM_TYPES = {"choice": "a list, e.g. [0.001,0.01]", "uniform": "low,high", "quniform": "low,high,q",
               "loguniform": "low,high (natural logs)"}


def parse_params_file(params_file) -> dict[str, tuple[str, list | tuple]]:
    """``{name: (type, values)}`` of a RecBole params file (``name type values`` per line, ``#`` comments): a list
    for ``choice``, ``(low, high[, q])`` otherwise.

    RecBole ``eval``s each ``choice`` line; here values are parsed as literals only, and a line that does not
    parse is refused naming the file, the line and the expected form."""
    path = Path(params_file)
    if not path.is_file():
        raise UsageError(f"params file {path} not found; write one line per key, e.g. 'learning_rate choice "
                         "[0.001,0.01]' (RecBole's syntax), as in properties/hyper/.")
    specs = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        kind = parts[1] if len(parts) > 1 else None
        problem = None
        if len(parts) < 3 or kind not in PARAM_TYPES:
            problem = f"expected 'name type values' with type one of {', '.join(PARAM_TYPES)}"
        else:
            name, text = parts[0], "".join(parts[2].split())
            try:
                value = ast.literal_eval(text if kind == "choice" else f"({text},)")
            except (ValueError, SyntaxError):
                value = None
            if kind == "choice" and isinstance(value, list) and value:
                specs[name] = (kind, value)
            elif kind != "choice" and isinstance(value, tuple) and len(value) == (3 if kind == "quniform" else 2) \
                    and all(isinstance(v, (int, float)) for v in value):
                specs[name] = (kind, tuple(map(float, value)))
            else:
                problem = f"{kind} takes {PARAM_TYPES[kind]}, not {parts[2].strip()!r}"
        if problem:
            raise UsageError(f"{path}:{number}: {line.strip()!r}: {problem}.")
    if not specs:
        raise UsageError(f"{path} names no parameter to tune; write e.g. 'learning_rate choice [0.001,0.01]'.")
    return specs


def read_params_file(params_file) -> dict:
    """The hyperopt search space of a RecBole params file (:func:`parse_params_file`)."""
    from hyperopt import hp

    return {name: hp.choice(name, values) if kind == "choice" else getattr(hp, kind)(name, *values)
            for name, (kind, values) in parse_params_file(params_file).items()}


def check_tuned_keys(params_file, space: dict, config) -> None:
    """Refuse a params file naming a key the model's configuration does not have (a typo would tune nothing)."""
    known = set(config.final_config_dict)
    unknown = [name for name in space if name not in known]
    if unknown:
        hints = "; ".join(f"'{name}'{closest(name, known)}" for name in unknown)
        raise SettingError(f"{params_file} tunes keys that {config['model']} has no setting for: {hints}. "
                       "Fix the names (they are the YAML keys of the model, RecBole and recbole_llm).")


def trials_table(trials, valid_metric: str) -> str:
    """One row per trial; a trial stopped early (Ray's ASHA) has no test result ("–"), a failed one shows its
    error in place of its validation score."""
    metrics = next((list(t["test"]) for t in trials if t.get("test")), [])
    lines = [f"| params | valid {valid_metric} | " + " | ".join(f"test {m}" for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for t in trials:
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        tests = [_format_value((t.get("test") or {}).get(m)) for m in metrics]
        valid = f"failed: {t['error']}".replace("|", "/") if t.get("error") else _format_value(t["valid_score"])
        lines.append(f"| {params} | {valid} | " + " | ".join(tests) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reloading
def load_model(path, with_data: bool = True, check_inputs: bool = True):
    """Rebuild a trained recbole_llm model from a checkpoint directory (``<run dir>/best``).

    Returns ``(config, model, dataset, train_data, valid_data, test_data)`` like RecBole's
    ``load_data_and_model``; with ``with_data=False`` the three loaders are ``None``.

    Nothing in the checkpoint is evaluated: its JSON settings are typed values, checked like any configuration.
    With ``check_inputs`` the configuration, data files and package version must still give the checkpoint's
    fingerprint; otherwise the model would be rebuilt from, or tested on, other inputs than it was trained on.
    """
    meta = read_meta(path)
    if not isinstance(meta.get("model"), str) or not isinstance(meta.get("dataset"), str):
        raise CheckpointError(f"{path}: the checkpoint's JSON names no model and dataset.")
    config = make_config(meta["model"], meta["dataset"], config_dict=meta.get("config") or {})
    if check_inputs and meta.get("fingerprint") != run_fingerprint(config):
        raise CheckpointError(
            f"{path} was trained on other inputs than the ones it would be loaded with now: the resolved "
            "configuration (a YAML layer or preset), the data files or the recbole_llm version changed since "
            "(fingerprint mismatch). Retrain, or pass check_inputs=False to load it anyway."
        )
    dataset, (train_data, valid_data, test_data), model = build_model_and_data(config)
    load_weights(path, model)
    model.eval()
    if not with_data:
        train_data = valid_data = test_data = None
    return config, model, dataset, train_data, valid_data, test_data

