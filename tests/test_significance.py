"""Paired bootstrap intervals between the models of a comparison, the per-user values they come from, and plots."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.model.sequential_recommender import SASRec

from recbole_llm.cli import main
from recbole_llm.plots import curves_figure, plot_comparison, plot_curves
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.significance import UnpairedError, bootstrap, comparison_significance, paired_bootstrap


def users(values: dict, ids=None) -> dict:
    n = len(next(iter(values.values())))
    return {"unit": "user", "users": list(range(1, n + 1)) if ids is None else ids,
            "values": {name: list(map(float, column)) for name, column in values.items()}}


def rows(scores, labels) -> dict:
    return {"unit": "row", "users": None, "scores": list(map(float, scores)), "labels": list(map(float, labels))}


def width(interval) -> float:
    return interval.high - interval.low


def test_identical_models_give_an_interval_around_zero():
    rng = np.random.default_rng(0)
    values = rng.random(500)
    same = paired_bootstrap(users({"ndcg@10": values}), users({"ndcg@10": values}), "ndcg@10", seed=1)
    assert same.value == same.low == same.high == 0 and not same.excludes_zero
    # two models with the same values on other users (no real difference): the interval straddles 0
    shuffled = paired_bootstrap(users({"ndcg@10": values}), users({"ndcg@10": rng.permutation(values)}), "ndcg@10",
                                seed=1)
    assert shuffled.value == pytest.approx(0, abs=1e-12) and shuffled.low < 0 < shuffled.high
    assert not shuffled.excludes_zero


def test_a_planted_advantage_on_every_user_excludes_zero_and_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    base = rng.random(500)
    better = base + 0.02 + rng.normal(0, 0.1, 500)
    interval = paired_bootstrap(users({"mrr@10": better}), users({"mrr@10": base}), "mrr@10", seed=3)
    assert interval.excludes_zero and interval.low > 0
    # hand computation: mean difference +- 1.96 standard errors (the central limit theorem's interval)
    diff = better - base
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert interval.value == pytest.approx(diff.mean(), abs=1e-12)
    assert interval.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert interval.high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    # a seeded bootstrap: the same seed gives the same interval, another seed a slightly different one
    assert paired_bootstrap(users({"mrr@10": better}), users({"mrr@10": base}), "mrr@10", seed=3) == interval
    assert paired_bootstrap(users({"mrr@10": better}), users({"mrr@10": base}), "mrr@10", seed=4) != interval


def test_the_interval_narrows_with_more_users():
    rng = np.random.default_rng(2)
    widths = {}
    for n in (200, 5000):
        a, b = rng.random(n), rng.random(n)
        widths[n] = width(paired_bootstrap(users({"ndcg@10": a}), users({"ndcg@10": b}), "ndcg@10", seed=0))
    assert widths[5000] < widths[200] / 3  # sqrt(25) = 5 in theory


def test_row_metrics_are_recomputed_on_each_draw():
    # hand computation: of the 4 (positive, negative) pairs, 3 are ordered right
    auc = bootstrap(rows([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), "auc", resamples=50, seed=0)
    assert auc.value == pytest.approx(0.75)
    rng = np.random.default_rng(3)
    labels = (rng.random(2000) < 0.4).astype(float)
    informed, noise = labels + rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    difference = paired_bootstrap(rows(informed, labels), rows(noise, labels), "auc", resamples=200, seed=0)
    assert difference.low > 0.15 and difference.value > 0.2  # AUC ~0.76 against ~0.5
    logloss = bootstrap(rows(np.full(2000, 0.4), labels), "logloss", resamples=200, seed=0)
    expected = -np.mean(labels * np.log(0.4) + (1 - labels) * np.log(0.6))
    assert logloss.value == pytest.approx(expected) and logloss.low < expected < logloss.high
    with pytest.raises(UnpairedError):
        paired_bootstrap(rows(informed, labels), rows(noise, 1 - labels), "auc")


def test_runs_on_other_users_are_not_paired():
    with pytest.raises(UnpairedError, match="different users"):
        paired_bootstrap(users({"ndcg@10": [0.1, 0.2]}, ids=[1, 2]), users({"ndcg@10": [0.1, 0.2]}, ids=[1, 3]),
                         "ndcg@10")


def record(model: str, values: np.ndarray, metric="ndcg@10") -> dict:
    return {"model": model, "valid_metric": metric.upper(), "test_result": {metric: float(values.mean())},
            "test_units": users({metric: values})}


def test_each_model_is_compared_with_the_best_other_one():
    rng = np.random.default_rng(4)
    base = rng.random(400)
    records = [record("A", base), record("B", np.clip(base + 0.1, 0, 1)), record("C", base + rng.normal(0, 0.01, 400))]
    result = comparison_significance(records, resamples=300, seed=0)
    by_model = {d["model"]: d for d in result["differences"]}
    assert by_model["A"]["against"] == "B" and by_model["C"]["against"] == "B"
    assert by_model["B"]["against"] in {"A", "C"} and by_model["B"]["significant"] and by_model["B"]["low"] > 0
    assert by_model["A"]["significant"] and by_model["A"]["high"] < 0
    assert result["metric"] == "ndcg@10" and result["unit"] == "user" and result["missing"] == []
    value, low, high = result["intervals"]["A"]["ndcg@10"]
    assert value == pytest.approx(base.mean()) and low < value < high
    # a metric where smaller is better picks the smallest as best; a record without units is named, not compared
    smaller = [{**r, "valid_metric": "LogLoss"} for r in records]
    assert comparison_significance(smaller, resamples=10)["missing"] == ["A", "B", "C"]


@pytest.fixture
def even_users_hit(monkeypatch):
    """SASRec ranks each test row's target first for even user ids and last for odd ones."""

    def full_sort_predict(self, interaction):
        users, targets = interaction[self.USER_ID], interaction[self.ITEM_ID]
        scores = torch.zeros(len(users), self.n_items)
        scores[torch.arange(len(users)), targets] = torch.where(users % 2 == 0, 1.0, -1.0)
        return scores

    monkeypatch.setattr(SASRec, "full_sort_predict", full_sort_predict)


def test_a_run_keeps_each_test_user_s_metric_values(base_config, small_sasrec, even_users_hit):
    settings = {**base_config, **small_sasrec, "metric_decimal_place": 10, "topk": [5, 10]}
    result = run_recbole_llm("SASRec", "ml-tiny", config_dict=settings)
    units = result["test_units"]
    assert units["unit"] == "user" and units["users"] == sorted(set(units["users"]))
    assert len(units["users"]) == result["test_rows"] == 60
    for name, value in result["test_result"].items():  # RecBole's evaluator averages exactly these values
        assert np.mean(units["values"][name]) == pytest.approx(value, abs=1e-9), name
    # each value belongs to its user: the planted hits are on the even ids
    even = np.array(units["users"]) % 2 == 0
    assert np.array_equal(np.array(units["values"]["ndcg@10"]), even.astype(float))
    assert np.array_equal(np.array(units["values"]["mrr@5"]), even.astype(float))
    assert result["valid_scores"] and result["valid_scores"][0][0] == 0


def test_a_ctr_run_keeps_its_scored_rows(base_config):
    settings = {**base_config, "threshold": {"rating": 4}, "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC",
                "metric_decimal_place": 10, "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO",
                                                          "group_by": None, "mode": "labeled"},
                "train_neg_sample_args": None}
    result = run_recbole_llm("LR", "ml-tiny", config_dict=settings)
    units = result["test_units"]
    assert units["unit"] == "row" and len(units["scores"]) == len(units["labels"]) == result["test_rows"]
    assert units["users"] == sorted(units["users"])
    for name in ("auc", "logloss"):  # RecBole's metric on the kept rows is the run's test result
        assert bootstrap(units, name, resamples=1).value == pytest.approx(result["test_result"][name], abs=1e-9)


def png_is_a_picture(path: Path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_comparison_cli_prints_intervals_and_writes_plots(base_config, small_sasrec, capsys):
    flags = [f"--{k}={v}" for k, v in {**base_config, **small_sasrec, "epochs": 2}.items()]
    assert main(["--model=Pop,SASRec", "--dataset=ml-tiny", "--table=cmp.md", "--results=runs.jsonl", *flags]) == 0
    out = capsys.readouterr().out
    assert "| test mrr@10 − best other, 95% CI |" in out and "paired percentile bootstrap" in out
    saved = json.loads(Path("cmp.json").read_text())["significance"]
    assert [d["against"] for d in saved["differences"]] == ["SASRec", "Pop"]
    assert saved["differences"][0]["difference"] == pytest.approx(-saved["differences"][1]["difference"])
    records = [json.loads(line) for line in Path("runs.jsonl").read_text().splitlines()]
    assert saved["intervals"]["Pop"]["mrr@10"][0] == pytest.approx(records[0]["test_result"]["mrr@10"], abs=1e-4)
    assert [epoch for epoch, _ in records[1]["valid_scores"]] == [0, 1]
    for name in ("cmp-metrics.png", "cmp-curves.png"):
        png_is_a_picture(Path(name))

    assert main(["--model=Pop", "--dataset=ml-tiny", "--table=off.md", "--significance=off", "--plots=off",
                 *flags]) == 0
    assert "best other" not in capsys.readouterr().out
    assert not Path("off.json").exists() and not list(Path().glob("off-*.png"))


def test_learning_curves_draw_batch_losses_of_every_stage_and_the_valid_metric(tmp_path):
    llm = {"model": "CALRec", "valid_metric": "NDCG@10", "train_losses": [[0, [1.0, 2.0]]],
           "train_batch_losses": [["stage_loss", 0, b, 3.0 - b / 10] for b in range(20)]
           + [["batch_loss", e, b, 2.0 - e - b / 20] for e in range(2) for b in range(10)],
           "valid_scores": [[0, 0.01], [1, 0.03]]}
    # Pop as RecBole's trainer logs it: a loss of 0 (it trains nothing), one validation
    baseline = {"model": "Pop", "valid_metric": "NDCG@10", "train_losses": [[0, 0.0]], "valid_scores": [[0, 0.0168]]}
    png_is_a_picture(plot_curves([llm, baseline], tmp_path / "curves.png"))
    curved = {**llm, "model": "SemConv", "valid_curve": [
        {"epochs": e, "optimizer_steps": int(10 * e), "valid_score": s} for e, s in ((0.5, 0.02), (1, 0.01), (2, 0.03))]}
    panels = curves_figure([llm, baseline, curved]).axes  # in drawing order: each panel, then its twin if any
    assert [panel.get_title() for panel in panels] == ["CALRec", "", "Pop", "", "SemConv", ""]
    lines = {line.get_label(): line for line in panels[0].get_lines()}
    (boundary,) = [line for label, line in lines.items() if label.startswith("_")]  # the dotted line between stages
    assert set(lines) - {boundary.get_label()} == {"train loss (stage_loss)", "train loss (batch_loss)"}
    # stages one after another, each stage's batches spread over its epochs, ending at the epoch's end: Stage I's
    # one epoch over [0, 1], fit's two over [1, 3]
    assert lines["train loss (stage_loss)"].get_xdata()[[0, -1]] == pytest.approx([0.05, 1])
    assert list(lines["train loss (batch_loss)"].get_xdata()[[0, 9, 10, 19]]) == pytest.approx([1.1, 2, 2.1, 3])
    assert list(boundary.get_xdata()) == [1, 1] and panels[0].get_xlabel() == "epoch (stages one after another)"
    assert panels[2].get_xlabel() == "epoch"
    assert not panels[2].get_lines()  # Pop: no loss curve at 0, only its validation
    twins = [panels[1].get_lines()[0], panels[3].get_lines()[0], panels[5].get_lines()[0]]
    assert {t.get_label() for t in twins} == {"valid NDCG@10"}
    # epoch ends, then the curve inside epochs; fit's validations after the stage before fit
    assert [list(t.get_xdata()) for t in twins] == [[2, 3], [1], [1.5, 2, 3]]
    assert list(twins[2].get_ydata()) == [0.02, 0.01, 0.03]
    # a run with nothing to draw (no loss above 0, no validation) says so instead of an empty panel
    untrained = {"model": "Pop", "valid_metric": "NDCG@10", "train_losses": [[0, 0.0]], "valid_scores": []}
    (panel,) = curves_figure([untrained]).axes
    assert not panel.get_lines() and [t.get_text() for t in panel.texts] == ["no training curve"]
    assert [t.get_text() for p in panels for t in p.texts] == []
    records = [{"model": m, "test_result": {"ndcg@10": v, "hit@10": 2 * v}} for m, v in (("A", 0.1), ("B", 0.2))]
    png_is_a_picture(plot_comparison(records, None, tmp_path / "bars.png"))
