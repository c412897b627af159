"""run_recbole_llm.py as a user runs it: errors, comparison table, JSON records, tuning."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from recbole_llm.cli import main


def _flags(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def test_unknown_model_exits_2_and_lists_models(capsys):
    assert main(["--model=NotAModel"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'NotAModel'" in err and "SASRec" in err and "LightGCN" in err


def test_unknown_dataset_names_the_path_looked_in(base_config, capsys):
    assert main(["--model=BPR", "--dataset=no-such-data", f"--data_path={base_config['data_path']}"]) == 2
    err = capsys.readouterr().err
    assert "no-such-data.inter" in err and base_config["data_path"] in err and "ml-1m" in err


def test_unknown_preset_exits_2(capsys):
    assert main(["--model=SASRec", "--preset=laptop"]) == 2
    assert "unknown preset 'laptop'" in capsys.readouterr().err


def test_comparison_prints_table_and_writes_records(base_config, small_sasrec, capsys, tmp_path):
    flags = _flags({**base_config, **small_sasrec})
    code = main(["--model=Pop,BPR,SASRec", "--dataset=ml-tiny", "--results=runs.jsonl", "--table=cmp.md", *flags])
    assert code == 0
    out = capsys.readouterr().out
    assert "| | Pop | BPR | SASRec |" in out and "test ndcg@10" in out and "peak RSS MiB" in out
    assert "split {'LS': 'valid_and_test'}" in out  # one sequential protocol for all three
    records = [json.loads(line) for line in Path("runs.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["Pop", "BPR", "SASRec"]
    assert len({json.dumps(r["protocol"], sort_keys=True) for r in records}) == 1
    for record in records:
        assert set(record["test_result"]) == {"recall@10", "mrr@10", "ndcg@10", "hit@10", "precision@10"}
        assert record["train_seconds"] > 0 and record["peak_rss_mib"] > 0
        assert record["versions"]["recbole"] == "1.2.1"
    assert records[2]["config"]["hidden_size"] == 16
    assert Path("cmp.md").read_text().count("|") > 20


def test_comparison_table_says_how_long_each_model_trained_and_under_which_preset(base_config, small_sasrec,
                                                                                  capsys):
    # SASRec's cpu preset sets epochs: 2 (properties/presets/SASRec-cpu.yaml); BPR has no cpu preset: RecBole's
    # early stopping ends it; MFU is an LLM trainer's figure: no row without one
    settings = {key: value for key, value in {**base_config, **small_sasrec}.items() if key != "epochs"}
    code = main(["--model=BPR,SASRec", "--dataset=ml-tiny", "--preset=cpu", "--stopping_step=1", "--results=r.jsonl",
                 "--significance=off", "--plots=off", *_flags(settings)])
    assert code == 0
    out = capsys.readouterr().out
    bpr = json.loads(Path("r.jsonl").read_text().splitlines()[0])
    assert f"| epochs trained (preset) | {len(bpr['train_losses'])} | 2 (cpu preset) |" in out
    assert 2 < len(bpr["train_losses"]) < 300 and bpr["preset"] == "cpu"
    assert "train MFU" not in out


def test_tuning_selects_on_validation_and_writes_trials(base_config, capsys, tmp_path):
    params = tmp_path / "bpr.hyper"
    params.write_text("learning_rate choice [0.0001,0.01]\n")
    code = main(["--model=BPR", "--dataset=ml-tiny", f"--tune={params}", "--table=tune.md", *_flags(base_config)])
    assert code == 0
    report = json.loads(Path("tune.json").read_text())
    assert len(report["trials"]) == 2
    best = max(report["trials"], key=lambda t: t["valid_score"])
    assert report["best_params"] == best["params"]
    assert {t["params"]["learning_rate"] for t in report["trials"]} == {0.0001, 0.01}
    assert f"best parameters (selected on valid MRR@10): learning_rate:{best['params']['learning_rate']}" in (
        capsys.readouterr().out
    )


def test_ctrl_c_during_a_comparison_keeps_the_finished_models_and_ends_every_process(base_config, tmp_path):
    # as a user presses Ctrl-C: SIGINT to the whole foreground process group (the CLI and the model's process),
    # once Pop's record is written and while BPR trains (up to 300 epochs)
    flags = _flags({**base_config, "epochs": 300, "stopping_step": 300})
    with open("out.txt", "w") as out, open("err.txt", "w") as err:  # files, not pipes: nothing blocks on a full pipe
        cli = subprocess.Popen([sys.executable, "-m", "recbole_llm.cli", "--model=Pop,BPR", "--dataset=ml-tiny",
                                "--results=r.jsonl", "--table=t.md", "--plots=off", *flags],
                               stdout=out, stderr=err, start_new_session=True)

    def is_model_process(process) -> bool:
        try:
            return "spawn_main" in " ".join(process.cmdline())
        except psutil.Error:  # it ended meanwhile
            return False

    def bpr_process():  # the model process started after Pop's record was written
        if not (Path("r.jsonl").exists() and Path("r.jsonl").read_text().strip()):
            return None
        return next((child for child in psutil.Process(cli.pid).children() if is_model_process(child)), None)

    deadline = time.monotonic() + 300
    while bpr_process() is None and time.monotonic() < deadline:
        assert cli.poll() is None, Path("err.txt").read_text()
        time.sleep(0.2)
    time.sleep(2)  # BPR's run under way
    children = psutil.Process(cli.pid).children(recursive=True)
    assert any(is_model_process(child) for child in children)
    os.killpg(cli.pid, signal.SIGINT)
    cli.wait(timeout=120)
    out, err = Path("out.txt").read_text(), Path("err.txt").read_text()
    assert cli.returncode == 130, err
    assert "interrupted during BPR" in err
    assert "| | Pop |" in out and "BPR |" not in out  # the table of the finished model only
    assert "interrupted during BPR: finished runs only" in Path("t.md").read_text()
    assert [json.loads(line)["model"] for line in Path("r.jsonl").read_text().splitlines()] == ["Pop"]
    _, alive = psutil.wait_procs(children, timeout=30)  # the model's process, and multiprocessing's tracker
    assert not alive
