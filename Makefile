# One entry point for people and CI: `make demo`, `make test`, `make dev`.
PYTHON ?= python3
VENV ?= .venv
# CI and these targets install PyTorch's CPU wheel; on a GPU machine use e.g.
# `make TORCH_SPEC=torch demo` or install the project into your own environment.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Training on the CPU allocates logits chunks of hundreds of MB every step; by default glibc
# maps each afresh and page-faults it in (2.6x slower tiny-model steps, measured). Keep freed
# memory in the heap instead. Inherited by every process the targets start.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: install demo test dev clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=68" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed ships only a source archive whose build imports torch: build it
	# against the torch just installed instead of downloading another one.
	$(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# DeepSpeed compiles its CPU communication op on first use (minutes on 2 cores, while every
	# other DeepSpeed process waits on its lock): once here, not inside the first training, into
	# the folder `blues train` uses (blues_train.training.train.prepare_shm_op: under the environment).
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	  b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

# pytest-xdist: each test file runs whole on one worker (its module fixtures are built once);
# the stores and training runs are built once for all workers (tests/built_once.py).
# Three workers on two cores: tests wait on servers and subprocesses much of the time
# (measured 2026-12-03: 2 workers 900 s, 3 workers 666 s, 4 workers 937 s).
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

$(DAGSTER_HOME)/dagster.yaml: pipelines/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	test -f $@ || cp pipelines/dagster.yaml $@

DEV_HOST ?= 127.0.0.1
DEV_PORT ?= 3000
# pipelines.dev resets SIGINT and SIGTERM before it execs dagster dev: `make dev &` from a
# script would otherwise leave dagster dev and its children ignoring both.
# config.json's raw corpus: written once (`make demo` writes it too).
sample_corpus: | $(STAMP)
	$(BIN)/blues sample-corpus --out sample_corpus

dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml | sample_corpus
	$(BIN)/python -m pipelines.dev -w workspace.yaml -h $(DEV_HOST) -p $(DEV_PORT)

clean:
	rm -rf data_cache runs sample_corpus .dagster_home
