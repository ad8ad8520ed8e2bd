# prefmill: `make demo` installs and runs the whole graph on the embedded default profile (world); `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DAGSTER := $(VENV)/bin/dagster
# CPU machines: the local CPU build of torch (pip finds it through the machine's pip configuration); anything looser
# pulls multi-GB CUDA wheels. On a GPU machine: make TORCH_SPEC='torch==2.13.0' EXTRAS=dev,gpu
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
PARTITIONED := prompt_batches,candidate_images,reward_labels,preference_pairs
UNPARTITIONED := sft_corpus,preference_corpus,rl_prompt_pool,sft_run,dpo_run,grpo_run,sft_eval,dpo_eval,grpo_eval

.PHONY: install zoo demo prove test test-fast dev clean system-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

zoo: install
	$(PY) -m pipelines.zoo

# Dagster's CLI prints every event at DEBUG: the full output goes to $(DEMO_LOG), the terminal gets one line per
# finished step, progress bars and the summary (pipelines/progress.py).
DEMO_LOG ?= data/demo.log
demo: install zoo $(DAGSTER_HOME)/dagster.yaml
	@mkdir -p $(dir $(DEMO_LOG)) && : > $(DEMO_LOG) && echo "== full log: $(DEMO_LOG)"
	@$(PY) -m pipelines.cli seed-inbox >> $(DEMO_LOG)
	@for key in $$($(PY) -m pipelines.cli register 2>> $(DEMO_LOG)); do \
	  echo "== partition $$key: candidates, labels, pairs"; \
	  $(DAGSTER) asset materialize -m pipelines.definitions --select "$(PARTITIONED)" --partition "$$key" 2>&1 \
	    | $(PY) -m pipelines.progress $(DEMO_LOG); \
	done
	@echo "== corpora, training runs and evals"
	@$(DAGSTER) asset materialize -m pipelines.definitions --select "$(UNPARTITIONED)" 2>&1 | $(PY) -m pipelines.progress $(DEMO_LOG)
	@$(PY) -m pipelines.cli summary

# The proving ground (README "Proving ground"): the whole graph on the proving profile in its own data root and
# Dagster home, then every recipe and control graded by the verifier on held-out prompts; the last line is `prove:`.
PROVE_DATA ?= $(CURDIR)/data/prove
PROVE_HOME ?= $(CURDIR)/.dagster_home_prove
PROVE_PROMPTS ?= 160
PROVE_PROFILE ?= proving
PROVE_ENV := PREFMILL_PROFILE=$(PROVE_PROFILE) PREFMILL_DATA=$(PROVE_DATA) DAGSTER_HOME=$(PROVE_HOME)
PROVE_RUNS := sft_run,dpo_run,grpo_run,grpo_base_run,dpo_shuffled_run,grpo_verifier_run
prove: install zoo
	@# two 1-thread trainers at a time on the CPU (the gpu pool's limit is 1 elsewhere: one job per GPU)
	@mkdir -p $(PROVE_HOME) && sed 's/default_limit: 1/default_limit: 2/' dagster.yaml > $(PROVE_HOME)/dagster.yaml
	@mkdir -p $(PROVE_DATA) && : > $(PROVE_DATA)/prove.log && echo "== full log: $(PROVE_DATA)/prove.log"
	$(PROVE_ENV) $(PY) -m pipelines.proving_world $(PROVE_DATA)/inbox/proving 0 $(PROVE_PROMPTS) --tasks t2i --max-objects 1 --size 48
	@for key in $$($(PROVE_ENV) $(PY) -m pipelines.cli register); do \
	  echo "== partition $$key: candidates, labels, pairs"; \
	  $(PROVE_ENV) $(DAGSTER) asset materialize -m pipelines.definitions --select "$(PARTITIONED)" --partition "$$key" \
	    2>&1 | $(PY) -m pipelines.progress $(PROVE_DATA)/prove.log; \
	done
	@echo "== corpora and the RL prompt pool"
	@$(PROVE_ENV) $(DAGSTER) asset materialize -m pipelines.definitions \
	  --select "sft_corpus,preference_corpus,rl_prompt_pool" 2>&1 | $(PY) -m pipelines.progress $(PROVE_DATA)/prove.log
	@# a run of its own, so all six runs wait together and start by priority: SFT -> GRPO (the longest chain)
	@# first, GRPO before DPO (assets/training.py)
	@echo "== six training runs (two at a time), the report"
	@$(PROVE_ENV) $(DAGSTER) asset materialize -m pipelines.definitions --select "$(PROVE_RUNS),proving_report" \
	  2>&1 | $(PY) -m pipelines.progress $(PROVE_DATA)/prove.log
	@cat $(PROVE_DATA)/proving_report/report.md

# Debian packages the tests drive for real: a PostgreSQL server (Dagster's Postgres storage, started by the test
# itself on loopback in a temporary directory) and headless Chromium (the Playwright UI test). Installed only where
# missing; skipped with a note where apt cannot run (the tests that need them then skip and say why).
SYSTEM_PACKAGES := postgresql chromium
system-deps:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "== installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "== cannot install$$missing (needs root and apt-get); the tests that need them will skip"; fi; \
	fi

# Test modules run in TEST_WORKERS processes (pytest-xdist), each module whole in one worker so its module-scoped
# fixtures are built once; most tests use one torch thread, so two workers fill a 2-core machine.
TEST_WORKERS ?= 2
test: install zoo system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

dev: install zoo $(DAGSTER_HOME)/dagster.yaml
	$(DAGSTER) dev -m pipelines.definitions -h 127.0.0.1 -p 3000

clean:
	rm -rf data .dagster_home
