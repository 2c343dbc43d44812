# Quick start: `make fit` trains the tutorial recipe, `make test` runs the test suite. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# The CIFAR-10 training images as JPEG class folders, for machines that cannot download CIFAR-10 (see README).
CIFAR10_JPG ?= ../shared/data/cifar10-train-jpg.tar.gz
# The archive's path as make's own file names need it (wildcard, prerequisites), a space escaped: unescaped, a path
# like "My Drive/cifar.tar.gz" was two names, neither found. Recipes quote "$(CIFAR10_JPG)" instead.
empty :=
CIFAR10_JPG_FILE := $(subst $(empty) $(empty),\ ,$(CIFAR10_JPG))
CIFAR10_JPG_FOUND := $(if $(wildcard $(CIFAR10_JPG_FILE)),$(CIFAR10_JPG_FILE))

.PHONY: help fit test lint bench bench-gpu gpu-bundle bench-resume data clean

# `make` alone lists the targets: it ran the first rule, which made .venv and nothing else, without a word on why.
help:
	@echo "make fit [ARGS=...]           train the tutorial recipe (ARGS: cifar-cli fit's flags)"
	@echo "make test [ARGS=...]          ruff and the test suite (ARGS: pytest's, e.g. \"-n 0 tests/test_cli.py\")"
	@echo "make lint                     ruff check and format check"
	@echo "make data                     unpack the CIFAR-10 JPEG archive (CIFAR10_JPG=$(CIFAR10_JPG))"
	@echo "make bench [ARGS=...]         the benchmarks, one table (ARGS=\"--smoke true\": every part in a minute)"
	@echo "make bench-gpu [ARGS=...]     the GPU check (ARGS=\"--smoke true\": the same steps on the CPU)"
	@echo "make bench-resume [ARGS=...]  kill training at random moments, resume, compare (ARGS=\"--trials 20\")"
	@echo "make gpu-bundle               gather what the GPU check needs offline into bundle/"
	@echo "make clean                    remove .venv, caches and build leftovers (not data/, runs/ or a VENV elsewhere)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependencies change; the stamps remember what was installed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

# Where the JPEG copy is at hand (machines that cannot reach the CIFAR-10 server), as the archive or unpacked
# already, `make fit` trains on it with configs/cifar10-jpg.yaml; elsewhere on CIFAR-10 itself, downloaded on first
# use. `make fit DATA_CONFIG=` forces the download.
ifneq ($(CIFAR10_JPG_FOUND)$(wildcard data/cifar10-jpg/.unpacked),)
DATA_CONFIG ?= --config configs/cifar10-jpg.yaml
endif

fit: $(VENV)/.installed $(if $(DATA_CONFIG),data)
	$(BIN)/cifar-cli fit $(DATA_CONFIG) $(ARGS)

# One pytest worker per core (pytest-xdist), handed tests one by one, except that the DDP tests all go to one worker
# (their xdist_group), so they never run side by side. `make test ARGS="-n 0 tests/test_cli.py"` runs one file in
# this process.
test: $(VENV)/.installed-dev
	$(BIN)/ruff check cifar_cli tests bench
	$(BIN)/pytest -q -n auto --dist loadgroup $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check cifar_cli tests bench
	$(BIN)/ruff format --check cifar_cli tests bench

# The benchmarks (bench/run.py): one table, about 30 minutes on a 2-core CPU. They train on the JPEG copy.
# `make bench ARGS="--smoke true"` checks in a minute that every part runs.
bench: $(VENV)/.installed
	@test -f data/cifar10-jpg/.unpacked || test -f "$(CIFAR10_JPG)" || \
		{ echo "make bench: no CIFAR-10 JPEG archive at '$(CIFAR10_JPG)' and none unpacked in data/cifar10-jpg; set CIFAR10_JPG=path/to/cifar10-train-jpg.tar.gz"; exit 2; }
	$(MAKE) data
	$(BIN)/python -m bench.run $(ARGS)

# The GPU check (bench/gpu.py): configs/fast.yaml 5 times, the tutorial recipe's epoch against the tutorial's code,
# the GPU tests, configs/ddp.yaml; one table and results.json in runs/bench-gpu/. About 5 minutes
# on an H100. `make bench-gpu ARGS="--smoke true"` runs the same steps on the CPU.
bench-gpu: $(VENV)/.installed-dev data
	$(BIN)/python -m bench.gpu $(ARGS)

# For a GPU machine without network whose Python has torch, torchvision, lightning, torchmetrics, rich and pytest:
# `make gpu-bundle` gathers here what else the GPU check needs (jsonargparse's wheels, the JPEG archive) into
# bundle/ (17 MB); copy the repository with it there and run `bench/gpu-offline.sh OUT_DIR`. An archive that
# `make data` would refuse is refused here, before bundle/ is touched: on the GPU machine it failed after the start-up.
BUNDLE_WHEELS := jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
gpu-bundle: $(BIN)/python
	@test -f "$(CIFAR10_JPG)" || \
		{ echo "make gpu-bundle: no CIFAR-10 JPEG archive at '$(CIFAR10_JPG)'; set CIFAR10_JPG=path/to/cifar10-train-jpg.tar.gz"; exit 2; }
	@sh bench/jpg-archive.sh "make gpu-bundle" "$(CIFAR10_JPG)"
	rm -rf bundle.partial && mkdir -p bundle.partial/wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d bundle.partial/wheels $(BUNDLE_WHEELS)
	cp "$(CIFAR10_JPG)" bundle.partial/cifar10-train-jpg.tar.gz
	rm -rf bundle && mv bundle.partial bundle

# Kill training at random moments (SIGKILL and SIGTERM), resume it, and count the runs that end with exactly the
# uninterrupted run's weights: `make bench-resume ARGS="--trials 20"`. About 10 minutes on a 2-core CPU.
# It exits non-zero when any differs.
bench-resume: $(VENV)/.installed data
	$(BIN)/python -m bench.resume_trial $(ARGS)

# Unpack the JPEG copy into data/cifar10-jpg/train/<class>/, for configs/cifar10-jpg.yaml.
# bench/jpg-archive.sh unpacks it beside, then renames: an interrupted unpack leaves no half-filled data/cifar10-jpg.
# It says in one line what tar's own lines on a damaged archive (three, from gzip and tar) did not: the target and
# the variable to set. An archive of another layout is refused before it is marked unpacked: marked, it failed only
# in `make fit`, and stayed. gpu-bundle and bench/gpu-offline.sh check the layout with the same script.
# The archive is a prerequisite only where it exists: a copy unpacked before needs no archive any more.
data: data/cifar10-jpg/.unpacked
data/cifar10-jpg/.unpacked: $(CIFAR10_JPG_FOUND)
	@test -f "$(CIFAR10_JPG)" || \
		{ echo "make data: no CIFAR-10 JPEG archive at '$(CIFAR10_JPG)'; set CIFAR10_JPG=path/to/cifar10-train-jpg.tar.gz"; exit 2; }
	@sh bench/jpg-archive.sh "make data" "$(CIFAR10_JPG)" data/cifar10-jpg

# build/ and *.egg-info: what `pip install .` (not editable) or `pip wheel .` leave in the tree.
# A VENV outside the repository is the user's own environment, which make only installed into: it stays.
clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info bundle.partial data/cifar10-jpg.partial
ifeq ($(filter $(CURDIR)/%,$(abspath $(VENV))),)
	@echo "make clean: kept $(VENV), a virtual environment outside the repository"
else
	rm -rf $(VENV)
endif
