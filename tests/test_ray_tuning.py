"""``--tune_tool=ray``: RecBole's params files on Ray Tune (a local instance with 2 CPUs), selection on validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from recbole_llm.cli import main

ray = pytest.importorskip("ray", reason="the [ray] extra (make install has it)")


def _flags(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def test_ray_asha_run_picks_the_trial_with_the_better_validation_metric(base_config, tmp_path, capsys):
    from recbole_llm.ray_tuning import init_ray

    params = tmp_path / "bpr.hyper"
    # a learning rate of 1e-9 leaves BPR at its random initialisation: the other trial must win on validation
    params.write_text("learning_rate choice [0.000000001,0.01]\n")
    settings = {**base_config, "epochs": 4, "eval_step": 1, "train_batch_size": 128, "valid_metric": "NDCG@10"}
    assert init_ray(num_cpus=2)
    try:
        code = main(["--model=BPR", "--dataset=ml-tiny", f"--tune={params}", "--tune_tool=ray", "--table=ray.md",
                     *_flags(settings)])
    finally:
        ray.shutdown()
    assert code == 0
    report = json.loads(Path("ray.json").read_text())
    scores = {trial["params"]["learning_rate"]: trial["valid_score"] for trial in report["trials"]}
    assert set(scores) == {1e-9, 0.01}
    assert scores[0.01] > scores[1e-9]
    assert report["best_params"] == {"learning_rate": 0.01}
    assert "selected on valid NDCG@10): learning_rate:0.01" in capsys.readouterr().out
    assert Path("ray.md").read_text().startswith("BPR on ml-tiny, exhaustive (ray)")


def test_ray_tool_without_ray_says_how_to_install_it(base_config, tmp_path, monkeypatch, capsys):
    params = tmp_path / "bpr.hyper"
    params.write_text("learning_rate choice [0.001,0.01]\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code = main(["--model=BPR", "--dataset=ml-tiny", f"--tune={params}", "--tune_tool=ray", *_flags(base_config)])
    assert code == 2
    assert "pip install 'recbole-llm[ray]'" in capsys.readouterr().err


def test_a_failed_trial_keeps_its_row_with_its_error():
    from types import SimpleNamespace

    from recbole_llm.quick_start import trials_table
    from recbole_llm.ray_tuning import collect_trials

    grid = [SimpleNamespace(config={"learning_rate": 0.01}, error=None,
                            metrics={"best_valid_score": 0.25, "valid": {"ndcg@10": 0.25}, "test": {"ndcg@10": 0.2}}),
            SimpleNamespace(config={"learning_rate": 5.0}, metrics=None,
                            error=RuntimeError("Traceback ...\nValueError: loss is nan | stopped"))]
    trials = collect_trials(grid, {"learning_rate": "choice [0.01,5.0]"})
    assert [t["params"] for t in trials] == [{"learning_rate": 0.01}, {"learning_rate": 5.0}]
    assert trials[1]["error"] == "ValueError: loss is nan | stopped" and trials[1]["valid_score"] is None
    rows = trials_table(trials, "NDCG@10").splitlines()
    assert len(rows) == 4 and rows[2] == "| learning_rate=0.01 | 0.2500 | 0.2000 |"
    assert rows[3].startswith("| learning_rate=5.0 | failed: ValueError: loss is nan / stopped |")
