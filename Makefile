# Two commands on a fresh machine:  `make repro`  and  `make test`  (both set up .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# dvc stage commands call `python`: run them with the venv first on PATH
export PATH := $(abspath $(BIN)):$(PATH)
WORKERS ?= 1
# one pytest-xdist worker per core, each pinned to its core; files sharing a session build stay
# on one worker, and the groups holding slow tests start first (tests/conftest.py)
PYTEST_ARGS ?= -n auto

.PHONY: setup repro test test-fast lint format dag docs compare review plots-page ablations seeds scoreboard serve remote \
	register promote models

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# triton (pulled in by the torch wheel) is useless on CPU and its LLVM segfaults beside TensorFlow
	$(BIN)/python -m pip uninstall -y -q triton || true
	touch $@

repro: setup  ## set up and run the whole pipeline on the default (synthetic) data
	$(BIN)/dvc repro

test: setup  ## set up and run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

dag: setup
	$(BIN)/dvc dag

docs: setup  ## regenerate docs/experiments.md, docs/params.md and the tables of docs/recipes.md and docs/reproducibility.md
	$(BIN)/python -m stages.docs --write

COMPARE_ARGS ?=
compare: setup  ## the experiments table: what defines each row, its test figures (dvc exp show --json)
	$(BIN)/python -m stages.compare $(COMPARE_ARGS)

plots-page: setup  ## rebuild .dvc/plots/offline.html (offline `dvc plots show` page) from the pinned npm packages
	$(BIN)/python -m stages.tools.plots_template --install

# make remote: DVC remote from env (CXR_REMOTE_URL, CXR_S3_ENDPOINT, AWS_*, CXR_SSH_KEY ...);
# URL/endpoint -> .dvc/config, credentials -> .dvc/config.local only. REMOTE_ARGS=--local for a personal remote.
REMOTE_ARGS ?=
remote: setup  ## configure the team's DVC remote from environment variables
	$(BIN)/python -m stages.remote setup $(REMOTE_ARGS)

# --- the model registry (owner: stages/tools/registry.py; docs/registry.md) -------------------
# make register NAME=classifier [VERSION=v1.2.0 | BUMP=minor]: a GTO tag on HEAD (refused when
# the pipeline is stale); make promote NAME=classifier VERSION=v1.2.0 STAGE=prod; make models.
# PUSH=1 pushes the tag to origin. Serve a version: make serve MODEL=classifier@prod.
NAME ?=
VERSION ?=
BUMP ?=
STAGE ?=
PUSH ?=
register: setup  ## register a model version (git tag): NAME=classifier [VERSION=v1.2.0|BUMP=minor]
	$(if $(NAME),,$(error NAME=<model> is required, e.g. make register NAME=classifier))
	$(BIN)/python -m stages.registry register $(NAME) $(if $(VERSION),--version $(VERSION),) $(if $(BUMP),--bump $(BUMP),) $(if $(PUSH),--push,)

promote: setup  ## put a model version in a stage: NAME=classifier VERSION=v1.2.0 STAGE=prod
	$(if $(and $(NAME),$(VERSION),$(STAGE)),,$(error NAME=, VERSION= and STAGE= are required))
	$(BIN)/python -m stages.registry promote $(NAME) $(VERSION) --stage $(STAGE) $(if $(PUSH),--push,)

models: setup  ## the model registry: each model's latest version, stages, commit, metrics
	$(BIN)/python -m stages.registry show

HOST ?= 127.0.0.1
PORT ?= 7860
MAX_UPLOAD_MB ?= 50
MODEL ?=
serve: setup  ## the web page: the current pipeline's models, or MODEL=classifier@prod (registry)
	$(BIN)/python -m stages.serve --host $(HOST) --port $(PORT) --max-upload-mb $(MAX_UPLOAD_MB) $(foreach m,$(MODEL),--model $(m))

# --- make ablations (owner: stages/tools/ablations.py) ---------------------------------------
# WORKERS (defined above, default 1) = parallel DVC queue workers; DATA_ROOT = folder holding
# kermany224/ (made absolute by the queue step: queued runs execute in a temporary copy).
# ABLATIONS_ARGS: extra queue options, e.g. --replace (run all seven again) or
# --set train_classifier.epochs=5 (applied to every row). The code must be committed first.
DATA_ROOT ?= ../shared/data
ABLATIONS_TIMEOUT ?= 86400
ABLATIONS_ARGS ?=

ablations: setup  ## seed 002's seven ablation rows via the DVC queue -> reports/ablations.md
	$(BIN)/python -m stages.ablations queue --data-root $(DATA_ROOT) $(ABLATIONS_ARGS)
	$(BIN)/python -m stages.ablations run --workers $(WORKERS) --timeout $(ABLATIONS_TIMEOUT)
	$(BIN)/python -m stages.ablations report --out reports/ablations.md

# --- make seeds / make scoreboard (owners: stages/tools/repeat.py, stages/tools/scoreboard.py) ---
# EXP = a named experiment; SEEDS = training seeds; ENSEMBLE=1 scores the seeds' mean as one model;
# a variant of the recipe: SET="key=value ..." TAG=name (runs <EXP>-<TAG>-seedN, report <EXP>-<TAG>.md).
EXP ?= ours-kermany-best
SEEDS ?= 1 2 3
ENSEMBLE ?=
SET ?=
TAG ?=
seeds: setup  ## one recipe over several training seeds (DVC queue) -> reports/repeats/$(EXP).md
	$(BIN)/python -m stages.repeat $(EXP) --seeds $(SEEDS) --data-root $(DATA_ROOT) $(if $(ENSEMBLE),--ensemble,) $(foreach s,$(SET),--set $(s)) $(if $(TAG),--tag $(TAG),)

scoreboard: setup  ## every seed system on the real data (113 min on 2 cores) -> reports/seeds.md
	$(BIN)/python -m stages.scoreboard --data-root $(DATA_ROOT)


# --- make review (owner: stages/tools/review.py) -----------------------------------------------
# A = baseline, B = candidate: a commit, branch, tag or DVC experiment name. Reads committed
# outputs with `git show` only (no DVC cache, no network); docs/review.md explains the report.
A ?= HEAD
B ?=
review: setup  ## A vs B -> reports/review/<A>_vs_<B>.md (PR comment) and .html (offline page)
	$(if $(B),,$(error give the candidate: make review A=<rev|exp> B=<rev|exp>))
	$(BIN)/python -m stages.review '$(A)' '$(B)'
