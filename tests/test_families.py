"""RecBole's own models run through recbole_llm exactly as through RecBole: one model of every family, for one
epoch on a tiny dataset, must give RecBole's own pipeline's validation score and test metrics to the last digit."""

from __future__ import annotations

import importlib.util

import pytest
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer
from recbole.utils import init_seed

from recbole_llm import run_recbole_llm
from recbole_llm.cli import main

SMALL_SEQUENTIAL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
                    "train_batch_size": 256, "embedding_size": 16}
CASES = {
    "general (BPR)": ("BPR", "ml-tiny", {"embedding_size": 16}),
    "sequential, CE loss (SASRec)": ("SASRec", "ml-tiny", {**SMALL_SEQUENTIAL, "train_neg_sample_args": None}),
    "sequential, BPR loss (GRU4Rec)": ("GRU4Rec", "ml-tiny", {**SMALL_SEQUENTIAL, "loss_type": "BPR"}),
    "context (FM)": ("FM", "ml-tiny", {"embedding_size": 8, "threshold": {"rating": 4}}),
    "knowledge-aware (CKE)": ("CKE", "ml-tiny-kg", {
        "embedding_size": 16, "kg_embedding_size": 16,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "kg": ["head_id", "relation_id", "tail_id"],
                     "link": ["item_id", "entity_id"]}}),
}
EXLIB = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(package) is None,
                                                     reason=f"{package} is not installed"))
         for name, package in (("xgboost", "xgboost"), ("lightgbm", "lightgbm"))]


def recbole_pipeline(model: str, dataset: str, settings: dict) -> tuple[float, dict]:
    """RecBole 1.2.1's own run (what ``run_recbole`` does, without importing ``recbole.quick_start``)."""
    config = RecBoleConfig(model, dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = recbole_get_model(model)(config, train._dataset).to(config["device"])
    trainer = recbole_get_trainer(config["MODEL_TYPE"], model)(config, net)
    best_valid_score, _ = trainer.fit(train, valid, saved=True)
    return float(best_valid_score), {k: float(v) for k, v in trainer.evaluate(test, load_best_model=True).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_every_recbole_family_gives_recboles_own_metrics(case, base_config):
    model, dataset, extra = CASES[case]
    settings = {**base_config, **extra, "epochs": 1}
    ours = run_recbole_llm(model, dataset, config_dict=settings)
    valid_score, test_result = recbole_pipeline(model, dataset, settings)
    assert ours["best_valid_score"] == valid_score
    assert ours["test_result"] == test_result
    assert any(value > 0 for value in test_result.values())  # a run that learnt or ranked something


@pytest.mark.parametrize("model", EXLIB)
def test_gradient_boosting_models_give_recboles_own_metrics(model, base_config):
    settings = {**base_config, "threshold": {"rating": 4}, "epochs": 1}
    ours = run_recbole_llm(model, "ml-tiny", config_dict=settings)
    assert ours["test_result"] == recbole_pipeline(model, "ml-tiny", settings)[1]


def test_a_bpr_loss_sequential_model_gets_negative_samples(base_config):
    from recbole_llm.quick_start import make_config

    config = make_config("GRU4Rec", "ml-tiny", config_dict={**base_config, "loss_type": "BPR"})
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    assert make_config("GRU4Rec", "ml-tiny", config_dict=base_config)["train_neg_sample_args"]["distribution"] == "none"


def test_an_internal_failure_is_a_traceback_not_a_usage_error(base_config, monkeypatch, capsys):
    import recbole_llm.quick_start as quick_start

    def broken(*args, **kwargs):
        raise KeyError("neg_item_id")  # what RecBole raised for a BPR sequential model without negatives

    monkeypatch.setattr(quick_start, "build_model_and_data", broken)
    with pytest.raises(KeyError, match="neg_item_id"):
        main(["--model=BPR", "--dataset=ml-tiny", *[f"--{k}={v}" for k, v in base_config.items()]])
    assert "error:" not in capsys.readouterr().err
