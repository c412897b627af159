"""Command line: ``python run_recbole_llm.py --model=SASRec --dataset=ml-100k [--key=value ...]``.

Same flags as RecBole's ``run_recbole.py`` (``--model/-m``, ``--dataset/-d``, ``--config_files``, any
``--key=value`` override), plus comparison (``--model=A,B,C``), ``--results=PATH`` and ``--tune=PARAMS_FILE``.

Several processes: ``torchrun --nproc_per_node=N run_recbole_llm.py ...`` (``--nnodes`` / ``--node_rank`` /
``--master_addr`` for several machines), or RecBole's flags ``--nproc=N`` (``--world_size``, ``--ip``, ``--port``,
``--group_offset`` for several machines), which start the same processes through torchrun's launcher. Rank 0
alone prints and writes the table and the records.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_recbole_llm.py",
        description="Train and evaluate recbole_llm and RecBole models; compare them on one split; tune them.",
        epilog="Any other --key=value is a RecBole / recbole_llm config override, e.g. --epochs=5 --gpu_id=''.",
    )
    parser.add_argument("--model", "-m", default="BPR", help="model name, or several separated by commas")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (ml-100k, ml-1m or your own)")
    parser.add_argument("--config_files", default=None, help="config files, separated by spaces")
    parser.add_argument("--results", default=None, help="append one JSON record per run to this file")
    parser.add_argument("--table", default=None, help="where to write the comparison table (markdown)")
    parser.add_argument("--tune", default=None, metavar="PARAMS_FILE",
                        help="tune with RecBole HyperTuning over this params file (RecBole syntax)")
    parser.add_argument("--tune_algo", default="exhaustive", choices=["exhaustive", "random", "bayes"])
    parser.add_argument("--tune_tool", default="hyperopt", choices=["hyperopt", "ray"],
                        help="hyperopt: RecBole's HyperTuning, one trial at a time in this process; ray: Ray Tune "
                             "(trials in parallel on a local instance or the cluster of RAY_ADDRESS, ASHA on the "
                             "validation metric; pip install 'recbole-llm[ray]')")
    parser.add_argument("--max_evals", type=int, default=10, help="trials for random / bayes tuning")
    parser.add_argument("--significance", default="on", choices=["on", "off"],
                        help="paired bootstrap intervals of each model's difference to the best other one in the "
                             "valid_metric on the test split (marked * where they exclude 0), written with the table")
    parser.add_argument("--plots", default="on", choices=["on", "off"],
                        help="PNG figures beside the table: test metrics with intervals, learning curves")
    return parser


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """``--key=value`` pairs as RecBole reads them (values are converted by RecBole's Config)."""
    from recbole_llm.errors import UsageError

    overrides, bad = {}, []
    for arg in extra:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or not key:
            bad.append(arg)
        else:
            overrides[key] = value
    if bad:
        hint = f" (did you mean --{bad[0].lstrip('-')}?)" if "=" in bad[0] else ""
        raise UsageError(f"unrecognised argument{'s' if len(bad) > 1 else ''} {' '.join(bad)}{hint}: config "
                         "overrides are written --key=value")
    return overrides


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


# RecBole's run_recbole.py flags for several processes, and what torchrun calls them
LAUNCH_KEYS = ("nproc", "world_size", "ip", "port", "group_offset")


def torchrun_arguments(overrides: dict[str, str], argv: list[str]) -> list[str] | None:
    """torchrun's arguments for RecBole's ``--nproc`` / ``--world_size`` / ``--ip`` / ``--port`` /
    ``--group_offset`` (machine ``group_offset / nproc`` of ``world_size / nproc``), running this command line
    without them; None when they ask for one process or torchrun already started this one."""
    from recbole_llm import distributed
    from recbole_llm.errors import UsageError

    if distributed.launched_by_torchrun() or not any(key in overrides for key in ("nproc", "world_size")):
        return None
    try:
        nproc = int(overrides.get("nproc", 1))
        world = int(overrides.get("world_size", -1))
        offset = int(overrides.get("group_offset", 0))
    except ValueError:
        raise UsageError("--nproc, --world_size and --group_offset take integers, e.g. --nproc=2") from None
    world = nproc if world <= 0 else world
    if nproc < 1 or world % nproc or offset % nproc or not 0 <= offset < world:
        raise UsageError(f"--nproc={nproc} --world_size={world} --group_offset={offset}: every machine runs nproc "
                         "processes, world_size is a multiple of nproc, and group_offset (this machine's first "
                         "rank) a multiple of nproc below world_size")
    if world == 1:
        return None
    rest = [arg for arg in argv if arg.removeprefix("--").partition("=")[0] not in LAUNCH_KEYS]
    return [f"--nproc_per_node={nproc}", f"--nnodes={world // nproc}", f"--node_rank={offset // nproc}",
            f"--master_addr={overrides.get('ip', 'localhost')}", f"--master_port={overrides.get('port', 5678)}",
            "-m", "recbole_llm.cli", *rest]


def _launch(arguments: list[str]) -> int:
    """Run ``torchrun arguments`` (torch's own launcher) and return the first failed process's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(arguments))
    except ChildFailedError as err:
        return next((failure.exitcode for failure in err.failures.values() if failure.exitcode), 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)

    from recbole_llm import quick_start
    from recbole_llm.errors import UsageError
    from recbole_llm.registry import get_model

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    config_files = args.config_files.split() if args.config_files else None
    try:
        overrides = parse_overrides(extra)
        launch = torchrun_arguments(overrides, argv)
        if launch is not None:
            return _launch(launch)
        for key in LAUNCH_KEYS:
            overrides.pop(key, None)
        for name in models:
            get_model(name)
        if args.tune:
            return _tune(args, models, config_files, overrides)
        records = quick_start.compare_models(
            models, args.dataset, config_files, overrides, results_path=args.results
        )
    except quick_start.ComparisonInterrupted as stop:
        print(f"\ninterrupted during {stop.interrupted}", file=sys.stderr)
        if stop.records:
            _write_table(args, stop.records, note=f"interrupted during {stop.interrupted}: finished runs only")
        return EXIT_INTERRUPTED
    # Bad input (settings, model or dataset names, paths, backbones, checkpoints) is one line, exit 2; anything
    # else is a bug and keeps its traceback (recbole_llm.errors).
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    _write_table(args, records)
    return 0


def _write_table(args, records, note: str = "") -> None:
    import recbole_llm
    from recbole_llm import distributed, quick_start

    if not distributed.is_main():
        return
    protocol = records[0]["protocol"]
    models = ", ".join(record["model"] for record in records)
    modes = set(protocol["eval_args"]["mode"].values())
    if modes == {"labeled"}:  # CTR rows: no ranking, so no history exclusion; the rows kept and scored instead
        rows = (f"label {protocol.get('threshold')}, rows with >= {protocol.get('min_history_length') or 0} earlier "
                f"interactions, {records[0]['test_rows']} test rows")
    else:
        rows = f"history {'excluded' if protocol['exclude_history'] else 'kept'} in the ranking"
        if protocol.get("eval_max_users"):
            rows += f", ranked for a seeded sample of {protocol['eval_max_users']} users"
    header = (
        f"{models} on {args.dataset} | split {protocol['eval_args']['split']}, "
        f"order {protocol['eval_args']['order']}, mode {protocol['eval_args']['mode']}, {rows} | "
        f"recbole_llm {recbole_llm.__version__}, commit {records[0]['commit'] or 'unknown'}, "
        f"device {records[0]['device']}" + (f" | {note}" if note else "")
    )
    table_path = Path(args.table or f"saved/comparison-{args.dataset}-{_stamp()}.md")
    report, written = quick_start.write_report(records, table_path, header, significance=args.significance == "on",
                                               plots=args.plots == "on", title=f"{models} on {args.dataset}")
    print(f"\n{report}")
    print(f"written: {', '.join(map(str, written))}" + (f"; records appended to {args.results}" if args.results
                                                          else ""))


def _tune(args, models, config_files, overrides) -> int:
    from recbole_llm import distributed, quick_start

    from recbole_llm.errors import UsageError

    if len(models) != 1:
        raise UsageError(f"--tune takes exactly one model, not {', '.join(models)}")
    params_file = Path(args.tune)
    if args.tune_tool == "ray":
        from recbole_llm.ray_tuning import ray_tune as tune
    else:
        tune = quick_start.tune
    result = tune(models[0], args.dataset, params_file, args.tune_algo, args.max_evals, config_files, overrides)
    if not distributed.is_main():  # under torchrun every process ran the trials together; rank 0 reports them
        return 0
    valid_metric = result.valid_metric
    table = quick_start.trials_table(result.trials, valid_metric)
    best = ", ".join(f"{name}:{value}" for name, value in result.best_params.items())
    print(f"\n{table}\n\nbest parameters (selected on valid {valid_metric}): {best}")
    out = Path(args.table or f"saved/tuning-{models[0]}-{args.dataset}-{_stamp()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{models[0]} on {args.dataset}, {args.tune_algo} ({args.tune_tool}) over {params_file}\n\n"
                   f"{table}\n\nbest parameters (selected on valid {valid_metric}): {best}\n")
    out.with_suffix(".json").write_text(json.dumps({"best_params": result.best_params, "trials": result.trials}, indent=2))
    print(f"trials written to {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
