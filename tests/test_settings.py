"""Bad input, as a hostile user types it: one `error:` line naming the key, value, what is allowed and the fix,
exit status 2, before any data or model loads; and the refusals that need data (empty splits, header-only files,
tuning typos), the warning for items without text, and Ctrl-C keeping the finished part of a comparison."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from recbole_llm import Config
from recbole_llm.cli import main
from recbole_llm.settings import SettingError, parse_value


def _flags(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


@pytest.fixture
def flags(base_config) -> list[str]:
    return [*_flags(base_config), "--llm_path=tiny-random"]


@pytest.mark.parametrize("flag, named", [
    ("--lora_r=-1", "lora_r=-1: it is below 0; allowed: an integer >= 0"),
    ("--temperature=-1", "temperature=-1: it is below 0"),
    ("--max_item_tokens=0", "max_item_tokens=0: it is below 1"),
    ("--train_batch_size=0", "train_batch_size=0: it is below 1"),
    ("--learning_rate=abc", "learning_rate='abc': it is not a number; allowed: a number > 0"),
    ("--num_samples=0", "num_samples=0"),
    ("--contrastive_tau=0", "contrastive_tau=0: it is not above 0"),
    ("--calrec_stages=[3]", "calrec_stages=[3]: 3 is not 1 or 2"),
    ("--stage1_datasets=ml-1m", "stage1_datasets='ml-1m': it is not a list"),
    ("--llm_dtype=float64", "llm_dtype='float64': it is not one of them; allowed: one of auto | fp32 | bf16 | fp16"),
    ("--llm_quantization=3bit", "llm_quantization='3bit'"),
    ("--item_text_fields=[a]", "item_text_fields=['a']: it is not a non-empty mapping"),
])
def test_a_bad_value_is_one_error_line_with_the_key_the_range_and_the_fix(flag, named, flags, capsys):
    assert main(["--model=CALRec", "--dataset=ml-tiny", *flags, flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "fix: e.g. --" in err
    assert "Traceback" not in err


def test_settings_parse_the_same_from_yaml_config_dict_and_command_line(base_config, tmp_path):
    yaml_file = tmp_path / "user.yaml"
    yaml_file.write_text("item_text_fields: {Title: movie_title}\nstage1_datasets: [ml-1m]\nlearning_rate: 0.001\n")
    from_yaml = Config("CALRec", "ml-tiny", config_file_list=[str(yaml_file)], config_dict=base_config)
    from_dict = Config("CALRec", "ml-tiny", config_dict={
        **base_config, "item_text_fields": "{Title: movie_title}", "stage1_datasets": "[ml-1m]",
        "learning_rate": "0.001"})
    for key in ("item_text_fields", "stage1_datasets", "learning_rate"):
        assert from_yaml[key] == from_dict[key]
    assert from_dict["item_text_fields"] == {"Title": "movie_title"} and from_dict["stage1_datasets"] == ["ml-1m"]


def test_no_configuration_string_is_ever_evaluated(base_config, tmp_path):
    marker = tmp_path / "PWNED"
    payload = f"__import__('os').system('touch {marker}') or 2020"
    assert parse_value(payload) == payload
    with pytest.raises(SettingError, match="seed="):
        Config("BPR", "ml-tiny", config_dict={**base_config, "seed": payload})
    assert not marker.exists()


def test_a_lower_case_model_name_suggests_the_right_one(capsys):
    assert main(["--model=sasrec"]) == 2
    assert "Unknown model 'sasrec' (did you mean SASRec?)" in capsys.readouterr().err


def test_item_text_fields_take_yaml_on_the_command_line(flags, capsys):
    # a wrong column is named (with the columns there are), not an AttributeError on a string
    assert main(["--model=CALRec", "--dataset=ml-tiny", *flags, "--item_text_fields={Title: title}",
                 "--calrec_stages=[2]"]) == 2
    err = capsys.readouterr().err
    assert "item text fields ['title'] are not columns" in err and "movie_title" in err


def _write_dataset(root: Path, name: str, inter: pd.DataFrame) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    inter.to_csv(folder / f"{name}.inter", sep="\t", index=False)


def test_a_header_only_inter_file_is_refused(tmp_path, capsys):
    _write_dataset(tmp_path, "empty", pd.DataFrame(columns=["user_id:token", "item_id:token"]))
    assert main(["--model=Pop", "--dataset=empty", f"--data_path={tmp_path}", "--gpu_id="]) == 2
    assert "holds no interactions" in capsys.readouterr().err


def test_a_run_whose_test_split_is_empty_is_refused(tmp_path, capsys):
    # every user has two interactions: leave-one-out cannot hold out one for validation and one for test
    inter = pd.DataFrame({"user_id:token": [1, 1, 2, 2], "item_id:token": [1, 2, 2, 3],
                          "timestamp:float": [1, 2, 1, 2]})
    _write_dataset(tmp_path, "pairs", inter)
    code = main(["--model=Pop", "--dataset=pairs", f"--data_path={tmp_path}", "--gpu_id=", "--state=ERROR",
                 "--eval_args={'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'mode': 'full'}",
                 "--load_col={inter: [user_id, item_id, timestamp]}"])  # a dict-valued key as YAML
    assert code == 2
    err = capsys.readouterr().err
    assert "split of pairs is empty" in err and "user_inter_num_interval" in err


def test_a_tuning_file_naming_an_unknown_key_is_refused(base_config, tmp_path, capsys):
    params = tmp_path / "typo.hyper"
    params.write_text("learning_rat choice [0.001,0.01]\n")
    assert main(["--model=BPR", "--dataset=ml-tiny", f"--tune={params}", *_flags(base_config)]) == 2
    assert "'learning_rat' (did you mean learning_rate?)" in capsys.readouterr().err


def test_many_items_without_text_are_warned_about(base_config, data_path, tmp_path, caplog):
    from recbole_llm.data import ItemTextBuilder
    from recbole_llm.registry import create_dataset

    folder = tmp_path / "partial"
    folder.mkdir()
    source = data_path / "ml-tiny"
    (folder / "partial.inter").write_bytes((source / "ml-tiny.inter").read_bytes())
    items = pd.read_csv(source / "ml-tiny.item", sep="\t", dtype=str)
    items.iloc[::3].to_csv(folder / "partial.item", sep="\t", index=False)  # a third of the items keep a row
    dataset = create_dataset(Config("BPR", "partial", config_dict={**base_config, "data_path": str(tmp_path)}))
    with caplog.at_level(logging.WARNING):
        texts = ItemTextBuilder(fields={"Title": "movie_title"}).build(dataset)
    assert "have no text" in caplog.text and "Title: unknown" in texts


@pytest.mark.parametrize("model, extra, named", [
    ("SASRec", ["--load_col={inter: [user_id, item_id]}"],
     "load_col.inter loads ['user_id', 'item_id'], not 'timestamp', but SASRec is sequential"),
    ("RALLRec", ["--threshold={score: 4}"], "has no 'score' column (its columns: user_id, item_id, rating, timestamp)"),
    ("RALLRec", ["--eval_args={split: {RS: [0.8,0.1,0.1]}, order: TO, mode: full}"],
     "Full sort evaluation do not match value-based metrics! Value metrics (AUC, LogLoss) score given rows"),
    ("SASRec", ["epochs=3"], "unrecognised argument epochs=3 (did you mean --epochs=3?)"),
    ("SemConv", ["--semconv_levels=1", "--semconv_codebook_size=64", "--semconv_beams=10", "--topk=[10]"],
     "semconv_levels=1 x semconv_codebook_size=64 cannot give the 1126 items unique codes"),
])
def test_refusals_that_read_the_data_come_before_anything_trains(model, extra, named, flags, capsys):
    assert main([f"--model={model}", "--dataset=ml-tiny", *flags, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


@pytest.mark.parametrize("line, named", [
    ("learning_rate choice [0.001,", "bad.hyper:2: 'learning_rate choice [0.001,': choice takes a list"),
    ('learning_rate choice [__import__("os").getcwd()]', "choice takes a list"),  # never evaluated
    ("learning_rate normal 0,1", "expected 'name type values' with type one of choice, uniform"),
])
def test_a_tuning_file_that_does_not_parse_names_the_file_and_line(line, named, base_config, tmp_path, capsys):
    params = tmp_path / "bad.hyper"
    params.write_text(f"# learning rates\n{line}\n")
    assert main(["--model=BPR", "--dataset=ml-tiny", f"--tune={params}", *_flags(base_config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err


def test_user_fields_without_a_user_file_are_warned_about(base_config, data_path, tmp_path, caplog):
    folder = tmp_path / "data" / "nousers"
    folder.mkdir(parents=True)
    for suffix in ("inter", "item"):
        (folder / f"nousers.{suffix}").write_bytes((data_path / "ml-tiny" / f"ml-tiny.{suffix}").read_bytes())
    from recbole_llm.quick_start import build_model_and_data, make_config

    config = make_config("RALLRec", "nousers", config_dict={
        **base_config, "data_path": str(tmp_path / "data"), "llm_path": "tiny-random", "llm_dtype": "fp32",
        "rallrec_descriptions": "template", "rallrec_embedding": "text", "eval_max_interactions": 16,
        "rallrec_user_fields": {"gender": "gender"}, "item_text_fields": {"Title": "movie_title"}})
    with caplog.at_level(logging.WARNING):
        _, _, model = build_model_and_data(config)
    assert "rallrec_user_fields names ['gender'], but nousers has no user file" in caplog.text
    assert model.users[1] == ("", "the user")
