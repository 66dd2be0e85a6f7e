# mtdiff: `make run` sets everything up and runs the pipeline on the default profile;
# `make test` sets up and runs the test suite. Both are safe to re-run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtdiff-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# A FMNIST_DIR given to make (`make run FMNIST_DIR=...`, or from the environment) reaches the stages:
# mtdiff/config.py reads $MTDIFF_FMNIST_DIR over data.fashion_mnist_dir. Not exported for the default,
# so a data.fashion_mnist_dir set in params.yaml still applies.
ifneq ($(origin FMNIST_DIR),file)
export MTDIFF_FMNIST_DIR := $(FMNIST_DIR)
endif

# Telemetry off; Prefect, MLflow and DVC state stay inside the repo, nothing lands in $HOME.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export GIT_PYTHON_REFRESH := quiet
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install data-package run test test-fast bench gpu-smoke sweep settings serve screenshots clean

install: $(STAMP)

# torch first and pinned: these wheels lie on this machine's disk (a plain `torch` pulls several GB).
$(STAMP): pyproject.toml flows/__init__.py mtdiff/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'   # the package + its test extra (pytest)
	touch $@

# Debian's real Fashion-MNIST, the embedded default data set.
data-package:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The pipeline, then `dvc push` to the default DVC remote (.dvc/config): a failed push only warns.
run: install data-package
	$(PY) -m flows.pipeline
	@$(VENV)/bin/dvc push \
	  && echo "dvc push: outputs stored in the default DVC remote ($$($(VENV)/bin/dvc remote list | grep '(default)' | awk '{print $$2}'))" \
	  || echo "warning: dvc push to the default DVC remote failed; the run's outputs stay in this checkout only (retry with: dvc push)"

# The tests build a small Fashion-MNIST look-alike when the package is missing (tests/fixtures/fmnist_idx.py),
# so a failed apt install only costs realism, never a skip.
test: install
	-@$(MAKE) --no-print-directory data-package || echo "note: dataset-fashion-mnist not installed; the tests use their generated IDX fixture"
	$(PY) -m pytest -q -p no:cacheprovider tests

# The suite minus the tests marked `slow` (the longest end-to-end runs: sweeps through Prefect and
# DVC, the ImageNet rehearsal, ...); `make test` (and CI) runs them all.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

sweep: install data-package
	$(PY) -m flows.sweep configs/sweeps/tasks.yaml

# The four settings, each alone and with the label, at equal steps (docs/settings.md)
settings: install data-package
	$(PY) -m flows.sweep configs/sweeps/settings.yaml

serve: install
	$(PY) -m flows.serve

# The README's screenshots (docs/*.png) from mlflow.db and .prefect/ in headless Chromium (Debian's
# package, installed here when missing; the script itself installs nothing). Not needed by `make test`.
screenshots: install
	@if ! command -v chromium >/dev/null; then \
	  echo "installing Debian package chromium"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	fi
	scripts/screenshots.sh

bench: install
	$(VENV)/bin/mtdiff bench train --quick

# On a GPU machine, first: the ImageNet-256 profile at real size for a few hundred steps, every
# stage's throughput and the projected cost of the profile's budget (docs/scale.md).
gpu-smoke: install
	$(VENV)/bin/mtdiff bench smoke --device cuda

# The run's untracked outputs and local stores. The committed results (metrics/, sweeps/) stay:
# `git checkout -- metrics` puts back what a run changed there.
clean:
	rm -rf data checkpoints samples plots .prefect mlflow.db mlartifacts .mtdiff
