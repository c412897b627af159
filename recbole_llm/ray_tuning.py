"""Tuning on Ray Tune (``--tune_tool=ray``): RecBole's params files, trials spread over a Ray cluster.

The same params-file syntax, selection and outputs as RecBole-HyperTuning tuning (:func:`recbole_llm.quick_start.tune`),
on Ray Tune's ``Tuner``: each trial is one ``run_recbole_llm`` in a Ray worker with ``tune_cpus_per_trial`` CPUs and
``tune_gpus_per_trial`` GPUs (``tune.with_resources``); every validation is reported to Ray, so ASHA
(``AsyncHyperBandScheduler``) stops trials that fall behind on the *validation* metric; the best trial is chosen
on its best validation score, and test results are only reported. ``--tune_algo``: ``exhaustive`` is a grid over
``choice`` lines, ``random`` draws ``--max_evals`` configurations, ``bayes`` is HyperOpt's TPE (HyperOptSearch).

Ray connects to the cluster named by ``RAY_ADDRESS`` and otherwise starts a local instance on this machine; data
and checkpoint paths are passed to trials as absolute paths, so on a cluster they must be on a shared file system.
Ray is an optional extra (``pip install 'recbole-llm[ray]'``), imported only here. RecBole 1.2.1 caps Ray at
2.6.3; the code also runs on Ray's later releases (``ray.tune.report``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from recbole_llm.errors import UsageError

WORKER_HOOK = Path(__file__).with_name("_ray_worker")  # its sitecustomize.py runs in every Ray worker
METRIC = "valid_score"


class RayMissingError(UsageError, ModuleNotFoundError):
    """``--tune_tool=ray`` without Ray installed."""


def _ray():
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise RayMissingError("--tune_tool=ray needs Ray Tune: pip install 'recbole-llm[ray]' (or 'ray[tune]'), "
                              f"or tune with the default --tune_tool=hyperopt ({err})") from None
    return ray, tune


def init_ray(**kwargs) -> bool:
    """Join the Ray cluster of ``RAY_ADDRESS``, else start a local instance (``kwargs`` go to ``ray.init``, e.g.
    ``num_cpus=2``); the workers get :data:`WORKER_HOOK` on their path. True when this call started Ray."""
    ray, _ = _ray()
    if ray.is_initialized():
        return False
    path = os.pathsep.join(filter(None, [str(WORKER_HOOK), os.environ.get("PYTHONPATH")]))
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": {"PYTHONPATH": path}},
             include_dashboard=False, log_to_driver=False, **kwargs)
    return True


def _report(metrics: dict) -> None:
    import ray

    if tuple(int(part) for part in ray.__version__.split(".")[:2]) >= (2, 40):
        from ray.tune import report
    else:
        from ray.air.session import report
    report(metrics)


def _better(score: float, best: float | None, bigger: bool) -> bool:
    return best is None or (score > best if bigger else score < best)


def _trial(params: dict, *, model: str, dataset: str, config_files, base: dict, bigger: bool, cwd: str) -> None:
    """One trial in a Ray worker: a run with ``params``, every validation reported, then the test result."""
    import recbole_llm  # noqa: F401  (compat shims before RecBole)
    from recbole_llm.quick_start import run_recbole_llm

    if os.path.isdir(cwd):
        os.chdir(cwd)  # RecBole's log/ and relative paths as in the driver
    settings = {**base, **params}
    if "CUDA_VISIBLE_DEVICES" in os.environ and base.get("gpu_id") != "":
        settings["gpu_id"] = os.environ["CUDA_VISIBLE_DEVICES"]  # the GPUs Ray gave this trial ("" = none)
    best = None

    def after_validation(epoch: int, score: float) -> None:
        nonlocal best
        best = float(score) if _better(float(score), best, bigger) else best
        _report({METRIC: float(score), "best_valid_score": best, "epoch": epoch})

    record = run_recbole_llm(model, dataset, config_files, settings, saved=False, callback_fn=after_validation)
    _report({METRIC: record["best_valid_score"], "best_valid_score": record["best_valid_score"],
             "valid": record["best_valid_result"], "test": record["test_result"], "finished": True})


def search_space(specs: dict, algo: str) -> dict:
    """Ray Tune's space for a parsed params file (:func:`recbole_llm.quick_start.parse_params_file`)."""
    _, tune = _ray()
    if algo == "exhaustive":
        ranged = [name for name, (kind, _) in specs.items() if kind != "choice"]
        if ranged:
            raise UsageError(f"--tune_algo=exhaustive takes choice lines only; {', '.join(ranged)} "
                             "is a range: use --tune_algo=random or bayes")
        return {name: tune.grid_search(values) for name, (_, values) in specs.items()}
    space = {}
    for name, (kind, values) in specs.items():
        if kind == "choice":
            space[name] = tune.choice(values)
        elif kind == "loguniform":  # RecBole's (and hyperopt's) bounds are natural logs
            space[name] = tune.loguniform(math.exp(values[0]), math.exp(values[1]))
        else:
            space[name] = getattr(tune, kind)(*values)
    return space


def ray_tune(model, dataset, params_file, algo="exhaustive", max_evals=10, config_file_list=None, config_dict=None):
    """Tune ``model`` over ``params_file`` on Ray Tune; a :class:`recbole_llm.quick_start.TuningResult`."""
    from recbole_llm.quick_start import TuningResult, check_tuned_keys, make_config, parse_params_file, read_params_file

    ray, tune = _ray()
    from ray.tune.schedulers import ASHAScheduler

    config = make_config(model, dataset, config_file_list, config_dict)
    specs = parse_params_file(params_file)
    check_tuned_keys(params_file, specs, config)
    bigger = bool(config["valid_metric_bigger"])
    mode = "max" if bigger else "min"
    base = {**(config_dict or {}), "data_path": str(Path(config["data_path"]).parent.resolve()),
            "checkpoint_dir": str(Path(config["checkpoint_dir"]).resolve())}
    if float(config["tune_gpus_per_trial"]) == 0:  # 0.5: two trials share a GPU, so no int()
        base["gpu_id"] = ""
    files = [str(Path(f).resolve()) for f in config_file_list or []] or None
    search_alg = None
    if algo == "bayes":
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(read_params_file(params_file), metric=METRIC, mode=mode,
                                    random_state_seed=config["seed"])
    resources = {"cpu": float(config["tune_cpus_per_trial"]), "gpu": float(config["tune_gpus_per_trial"])}
    started = init_ray()  # before with_parameters, which would start Ray without the workers' hook
    try:
        trainable = tune.with_parameters(_trial, model=model, dataset=dataset, config_files=files, base=base,
                                         bigger=bigger, cwd=os.getcwd())
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={} if algo == "bayes" else search_space(specs, algo),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=mode, search_alg=search_alg,
                num_samples=1 if algo == "exhaustive" else int(max_evals),
                # one report per validation, then the final one: max_t never stops a trial before it finishes
                scheduler=ASHAScheduler(max_t=int(config["epochs"]) + 1, grace_period=1, reduction_factor=2),
            ),
            run_config=_run_config(Path(base["checkpoint_dir"]) / "ray", f"{model}-{dataset}"),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    trials = collect_trials(grid, specs)
    scored = [t for t in trials if t["valid_score"] is not None]
    if not scored:
        errors = [t["error"] for t in trials if t.get("error")]
        raise RuntimeError(f"no Ray trial reported a validation score; first error: {errors[:1]}")
    best = scored[0]
    for trial in scored[1:]:
        best = trial if _better(trial["valid_score"], best["valid_score"], bigger) else best
    return TuningResult(best_params=best["params"], valid_metric=config["valid_metric"], trials=trials)


def collect_trials(grid, specs: dict) -> list[dict]:
    """One entry per Ray result: its parameters, best validation score, valid and test results; a trial that
    raised keeps its row, with the error's last line (and no scores), so a failed setting is never silently
    missing from the table."""
    trials = []
    for result in grid:
        config = result.config or {}
        trial = {"params": {name: config.get(name) for name in specs}}
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [type(result.error).__name__]
            trials.append({**trial, "valid_score": None, "valid": None, "test": None, "error": lines[-1][:300]})
            continue
        metrics = result.metrics or {}
        trials.append({**trial, "valid_score": metrics.get("best_valid_score"), "valid": metrics.get("valid"),
                       "test": metrics.get("test")})
    return trials


def _run_config(storage: Path, name: str):
    try:
        from ray.tune import RunConfig
    except ImportError:  # Ray < 2.40
        from ray.air import RunConfig
    return RunConfig(storage_path=str(storage), name=name, verbose=1)
