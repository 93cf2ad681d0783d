# Thin wrappers. Every target creates .venv and installs the project when needed (once: a stamp
# file records the install, so a second `make test` installs nothing).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# This machine's pip config lists local package folders that do not all exist; hide that noise.
PIP_QUIET := { grep -v "^WARNING: Location 'file:" || true; }

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install postgres-install run serve sweep test ui bench-train bench-inference clean postgres mlflow-server prefect-server

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(PIP_QUIET)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(PIP_QUIET)
	$(BIN)/python -c "import cifar_pipeline, torch, mlflow, prefect, dvc, onnxruntime"
	touch $(STAMP)

run: $(STAMP)  ## the whole pipeline, orchestrated by Prefect (local mode), on embedded defaults
	$(BIN)/python -m pipeline.flow

serve: $(STAMP)  ## the flow as a Prefect deployment; CRON="0 3 * * *" adds a schedule
	$(BIN)/python -m pipeline.flow --serve $(if $(CRON),--cron "$(CRON)")

sweep: $(STAMP)  ## residual vs plain at three depths; ARGS="--epochs 3" etc.
	$(BIN)/python -m pipeline.sweep $(ARGS)

# The scale-out tests start a throwaway PostgreSQL cluster: Debian's package, installed when missing.
postgres-install:
	@compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

test: $(STAMP) postgres-install  ## the full test suite, slow end-to-end tests included
	$(BIN)/python -m pytest

ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --host 127.0.0.1 --port 5000 --workers 1  # one process group that Ctrl-C stops whole

# Shared servers (pipeline/servers.py); each binds to 127.0.0.1 unless HOST is given.
postgres: $(STAMP)  ## a development PostgreSQL for mlflow-server in .servers/postgres, port PGPORT (5432); STOP=1 stops it
	$(BIN)/python -m pipeline.servers postgres $(if $(PGPORT),--port $(PGPORT)) $(if $(STOP),--stop)

mlflow-server: $(STAMP)  ## MLflow tracking server on $$MLFLOW_BACKEND_STORE_URI (PostgreSQL); ARTIFACTS, HOST, PORT (5000)
	$(BIN)/python -m pipeline.servers mlflow $(if $(ARTIFACTS),--artifacts $(ARTIFACTS)) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

prefect-server: $(STAMP)  ## Prefect server (API and UI); HOST, PORT (4200)
	$(BIN)/python -m pipeline.servers prefect $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

bench-train: $(STAMP)  ## project vs seed training loop, images/s; ARGS="ARCHIVE --steps 100"
	$(BIN)/python bench/train_throughput.py $(ARGS)

bench-inference: $(STAMP)
	$(BIN)/python bench/inference.py

clean:  ## remove the venv (outputs are DVC's: `dvc gc`, or delete data/ models/ reports/ by hand)
	rm -rf $(VENV)
