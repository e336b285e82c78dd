# vlforge: every target sets up .venv by itself on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format bench experiment retrieval-env model-env-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (vlforge needs Python 3.11); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/pip || $(PYTHON) -m venv --clear $(VENV)  # a venv cut short before pip: made anew
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build; letting a resolver pick torch pulls CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# img2dataset pulls the Python 3.6 'dataclasses' backport; it shadows the stdlib module (without slots=)
	# wherever site-packages is put first on sys.path, e.g. Prefect's ephemeral API server.
	$(BIN)/python -m pip uninstall -q -y dataclasses
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlforge demo

# The clip-retrieval interop test needs its environment (~70 s and 2 GB the first time, a no-op after).
test: $(STAMP) retrieval-env
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not gpu" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not gpu and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	@mkdir -p bench/results
	@for b in bench/ingest.py bench/netguard.py bench/curate.py bench/train.py bench/scale.py bench/vlm.py bench/recaption.py; do \
	  if [ -f $$b ]; then echo "== $$b"; $(BIN)/python $$b || exit 1; fi; done

# Does curation pay? Unfiltered vs CLIP-filtered arms of a noisy labelled pool at equal samples seen (~15 min on 2 cores).
experiment: $(STAMP)
	@mkdir -p bench/results
	$(BIN)/python bench/curation_experiment.py

# A saved CLIP and VLM predict in a fresh virtualenv built from their requirements.txt alone (installs torch,
# transformers, mlflow: minutes and ~1.5 GB; not part of `make test`).
model-env-check: $(STAMP)
	$(BIN)/python tests/e2e/model_env_check.py

# clip-retrieval pins numpy<2 and pyarrow<16: it gets its own environment (see infra/retrieval/README.md).
retrieval-env:
	$(MAKE) -C infra/retrieval venv

clean:
	rm -rf .vlforge mlruns bench/results .pytest_cache
