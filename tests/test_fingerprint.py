"""Caches and resumable runs are keyed by everything that shapes them: every YAML layer (preset, model file,
dataset file), the data files' content and the package version. A changed input never reuses a file; an
unchanged rerun does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import recbole_llm.config
from recbole_llm import load_model, run_recbole_llm
from recbole_llm.config import properties_dir
from recbole_llm.model.calrec import STAGE_TWO_KEYS
from recbole_llm.quick_start import make_config
from recbole_llm.trainer.checkpoint import CheckpointError
from recbole_llm.fingerprint import run_fingerprint

import toy_llm  # noqa: F401  (registers ToyLLMRec)


@pytest.fixture
def properties(tmp_path, monkeypatch) -> Path:
    """An editable copy of properties/ that the Config reads instead of the package's."""
    copy = tmp_path / "properties"
    shutil.copytree(properties_dir(), copy)
    monkeypatch.setattr(recbole_llm.config, "properties_dir", lambda: copy)
    return copy


@pytest.fixture
def data_copy(data_path, tmp_path) -> Path:
    """An editable copy of the ml-tiny data folder (same dataset name, another --data_path)."""
    root = tmp_path / "data"
    shutil.copytree(data_path / "ml-tiny", root / "ml-tiny")
    return root


def _edit_yaml(path: Path, **values) -> None:
    content = yaml.safe_load(path.read_text()) or {}
    content.update(values)
    path.write_text(yaml.safe_dump(content))


def _keys(base_config, **overrides) -> tuple[str, str]:
    """(run fingerprint, CALRec Stage-I fingerprint) of CALRec with the cpu preset."""
    config = make_config("CALRec", "ml-tiny", config_dict={**base_config, "preset": "cpu", **overrides})
    return run_fingerprint(config), run_fingerprint(config, ignore=STAGE_TWO_KEYS)


@pytest.mark.parametrize("layer, values", [
    ("presets/CALRec-cpu.yaml", {"stage1_steps": 40}),
    ("presets/CALRec-cpu.yaml", {"item_text_fields": {"Title": "movie_title"}}),
    ("model/CALRec.yaml", {"contrastive_tau": 0.7}),
    ("overall.yaml", {"lora_dropout": 0.1}),
])
def test_a_changed_yaml_layer_changes_the_run_and_stage_one_keys(base_config, properties, layer, values):
    before = _keys(base_config)
    assert _keys(base_config) == before  # unchanged: the same keys, so the cache and resume point are reused
    _edit_yaml(properties / layer, **values)
    after = _keys(base_config)
    assert after[0] != before[0] and after[1] != before[1]


def test_scoring_keys_change_the_run_but_share_stage_one(base_config):
    before = _keys(base_config)
    after = _keys(base_config, num_samples=7, calrec_stages=[1])
    assert after[0] != before[0] and after[1] == before[1]


def test_the_same_dataset_name_with_other_content_is_another_input(base_config, data_copy):
    before = _keys({**base_config, "data_path": str(data_copy)})
    assert before == _keys(base_config)  # same content in another folder: the same keys
    item_file = data_copy / "ml-tiny" / "ml-tiny.item"
    item_file.write_text(item_file.read_text().replace("Toy Story", "Toy Stories"))
    assert _keys({**base_config, "data_path": str(data_copy)}) != before


def test_the_package_version_is_part_of_the_key(base_config, monkeypatch):
    before = _keys(base_config)
    monkeypatch.setattr(recbole_llm, "__version__", "99.0")
    assert _keys(base_config) != before


def test_edited_data_is_trained_afresh_and_the_old_checkpoint_refuses_it(base_config, data_copy):
    config = {**base_config, "data_path": str(data_copy), "llm_path": "tiny-random", "lora_r": 4,
              "train_batch_size": 128, "MAX_ITEM_LIST_LENGTH": 10}
    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=config)
    checkpoints = Path(base_config["checkpoint_dir"])
    (first,) = checkpoints.glob("ToyLLMRec-ml-tiny-*")

    item_file = data_copy / "ml-tiny" / "ml-tiny.item"
    item_file.write_text(item_file.read_text().replace("Toy Story", "Toy Stories"))
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_model(first / "best", with_data=False)
    assert load_model(first / "best", with_data=False, check_inputs=False)[1] is not None

    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=config)  # resume: True, but the inputs changed
    second = [path for path in checkpoints.glob("ToyLLMRec-ml-tiny-*") if path != first]
    assert len(second) == 1
    assert json.loads((second[0] / "last" / "recbole_llm.json").read_text())["epoch"] == 0  # trained, not resumed


def test_a_local_backbone_retrained_in_place_is_another_input(base_config, tmp_path):
    """``llm_path`` names a directory, not its weights: every key (runs, Stage I, RALLRec's descriptions and text
    embeddings) follows the files' content."""
    import torch
    from transformers import AutoModelForCausalLM

    from recbole_llm.llm.backbone import materialize_tiny_random
    from recbole_llm.model.rallrec import RALLRec

    local = materialize_tiny_random(tmp_path / "my-llm")
    settings = {"llm_path": str(local), "llm_dtype": "fp32", "llm_quantization": "none", "device": "cpu"}
    before = _keys(base_config, llm_path=str(local)), RALLRec._backbone_id(settings)
    assert (_keys(base_config, llm_path=str(local)), RALLRec._backbone_id(settings)) == before

    model = AutoModelForCausalLM.from_pretrained(local)
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(local)  # the same path, other weights
    (run, stage_one), backbone = _keys(base_config, llm_path=str(local)), RALLRec._backbone_id(settings)
    assert run != before[0][0] and stage_one != before[0][1] and backbone != before[1]



def test_the_number_of_processes_and_a_rank_s_own_settings_are_not_keyed(base_config):
    # processes share a step's batches (the same run on any number of them); rank 1's quiet logging is rank 0's run
    config = make_config("ToyLLMRec", "ml-tiny", config_dict={**base_config, "llm_path": "tiny-random"})
    alone = run_fingerprint(config)
    config.final_config_dict.update(world_size=2, nproc=2, local_rank=1, verbose=False, state="error",
                                    show_progress=False)
    assert run_fingerprint(config) == alone
    config.final_config_dict.update(gradient_accumulation_steps=2)  # a step of two batches is another run
    assert run_fingerprint(config) != alone
