"""A comparison runs each model in a fresh process: results and errors come back as they were, a dead child is
named, Ctrl-C ends the child, and a model's measured peak no longer holds what the process held before it."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from recbole_llm import fresh_process
from recbole_llm.errors import InputFileError
from recbole_llm.fresh_process import call_in_fresh_process
from recbole_llm.quick_start import compare_models


def whoami(payload: dict) -> dict:
    return {"pid": os.getpid(), "payload": payload}


def bad_file(path: str):
    raise InputFileError(f"{path} is damaged: download it again")


def bug():
    return {}["missing"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_after_writing_pid(path: str):
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def test_the_call_runs_in_another_process_and_its_result_comes_back():
    result = call_in_fresh_process(whoami, {"scores": [0.5, 0.25], "model": "SASRec"})
    assert result["pid"] != os.getpid()
    assert result["payload"] == {"scores": [0.5, 0.25], "model": "SASRec"}


def test_a_usage_error_in_the_child_is_raised_as_it_was():
    with pytest.raises(InputFileError, match=r"^ml\.inter is damaged: download it again$") as caught:
        call_in_fresh_process(bad_file, "ml.inter")
    assert not getattr(caught.value, "__notes__", None)  # the user's one-line message, nothing more


def test_a_bug_in_the_child_keeps_its_type_and_the_childs_traceback():
    with pytest.raises(KeyError) as caught:
        call_in_fresh_process(bug)
    note = "\n".join(caught.value.__notes__)
    assert "raised in the child process that ran bug" in note and 'return {}["missing"]' in note


def test_a_child_killed_before_it_returned_is_named_with_its_signal():
    with pytest.raises(RuntimeError, match="killed by SIGKILL .*out-of-memory"):
        call_in_fresh_process(die)


def test_ctrl_c_in_the_parent_ends_the_child(tmp_path, monkeypatch):
    monkeypatch.setattr(fresh_process, "STOP_GRACE_SECONDS", 0.5)
    pid_file = tmp_path / "child.pid"

    def interrupt_once_the_child_runs():
        while not pid_file.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_child_runs, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        call_in_fresh_process(sleep_after_writing_pid, str(pid_file))
    assert time.monotonic() - start < 60  # not the child's 120 s sleep
    assert not psutil.pid_exists(int(pid_file.read_text()))


PARENT = """
import sys
sys.path.insert(0, sys.argv[2])
from test_fresh_process import sleep_after_writing_pid
from recbole_llm.fresh_process import call_in_fresh_process
call_in_fresh_process(sleep_after_writing_pid, sys.argv[1])
"""


def test_a_child_does_not_outlive_a_parent_killed_outright(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file), str(Path(__file__).parent)])
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    assert pid_file.exists(), "the child never started"
    child = psutil.Process(int(pid_file.read_text()))
    parent.kill()  # SIGKILL: no cleanup runs in the parent
    parent.wait()
    try:
        child.wait(timeout=30)  # psutil.TimeoutExpired while it runs on
    finally:
        if child.is_running():
            child.kill()


def test_each_model_of_a_comparison_measures_its_own_peak_not_what_the_process_held_before(base_config):
    process = psutil.Process()
    # 1.6 GiB of 64 KiB tensors held by this process while the comparison runs (as an LLM method's leftovers were)
    held = [torch.ones(2**14) for _ in range(25600)]
    gc.collect()
    resident = process.memory_info().rss / 2**20
    records = compare_models(["Pop", "BPR"], "ml-tiny", config_dict={**base_config, "epochs": 1})
    for record in records:
        assert 0 < record["peak_rss_mib"] < resident - 1200, (record["model"], record["peak_rss_mib"], resident)
    # a single model stays in this process (nothing to isolate it from): its peak holds what this process holds
    alone = compare_models(["Pop"], "ml-tiny", config_dict=base_config)[0]
    assert alone["peak_rss_mib"] > resident - 100
    del held
