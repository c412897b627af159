"""Each shim in recbole_llm.compat, tested so that the test fails without it."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset, data_preparation
from recbole.trainer import HyperTuning, Trainer
from recbole.utils import get_model, init_seed

from recbole_llm import compat


def test_numpy_aliases_that_recbole_uses_exist():
    for name in ("float", "int", "bool", "long", "float_", "bool8", "str", "object"):
        assert hasattr(np, name), name
    assert np.float_ is np.float64


def test_recbole_config_builds_on_numpy_2(base_config):
    # RecBole's own compatibility_settings assigns np.float_ and raises on numpy 2.
    config = RecBoleConfig("BPR", "ml-tiny", config_dict=base_config)
    assert config["model"] == "BPR"


def _train_bpr(base_config):
    config = RecBoleConfig("BPR", "ml-tiny", config_dict=base_config)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model("BPR")(config, train._dataset)
    trainer = Trainer(config, model)
    trainer.fit(train, valid, saved=True)
    return trainer, test


def test_best_model_reload_works_under_torch_weights_only(base_config):
    trainer, test = _train_bpr(base_config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.evaluate(test, load_best_model=True)  # torch.load of a pickled Config
    assert set(result) >= {"recall@10", "ndcg@10"}
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


class Opaque:
    """Any Python object in a checkpoint needs full unpickling."""


def test_weights_only_stays_on_for_other_files(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"obj": Opaque()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        torch.load(path)
    with pytest.raises(compat.CheckpointNotTrustedError, match="not written by this process"):
        compat.load_recbole_checkpoint(str(path))


def test_exhaustive_search_enumerates_the_whole_grid_once():
    seen = []

    def objective(params, fixed=None):
        seen.append((params["a"], params["b"]))
        return {"model": "X", "best_valid_score": params["a"] * 10 + params["b"], "valid_score_bigger": True,
                "best_valid_result": {}, "test_result": {}}

    hyper = HyperTuning(objective, params_dict={"choice": {"a": [1, 2], "b": [3, 4, 5]}}, algo="exhaustive",
                        early_stop=100)
    hyper.run()
    assert sorted(seen) == [(a, b) for a in (1, 2) for b in (3, 4, 5)]
    assert hyper.best_params == {"a": 2, "b": 5}


def test_exhaustive_search_rejects_continuous_parameters():
    from recbole.trainer.hyper_tuning import ExhaustiveSearchError

    hyper = HyperTuning(lambda p, f=None: None, params_dict={"uniform": {"lr": [0.1, 0.2]}}, algo="exhaustive")
    with pytest.raises(ExhaustiveSearchError, match="random or --tune_algo=bayes"):
        hyper.run()


def test_scipy_dok_matrix_update_is_available():
    matrix = sp.dok_matrix((3, 3), dtype=np.float32)
    matrix._update({(0, 1): 1.0, (2, 2): 3.0})
    assert matrix.nnz == 2 and matrix[2, 2] == 3.0


@pytest.mark.parametrize("model", ["SASRec", "DIN", "LightGCN"])
def test_resolving_a_recbole_model_leaves_autograd_anomaly_detection_off(model):
    # RecBole's SINE module turns it on at import, and get_model imports it on the way to most models: every
    # backward pass after that NaN-checks every output and keeps a traceback per op (1.5x slower training)
    get_model(model)
    import recbole.model.sequential_recommender.sine  # noqa: F401

    assert not torch.is_anomaly_enabled()


def test_import_never_pulls_in_ray_or_recbole_quick_start():
    code = "import sys, recbole_llm; print('ray' in sys.modules, 'recbole.quick_start' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


_TRIGGER = """
import json, sys, warnings
import recbole_llm
from recbole_llm import run_recbole_llm
from recbole_llm.quick_start import make_config
from recbole_llm.registry import create_dataset
if sys.argv[1] == "unfiltered":
    warnings.resetwarnings()
    warnings.simplefilter("always")
settings = json.loads(sys.argv[2])
run_recbole_llm("LightGCN", "ml-tiny", config_dict={**settings, "embedding_size": 8})
create_dataset(make_config("FM", "ml-tiny", config_dict={**settings, "threshold": {"rating": 4}, "load_col": None}))
warnings.warn("a warning about the user's own data", UserWarning)
"""


def _warnings_in_a_fresh_process(base_config, mode: str) -> str:
    """What a user's console shows (stderr, warnings on) while RecBole trains a graph model and builds a context
    dataset; ``unfiltered`` drops recbole_llm's filters first."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "always", "-c", _TRIGGER, mode, json.dumps(base_config)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_foreign_warnings_a_user_cannot_act_on_are_silenced_and_no_other(base_config):
    import re

    from recbole_llm.compat import FOREIGN_WARNINGS

    foreign = [pattern for _, pattern, module, _ in FOREIGN_WARNINGS if module.startswith("recbole")]
    raised = _warnings_in_a_fresh_process(base_config, "unfiltered")
    assert all(re.search(pattern, raised) for pattern in foreign)  # RecBole does raise each of them
    shown = _warnings_in_a_fresh_process(base_config, "filtered")
    assert not any(re.search(pattern, shown) for pattern in foreign)
    assert "a warning about the user's own data" in shown
