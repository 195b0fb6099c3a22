# umbrella-ds: every target runs inside .venv/, which `make setup` creates.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
DEMO_DATA ?= runs/demo-data
export DS_ACCELERATOR ?= cpu
# Compiled extensions (DeepSpeed's CPU comm op) and inductor code outlive a checkout, so CI and
# later clones on the same machine reuse them instead of compiling again.
export UMBRELLA_CACHE ?= $(HOME)/.cache/umbrella-ds
export TORCH_EXTENSIONS_DIR ?= $(UMBRELLA_CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(UMBRELLA_CACHE)/inductor
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup system-deps ds-ops demo-data demo test lint bench clean

setup: $(STAMP)

# mpi4py compiles against an MPI; Debian's OpenMPI provides mpicc and mpirun.
system-deps:
	@if ! command -v mpicc >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing OpenMPI (apt)"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null; \
	  else echo "need OpenMPI: sudo apt-get install libopenmpi-dev openmpi-bin" >&2; exit 1; fi; \
	fi

$(STAMP): setup.cfg pyproject.toml | system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the local CPU build; a looser pin downloads GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# DeepSpeed JIT-builds its CPU comm op on a first run. Build it once here, before any ranks start,
# so they never race to build it; and clear the lock a build killed midway leaves behind, which
# every later run would otherwise wait on forever.
ds-ops: $(STAMP)
	rm -f $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/lock
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"

demo-data: $(STAMP)
	$(BIN)/umbrella-pack synth --out $(DEMO_DATA)/raw --subjects 400 --seed 0
	$(BIN)/umbrella-pack build --manifest $(DEMO_DATA)/raw/manifest.csv --out $(DEMO_DATA)/shards --modalities T1 --t1-size 32 32 32 --workers 2 --resume

demo: demo-data ds-ops
	$(BIN)/python -m umbrella_ds.demo --config configs/demo.yaml --data $(DEMO_DATA) --out $(OUT)

# Two pytest workers (pytest-xdist): most of the suite is one busy process at a time, so a second
# worker uses the second core. --dist loadscope keeps each test module on one worker, so its module
# fixtures (and the session runs only one module uses) are made once; TEST_WORKERS=0 runs
# everything in one process. The 20 slowest
# tests are listed at the end, so a CI log says where the time went.
TEST_WORKERS ?= 2
test: $(STAMP) ds-ops
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=20 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP) ds-ops
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache .ruff_cache
