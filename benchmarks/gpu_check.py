"""Every method on one GPU, in bf16 and in 4-bit QLoRA: the CUDA paths work, and how fast (run it first on a GPU).

    python benchmarks/gpu_check.py                   # meant for < 8 min on one GPU (never run on one yet)
    python benchmarks/gpu_check.py --methods=SemConv --variants=bf16
    python benchmarks/gpu_check.py --allow_cpu       # the same script on the CPU (a smoke test of the script itself)

Each run is one short epoch of a method's cpu preset on ml-100k (trimmed further: a seeded sample of users or rows
is scored), with the bundled SmolLM2-135M, and with a 0.5B-class model when one is in the local Hugging Face cache.
It prints, per run, training tokens/s, evaluation users (or rows)/s, peak GPU memory and the test metrics, writes
them to a markdown report and a JSON Lines file, and fails (exit 1) on any error, such as a tensor on the wrong
device or a dtype mismatch, or when a run did not use the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)
import torch
from recbole_llm.quick_start import append_results, git_commit, run_recbole_llm

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402

# one short epoch of each cpu preset, scored on a sample: minutes on a GPU in all
METHODS = {
    "CALRec": {"stage1_steps": 20, "train_max_samples": 512, "num_samples": 2, "eval_max_users": 200},
    "SemConv": {"semconv_cf_epochs": 10, "eval_max_users": 200},
    "RALLRec": {"eval_max_interactions": 300},
    "ILM": {"eval_max_users": 200},
}
VARIANTS = {"bf16": {"llm_dtype": "bf16"}, "4bit": {"llm_dtype": "bf16", "llm_quantization": "4bit"}}


def half_billion_backbone() -> str | None:
    """A ~0.5B causal LM already in the local Hugging Face cache (no download), e.g. Qwen2.5-0.5B-Instruct."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except Exception:  # no cache folder yet
        return None
    return next((repo for repo in repos if "0.5b" in repo.lower() or "500m" in repo.lower()), None)


def runs(methods, variants) -> list[tuple[str, str, dict]]:
    chosen = [(f"{m} {v}", m, {**METHODS[m], **VARIANTS[v]}) for m in methods for v in variants]
    larger = half_billion_backbone()
    if larger:
        chosen += [(f"{m} bf16 {larger}", m, {**METHODS[m], **VARIANTS["bf16"], "llm_path": larger}) for m in methods]
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU when there is no GPU")
    parser.add_argument("--out", default="saved/benchmarks/gpu-check.md")
    parser.add_argument("--results", default="saved/benchmarks/gpu-check.jsonl")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); --allow_cpu runs the script on the CPU",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    rows, failures = [], []
    for label, model, settings in runs(args.methods.split(","), args.variants.split(",")):
        settings = {**settings, "epochs": 1, "eval_step": 0, "preset": "cpu", "gpu_id": "0" if cuda else "",
                    "show_progress": False, "state": "WARNING"}
        if not cuda:
            settings.update(llm_dtype="fp32", llm_quantization="none")
        print(f"=== {label}", flush=True)
        start = time.perf_counter()
        try:
            record = run_recbole_llm(model, "ml-100k", config_dict=settings)
            if cuda and (not record["device"].startswith("cuda") or not record["peak_gpu_mib"]):
                raise RuntimeError(f"{label} ran on {record['device']} without using the GPU")
        except Exception:  # noqa: BLE001  (every failure is reported, then the script fails)
            failures.append(label)
            traceback.print_exc()
            rows.append(f"| {label} | FAILED | | | | {time.perf_counter() - start:.0f} |")
            continue
        record["model"] = label
        append_results(args.results, record)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in record["test_result"].items())
        rows.append(f"| {label} | {record['train_tokens_per_second']} | "
                    f"{record['test_rows'] / max(record['eval_seconds'], 1e-9):.1f} | {record['peak_gpu_mib']} | "
                    f"{metrics} | {record['train_seconds'] + record['eval_seconds']:.0f} |")
        print(rows[-1], flush=True)
    report = (f"GPU check ({device})\n\n- command: `python benchmarks/gpu_check.py {' '.join(argv or sys.argv[1:])}`\n"
              f"- commit: {git_commit()}\n- machine: {machine()}, {device}\n\n"
              "| run | train tokens/s | eval users (rows)/s | peak GPU MiB | test metrics | seconds |\n"
              "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        print(json.dumps({"failed": failures}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
