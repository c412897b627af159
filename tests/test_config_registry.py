"""Name lookup (plugin first, then RecBole) and config layering (equality with RecBole's own pipeline: test_families)."""

import pytest
from recbole.config import Config as RecBoleConfig
from recbole.model.sequential_recommender import SASRec

from recbole_llm import Config, get_model, list_models
from recbole_llm.config import UnknownPresetError, properties_dir
from recbole_llm.registry import UnknownModelError


def test_recbole_models_resolve_through_the_plugin_lookup():
    assert get_model("SASRec") is SASRec


def test_plugin_model_resolves_by_name_and_is_listed():
    from toy_llm import ToyLLMRec

    assert get_model("ToyLLMRec") is ToyLLMRec
    plugin, recbole = list_models()
    assert "ToyLLMRec" in plugin and "SASRec" in recbole and "LightGCN" in recbole


def test_unknown_model_names_every_available_model():
    with pytest.raises(UnknownModelError) as err:
        get_model("NotAModel")
    message = str(err.value)
    assert "NotAModel" in message and "SASRec" in message and "BERT4Rec" in message


def test_properties_folder_is_found():
    assert (properties_dir() / "overall.yaml").is_file()


def test_model_name_from_config_dict_alone(base_config):
    # HyperTuning and load_model pass the model only inside the config dict.
    config = Config(config_dict={**base_config, "model": "ToyLLMRec", "dataset": "ml-tiny"})
    assert config["model"] == "ToyLLMRec" and config["MODEL_TYPE"].name == "SEQUENTIAL"


def test_layering_plugin_defaults_then_dataset_then_user(base_config):
    config = Config("BPR", "ml-100k", config_dict={"gpu_id": "", "lora_r": 4})
    assert config["lora_alpha"] == 16  # plugin overall.yaml
    assert config["lora_r"] == 4  # config_dict beats plugin defaults
    assert config["item_text_fields"]["Title"] == "movie_title"  # plugin dataset/ml-100k.yaml
    assert "item_text_fields" in config.parameters["Dataset"]  # invalidates RecBole's dataset cache


def test_a_preset_layers_each_models_own_file_under_the_user_settings(base_config):
    calrec = Config("CALRec", "ml-100k", config_dict={"gpu_id": "", "preset": "cpu", "num_samples": 2})
    assert calrec["max_history_items"] == 3  # properties/presets/CALRec-cpu.yaml beats model/CALRec.yaml (20)
    assert calrec["num_samples"] == 2  # the user's setting beats the preset
    assert calrec["item_text_fields"] == {"Title": "movie_title", "Year": "release_year"}  # beats dataset YAML
    assert Config("SASRec", "ml-100k", config_dict={"gpu_id": "", "preset": "cpu"})["epochs"] == 2
    assert Config("Pop", "ml-100k", config_dict={"gpu_id": "", "preset": "cpu"})["epochs"] == 300  # no Pop preset


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(UnknownPresetError, match="unknown preset 'laptop'; presets: cpu"):
        Config("SASRec", "ml-100k", config_dict={"gpu_id": "", "preset": "laptop"})


def test_sequential_ce_models_start_without_negative_sampling(base_config):
    with pytest.raises(ValueError, match="should be None when the loss_type is CE"):
        RecBoleConfig("SASRec", "ml-tiny", config_dict=base_config)
    config = Config("SASRec", "ml-tiny", config_dict=base_config)
    assert config["train_neg_sample_args"]["distribution"] == "none"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (properties_dir() / "presets").glob("*.yaml")))
def test_every_shipped_preset_holds_valid_settings_that_reach_the_config(preset):
    import yaml

    model, name = preset.split("-", 1)
    path = properties_dir() / "presets" / f"{preset}.yaml"
    config = Config(model, "ml-100k", config_dict={"gpu_id": "", "preset": name})  # validated when built
    for key, value in yaml.safe_load(path.read_text()).items():
        assert config[key] == value, key
