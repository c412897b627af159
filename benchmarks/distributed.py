"""One process against several (torchrun, gloo on a CPU): training throughput, evaluation users/s, equal metrics.

    python benchmarks/distributed.py                                   # SemConv and SASRec, 1 vs 2 processes
    python benchmarks/distributed.py --models=ILM,SASRec --processes=1,2 --eval_max_users=100

Each process count runs ``torchrun --nproc_per_node=N run_recbole_llm.py --model=... --preset=cpu`` from empty
checkpoint folders: the same command, only the number of processes differs (the issue's check). The report shows,
per model and process count, training tokens/s (all processes together), evaluation users/s and the test metrics,
and whether they equal the one-process run's (to 1e-6). RecBole's own models train alike on every process; an LLM
model's processes share each optimizer step's batches, with dropout seeded per batch, so its weights equal one
process's up to the order of floating-point sums. On a 2-core CPU this measures correctness and overhead, not
speed-up: N processes share the two cores, and with ``gradient_accumulation_steps`` 1 (the cpu presets) each step
has one batch, so the other processes run a stand-in pass (pass extra flags such as
``--gradient_accumulation_steps=2 --train_batch_size=8`` to let both compute; they change the run for every count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calrec_ml100k import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(processes: int, args, folder: Path) -> list[dict]:
    results = folder / f"records-{processes}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29517",
               str(ROOT / "run_recbole_llm.py"), f"--model={args.models}", f"--dataset={args.dataset}",
               f"--preset={args.preset}", f"--checkpoint_dir={folder / f'saved-{processes}'}",
               f"--results={results}", f"--table={folder / f'table-{processes}.md'}", "--show_progress=False",
               *([f"--eval_max_users={args.eval_max_users}"] if args.eval_max_users else []), *args.extra]
    # each process gets its share of the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    print(f"{processes} process(es): {time.perf_counter() - start:.0f} s", flush=True)
    return [json.loads(line) for line in results.read_text().splitlines()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="SemConv,SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--eval_max_users", type=int, default=None)
    parser.add_argument("--folder", default="saved/benchmarks/distributed")
    parser.add_argument("--out", default="saved/benchmarks/distributed.md")
    args, args.extra = parser.parse_known_args(argv)
    folder = Path(args.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.processes.split(",")]
    records = {n: run(n, args, folder) for n in counts}
    lines = ["| model | processes | train tokens/s | train s | eval users/s | test metrics | equal to 1 process |",
             "|---|---|---|---|---|---|---|"]
    for index, first in enumerate(records[counts[0]]):
        for n in counts:
            record = records[n][index]
            equal = all(abs(record["test_result"][k] - v) <= 1e-6 for k, v in first["test_result"].items())
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in record["test_result"].items())
            users_per_second = record["test_rows"] / max(record["eval_seconds"], 1e-9)
            lines.append(f"| {record['model']} | {n} | {record.get('train_tokens_per_second')} | "
                         f"{record['train_seconds']:.0f} | {users_per_second:.2f} | {metrics} | "
                         f"{'yes' if equal else 'no'} |")
    commit = records[counts[0]][0].get("commit")
    report = (f"1 vs {counts[-1]} processes on {args.dataset} (preset {args.preset})\n\n"
              f"- command: `python benchmarks/distributed.py {' '.join(argv or sys.argv[1:])}`\n"
              f"- commit: {commit}\n- machine: {machine()}\n\n" + "\n".join(lines) + "\n")
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
