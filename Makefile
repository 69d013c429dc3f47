# Two commands on a fresh machine:
#   make demo   -> create .venv, install, run the embedded default screening (local Ray, tiny zoo, CPU)
#   make test   -> create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test test-fast benchmark clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first: an unpinned torch pulls several GB of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lensray screen configs/demo.yaml --out $(OUT)

benchmark: install
	$(BIN)/lensray benchmark --curves $${LENSRAY_BENCHMARKS:-../shared/benchmarks}/flan.csv --out runs/benchmark-flan
	$(BIN)/lensray benchmark --curves $${LENSRAY_BENCHMARKS:-../shared/benchmarks}/wmt19.csv --out runs/benchmark-wmt19

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
