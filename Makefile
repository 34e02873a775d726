# CATER: collect -> arrange -> train -> evaluate -> release.  `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.installed

# Settings passed through to train.py when given, e.g. `make train EPOCHS=5 DATA_DIR=../shared/data`.
PRESET ?=
EPOCHS ?=
DATA_DIR ?=
DATASET ?=
ARGS ?=
TRAIN_FLAGS = $(if $(PRESET),--preset $(PRESET)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
              $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(DATASET),--dataset $(DATASET)) $(ARGS)
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 0
RUN ?=
RUNS ?=
NPROC ?= 2
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?= postgresql+psycopg2://mlflow:mlflow@127.0.0.1:5432/mlflow
MLFLOW_ARTIFACTS ?= s3://mlflow-artifacts

.PHONY: help install predict evaluate check-data train train-ddp smoke test test-all system-packages report compare export sweep serve mlflow-ui mlflow-server bench-train bench-serve bench-folder clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(READY)  ## create .venv and install requirements.txt into it (every target below does this first, when needed)

# The virtual environment is a prerequisite: built on first use, rebuilt when requirements.txt changes.
$(READY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

train: $(READY)  ## train the default (fast) preset, log to MLflow, write models/cnn.pt
	$(PY) train.py $(TRAIN_FLAGS)

train-ddp: $(READY)  ## the same training on NPROC processes (torchrun: gloo on CPU, NCCL on GPUs); --batch-size stays the global batch
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py $(TRAIN_FLAGS)

smoke: $(READY)  ## a few batches through every stage: writes models/smoke.pt (not your models/cnn.pt) and an MLflow run
	$(PY) train.py --smoke $(TRAIN_FLAGS)

test: $(READY)  ## quick tier, 1.5-3.5 min on 2 cores: every test not marked `full` (no database, browser, torchrun, load generator or server)
	$(PY) -m pytest -q -m "not full"

test-all: $(READY) system-packages  ## every test, the `full` tier too (PostgreSQL, S3, chromium, wrk, torchrun, servers), 8-20 min with the install: what CI runs
	$(PY) -m pytest -q

report: $(READY)  ## a run's page in reports/<run>/index.html: curves, confusion matrices, per-class bars, worst mistakes, settings (RUN=id, default: the latest)
	$(PY) report.py $(if $(RUN),--run $(RUN)) $(ARGS)

compare: $(READY)  ## several runs' curves overlaid in one picture: RUNS="<id> <id> ..."
	$(PY) report.py --compare $(RUNS) $(ARGS)

system-packages:  ## the Debian packages the full tier starts for real (PostgreSQL, wrk, chromium): apt-get installs the missing ones (as root)
	@missing=""; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="postgresql"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else echo "the tests need these Debian packages:$$missing. Install them with: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

sweep: $(READY)  ## compare settings: a grid of short runs (lr x widths x augmentation) under one MLflow parent run
	$(PY) sweep.py $(TRAIN_FLAGS)

predict: $(READY)  ## classify every image under DATA_DIR into OUT (predictions.csv) with MODEL (default: what make serve serves)
	$(PY) predict.py $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT)) $(ARGS)

evaluate: $(READY)  ## score MODEL (default: what make serve serves) on DATA_DIR's <class>/ folders (or its test/): a report in OUT (default reports/evaluate-<folder>) and an MLflow run
	$(PY) evaluate.py $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out-dir $(OUT)) $(ARGS)

check-data: $(READY)  ## check DATA_DIR before trusting a score on it: unreadable files, duplicates (within a class, across classes, across train/val/test), small classes, odd sizes; report in OUT (default reports/check-<folder>)
	$(PY) datacheck.py $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out-dir $(OUT)) $(ARGS)

export: $(READY)  ## TorchScript, ONNX and int8 ONNX files next to models/cnn.pt (CHECKPOINT=path for another), with its metadata
	$(PY) export.py $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(ARGS)

serve: $(READY)  ## serve models/cnn.pt on http://$(HOST):$(PORT) in one process per core (WORKERS=N: N; metrics summed across them)
	CATER_HOST=$(HOST) CATER_PORT=$(PORT) CATER_WORKERS=$(WORKERS) $(PY) api.py

mlflow-ui: $(READY)  ## browse runs in the MLflow UI on http://127.0.0.1:$(MLFLOW_PORT)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port $(MLFLOW_PORT)

mlflow-server: $(READY)  ## team tracking server: runs and registry in PostgreSQL (MLFLOW_BACKEND), artifacts in S3 (MLFLOW_ARTIFACTS)
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS) \
		--serve-artifacts --host $(HOST) --port $(MLFLOW_PORT)

bench-train: $(READY)  ## time the presets against the seed baseline on CIFAR-10 (DATA_DIR, default ../shared/data)
	$(PY) benchmarks/train_speed.py --data-dir $(or $(DATA_DIR),../shared/data) $(ARGS)

bench-serve: $(READY)  ## load-test api.py (PyTorch, ONNX Runtime fp32 and int8) against a naive handler, LitServe, BentoML and mlflow models serve, then a 1,024-connection burst
	$(PY) benchmarks/serve_load.py $(ARGS)

bench-folder: $(READY)  ## the defaults on Fashion-MNIST and ELPV, 3 seeds, every run listed (ARGS="--flagsets default,oversample" for more); peak RSS at 10k x 224px
	$(PY) benchmarks/folder_bench.py $(ARGS)

clean:  ## remove MLflow runs and checkpoints (keeps data and .venv)
	rm -rf mlflow.db mlruns models/*.pt models/*.onnx
