"""Resumable runs of RecBole's own trainers (recbole_llm.trainer.resume): stopped and rerun, a run ends exactly where
an uninterrupted one ends; a run that stopped early is not trained again; a later process needs no unpickling of
files it did not write."""

from pathlib import Path

import pytest
import torch
from recbole.trainer import Trainer

from recbole_llm import compat
from recbole_llm.quick_start import run_recbole_llm


def forget_written_files():
    """What a new process knows: no checkpoint written by it."""
    compat._TRUSTED_CHECKPOINTS.clear()


@pytest.mark.parametrize("model", ["SASRec", "BPR"])
def test_a_stopped_baseline_resumes_to_the_uninterrupted_result(model, base_config, small_sasrec, tmp_path):
    # SASRec draws dropout masks (torch) and shuffles (the loader's generator); BPR samples negatives (numpy):
    # every stream must continue where the first run stopped, as must Adam's moments and early stopping
    settings = {**base_config, **small_sasrec, "learner": "adam", "stopping_step": 50, "eval_step": 1,
                "metric_decimal_place": 10}
    if model == "SASRec":
        settings.update(hidden_dropout_prob=0.3, attn_dropout_prob=0.3)
    straight = run_recbole_llm(model, "ml-tiny", config_dict={**settings, "epochs": 4,
                                                              "checkpoint_dir": str(tmp_path / "straight")})
    resumed = {**settings, "checkpoint_dir": str(tmp_path / "resumed")}
    forget_written_files()
    first = run_recbole_llm(model, "ml-tiny", config_dict={**resumed, "epochs": 2})
    forget_written_files()  # the rerun is a new process: best.pth must be rewritten by it to be loadable
    second = run_recbole_llm(model, "ml-tiny", config_dict={**resumed, "epochs": 4})

    assert [epoch for epoch, _ in first["train_losses"]] == [0, 1]
    assert second["train_losses"] == straight["train_losses"]  # epochs 2, 3 trained after the resume, 0, 1 kept
    assert second["valid_scores"] == straight["valid_scores"] and len(second["valid_scores"]) == 4
    assert second["test_result"] == straight["test_result"]
    assert second["best_valid_result"] == straight["best_valid_result"]
    (one,), (two,) = (list((tmp_path / name).glob(f"{model}-ml-tiny-*/last.pth")) for name in ("straight", "resumed"))
    a, b = (torch.load(path, weights_only=True) for path in (one, two))  # loads without unpickling objects
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 3
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name


def test_a_run_that_stopped_early_is_not_trained_again(base_config, small_sasrec, monkeypatch):
    settings = {**base_config, **small_sasrec, "epochs": 40, "stopping_step": 1, "learning_rate": 0.05}
    first = run_recbole_llm("SASRec", "ml-tiny", config_dict=settings)
    assert len(first["train_losses"]) < 40  # it stopped early
    forget_written_files()
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a, **k: pytest.fail("a finished run trained again"))
    second = run_recbole_llm("SASRec", "ml-tiny", config_dict={**settings, "epochs": 60})
    assert second["test_result"] == first["test_result"]  # tested with the first run's best weights
    assert second["train_losses"] == first["train_losses"] and second["valid_scores"] == first["valid_scores"]


def test_resume_off_or_other_inputs_train_afresh(base_config, small_sasrec, monkeypatch, tmp_path):
    settings = {**base_config, **small_sasrec, "epochs": 1}
    run_recbole_llm("SASRec", "ml-tiny", config_dict=settings)
    trained = []
    original = Trainer._train_epoch
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, *a, **k: trained.append(1) or original(self, *a, **k))
    run_recbole_llm("SASRec", "ml-tiny", config_dict={**settings, "resume": False})
    run_recbole_llm("SASRec", "ml-tiny", config_dict={**settings, "learning_rate": 0.002})  # another run directory
    assert len(trained) == 2
    assert len(list(Path(settings["checkpoint_dir"]).glob("SASRec-ml-tiny-*"))) == 2


def test_a_model_with_non_tensor_state_runs_without_a_resume_point(base_config):
    # ItemKNN keeps scipy matrices as extra state: RecBole's run as before, no last.pth
    record = run_recbole_llm("ItemKNN", "ml-tiny", config_dict=base_config)
    assert record["test_result"]
    assert not list(Path(base_config["checkpoint_dir"]).rglob("last.pth"))
