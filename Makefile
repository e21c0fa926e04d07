# inception-pipeline: `make demo` (install, start local Ray + MLflow, run the pipeline on Fashion-MNIST)
# and `make test`. Every variable below can be overridden: `make up MLFLOW_PORT=5050`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
RUN_DIR ?= .run
RAY_PORT ?= 6379
RAY_DASHBOARD_PORT ?= 8265
RAY_CLIENT_PORT ?= 10001
RAY_AGENT_PORT ?= 52365
RAY_NUM_CPUS ?=
MLFLOW_PORT ?= 5000
# `make serve`: the registered ensemble over HTTP (`mlflow models serve`), beside MLflow's own port.
SERVE_PORT ?= 5001
SERVE_MODEL ?= models:/googlenet-ensemble@latest-complete
# `make docs-serve`: the docs site, live-reloaded, on 127.0.0.1.
DOCS_PORT ?= 8000
FMNIST_ROOT ?= /usr/share/datasets/fashion-mnist
SHARDS_DIR ?= $(abspath $(RUN_DIR))/shards
PYTEST_ARGS ?=
# `make test` and `make test-quick` run this many test files at a time (pytest-xdist; each file's tests in
# one process, the longest files first; 0: all in one process). The end-to-end tests keep two cores busy on
# their own: use 2 on a machine with 4 cores or more.
TEST_WORKERS ?= 0
CHAOS_ARGS ?=
RECIPE ?= demo
EVAL_LIMIT ?= 3000
EVAL_WORKERS ?= auto
# The demo's time budget for training and evaluation, in minutes: the training is sized to DEMO_TRAIN_SHARE
# percent of it (a warm-up measures this machine), the evaluation to what is left when training ends (at
# least 2,000 images). Empty: the recipe and EVAL_LIMIT as written. Unset, it is 20 for RECIPE=demo and 36 for
# RECIPE=scenes: another recipe (fashion-mnist-full) runs as written unless DEMO_MINUTES is given.
# RECIPE=scenes's own defaults (below) key on this
SCENES := $(filter scenes,$(RECIPE))
ifeq ($(origin DEMO_MINUTES),undefined)
DEMO_MINUTES := $(if $(filter demo,$(RECIPE)),20,$(if $(SCENES),36))
endif
# The dataset the demo shards and trains on (SHARDS_DIR/DEMO_DATASET): RECIPE=scenes trains on fashion-mnist-scenes
# (each Fashion-MNIST garment drawn into a 96 px scene at a random scale, aspect and position), the other
# recipes on fashion-mnist.
DEMO_DATASET ?= $(if $(SCENES),fashion-mnist-scenes,fashion-mnist)
# ensemble.gpus_per_worker for `make demo` (empty: the recipe's). A recipe that asks for a GPU share
# (fashion-mnist-full) is refused before any work on a local Ray cluster without a GPU; GPUS_PER_WORKER=0
# trains it on the CPUs.
GPUS_PER_WORKER ?=
# scenes: 70 (at 48 px an image costs ~2x the demo's to train and to score at 144 crops x 7 models, and the
# evaluation needs 2,000)
DEMO_TRAIN_SHARE ?= $(if $(SCENES),70,75)
DEMO_DEADLINE := $(RUN_DIR)/demo-deadline
# The image every cluster config runs (ray_cluster.yaml, infra/kuberay/*.yaml): written once, in infra/IMAGE.
# `make set-image IMAGE=<registry>/<name>:<tag>` rewrites it there and in every config; `make image` builds it.
IMAGE ?= $(shell cat infra/IMAGE)
# The offline GPU kit (`make gpu-kit`): the wheels for the GPU machine's Python and CUDA major version, in
# parts of at most GPU_KIT_PART_MIB MiB (benchmarks/gpu/README.md).
GPU_PYTHON ?= 3.12
GPU_CUDA ?= 13
GPU_KIT ?= gpu-kit
GPU_KIT_PART_MIB ?= 1900
GPU_KIT_ARGS ?=
IMAGE_FILES := ray_cluster.yaml infra/docker/Dockerfile $(wildcard infra/kuberay/*.yaml)
# KubeRay's RayJob CRD that tests/test_kuberay_schema.py validates infra/kuberay/ against: `make kuberay-crd`
# downloads this release's file and checks its sha256 (change both together). The tests read
# KUBERAY_RAYJOB_CRD, or the download when that is unset.
KUBERAY_VERSION ?= v1.7.0
KUBERAY_RAYJOB_CRD_SHA256 ?= 01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5
KUBERAY_CRD_DIR ?= $(RUN_DIR)/kuberay-crds
KUBERAY_RAYJOB_CRD ?= $(if $(wildcard $(KUBERAY_CRD_DIR)/ray.io_rayjobs.yaml),$(abspath $(KUBERAY_CRD_DIR)/ray.io_rayjobs.yaml))
export KUBERAY_RAYJOB_CRD

BIN := $(abspath $(VENV))/bin
SERVICES := VENV=$(VENV) RUN_DIR=$(RUN_DIR) RAY_PORT=$(RAY_PORT) RAY_DASHBOARD_PORT=$(RAY_DASHBOARD_PORT) \
	RAY_CLIENT_PORT=$(RAY_CLIENT_PORT) RAY_AGENT_PORT=$(RAY_AGENT_PORT) RAY_NUM_CPUS=$(RAY_NUM_CPUS) \
	MLFLOW_PORT=$(MLFLOW_PORT) infra/local/services.sh
# Each stage is a Ray job whose logs are followed here; Ctrl-C stops the job itself (scripts/ray_job.sh), and
# the same make command resumes it.
JOB_SUBMIT := RAY_JOB_ID_PREFIX=demo scripts/ray_job.sh $(BIN)/ray http://127.0.0.1:$(RAY_DASHBOARD_PORT) --working-dir .

.PHONY: help env install data up down status demo demo-check shard-demo train-demo evaluate-demo serve test test-quick lint bench chaos clean kuberay-crd image set-image gpu-kit docs docs-serve

help:
	@echo "make demo     install, start local Ray + MLflow, run the pipeline on Fashion-MNIST"
	@echo "make demo RECIPE=scenes  the same on Fashion-MNIST garments drawn into larger scenes (Table 3 on both axes)"
	@echo "make test     install and run the test suite (real Ray, MLflow and DALI; CPU only)"
	@echo "make install  make env and make data;  make env  create $(VENV) and install the project"
	@echo "make data     install Fashion-MNIST (the demo's data) if missing: apt, as root"
	@echo "make up/down/status  local Ray head (127.0.0.1:$(RAY_PORT), dashboard $(RAY_DASHBOARD_PORT)) and MLflow"
	@echo "              (127.0.0.1:$(MLFLOW_PORT)); make up needs no dataset"
	@echo "make serve    serve $(SERVE_MODEL) over HTTP on 127.0.0.1:$(SERVE_PORT) (mlflow models serve)"
	@echo "make docs     regenerate docs/reference/{cli,config}.md and build the docs site (strict) in $(RUN_DIR)/site"
	@echo "make docs-serve  the docs site on http://127.0.0.1:$(DOCS_PORT), rebuilt as pages change"
	@echo "make lint     ruff;  make bench  print the benchmarks' figures;  make clean  remove $(RUN_DIR)"
	@echo "make chaos    train a short ensemble while SIGKILLing random workers; print what survived"
	@echo "              (CHAOS_ARGS=\"--node-kills 2 --tracking-outage 60\": also lose whole nodes, stop MLflow)"
	@echo "make image    docker build the cluster image $(IMAGE);  make set-image IMAGE=...  use another tag in every config"
	@echo "make gpu-kit  the offline GPU kit for Python $(GPU_PYTHON) / CUDA $(GPU_CUDA) in $(GPU_KIT)/ (benchmarks/gpu/README.md)"
	@echo "make kuberay-crd  download KubeRay $(KUBERAY_VERSION)'s RayJob CRD (sha256-checked) for tests/test_kuberay_schema.py"

env: $(VENV)/.installed

install: env data

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 is required, $(PYTHON) is " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

data:
	@scripts/ensure_fashion_mnist.sh $(FMNIST_ROOT)

up: env
	@$(SERVICES) up

down:
	@$(SERVICES) down

status:
	@$(SERVICES) status

shard-demo: up data
	$(JOB_SUBMIT) -- python jobs/shard_dataset.py --source $(DEMO_DATASET) --root $(FMNIST_ROOT) --out $(SHARDS_DIR) \
		--mlflow-uri http://127.0.0.1:$(MLFLOW_PORT)

# Before any work: a recipe's GPU share on a cluster without GPUs is refused here, naming the fix.
demo-check: up
	@RAY_ADDRESS=127.0.0.1:$(RAY_PORT) $(BIN)/python scripts/demo_check.py --recipe $(RECIPE) \
		$(if $(strip $(GPUS_PER_WORKER)),--gpus-per-worker $(GPUS_PER_WORKER))

train-demo: demo-check shard-demo
ifneq ($(strip $(DEMO_MINUTES)),)
	@train=$$(awk 'BEGIN { printf "%g", $(DEMO_MINUTES) * $(DEMO_TRAIN_SHARE) / 100 }'); \
	echo "Demo budget: $(DEMO_MINUTES) min for training and evaluation (DEMO_MINUTES): training sized to $$train min"; \
	echo "on this machine, evaluation to what is left (a larger DEMO_MINUTES for more; empty: no budget)"; \
	awk -v n=$$(date +%s) 'BEGIN { printf "%d\n", n + $(DEMO_MINUTES) * 60 }' > $(DEMO_DEADLINE)
endif
	$(JOB_SUBMIT) -- python jobs/train_ensemble.py --recipe $(RECIPE) \
		--set data.shards=$(SHARDS_DIR)/$(DEMO_DATASET) --set ensemble.storage_path=$(abspath $(RUN_DIR))/ray_results \
		$(if $(strip $(DEMO_MINUTES)),--budget-minutes $$(awk 'BEGIN { printf "%g", $(DEMO_MINUTES) * $(DEMO_TRAIN_SHARE) / 100 }')) \
		$(if $(strip $(GPUS_PER_WORKER)),--gpus-per-worker $(GPUS_PER_WORKER)) \
		--mlflow-uri http://127.0.0.1:$(MLFLOW_PORT)

evaluate-demo: train-demo
	$(JOB_SUBMIT) -- python jobs/evaluate_ensemble.py --ensemble-run ensemble-$(RECIPE) --limit $(EVAL_LIMIT) \
		$(if $(strip $(DEMO_MINUTES)),--budget-minutes $$(awk -v d=$$(cat $(DEMO_DEADLINE) 2>/dev/null) -v n=$$(date +%s) \
			'BEGIN { m = d ? (d - n) / 60 : $(DEMO_MINUTES) * (100 - $(DEMO_TRAIN_SHARE)) / 100; printf "%.2f", (m < 1 ? 1 : m) }')) \
		--workers $(EVAL_WORKERS) --mlflow-uri http://127.0.0.1:$(MLFLOW_PORT)

demo: data evaluate-demo
	@echo
	@echo "Demo done: shards in $(SHARDS_DIR)/$(DEMO_DATASET)/{train,val}; the $(RECIPE) ensemble and its Table 3"
	@echo "(evaluation run URL above) are in MLflow: http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "Ray dashboard: http://127.0.0.1:$(RAY_DASHBOARD_PORT). Stop the services with 'make down'."

serve: env
	@[ "$(SERVE_PORT)" != "$(MLFLOW_PORT)" ] || { echo "error: SERVE_PORT=$(SERVE_PORT) is MLflow's port (MLFLOW_PORT); choose another, e.g. make serve SERVE_PORT=5002" >&2; exit 2; }
	PATH=$(BIN):$$PATH MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/mlflow models serve \
		-m $(SERVE_MODEL) --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-quick: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check pipeline jobs tests benchmarks

chaos: shard-demo
	RAY_ADDRESS=127.0.0.1:$(RAY_PORT) $(BIN)/python benchmarks/chaos.py --shards $(SHARDS_DIR)/fashion-mnist \
		--storage $(abspath $(RUN_DIR))/chaos --mlflow-uri http://127.0.0.1:$(MLFLOW_PORT) $(CHAOS_ARGS)

bench: env
	$(BIN)/python benchmarks/shard_throughput.py
	$(BIN)/python benchmarks/model_throughput.py
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/dali_stages.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/replica_packing.py

image:
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .

set-image:
	@old="$$(cat infra/IMAGE)"; new="$(IMAGE)"; \
	case "$$new" in *:*) ;; *) echo "error: IMAGE=$$new needs a tag (<registry>/<name>:<tag>)" >&2; exit 2;; esac; \
	for f in $(IMAGE_FILES); do sed -i "s|$$old|$$new|g" "$$f"; done; \
	echo "$$new" > infra/IMAGE; echo "image $$new in infra/IMAGE and $(IMAGE_FILES)"

gpu-kit:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu/prepare.py --python $(GPU_PYTHON) \
		--cuda $(GPU_CUDA) --dest $(GPU_KIT) --part-mib $(GPU_KIT_PART_MIB) $(GPU_KIT_ARGS)

kuberay-crd: $(KUBERAY_CRD_DIR)/ray.io_rayjobs.yaml

$(KUBERAY_CRD_DIR)/ray.io_rayjobs.yaml:
	@mkdir -p $(@D)
	curl -fsSL --retry 3 -o $@.part \
		https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_VERSION)/ray-operator/config/crd/bases/ray.io_rayjobs.yaml
	@echo "$(KUBERAY_RAYJOB_CRD_SHA256)  $@.part" | sha256sum --check --quiet - \
		|| { echo "error: $@.part does not have the pinned sha256 (KUBERAY_RAYJOB_CRD_SHA256)" >&2; rm -f $@.part; exit 1; }
	@mv $@.part $@
	@echo "KubeRay $(KUBERAY_VERSION) RayJob CRD: $@"

docs: env
	$(BIN)/python scripts/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(abspath $(RUN_DIR))/site

docs-serve: env
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

clean: down
	rm -rf $(RUN_DIR)
