# `make test` and `make demo` do all set-up themselves on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench clean

# A CPU torch (on this machine's disk) only when no torch is importable, so a user's CUDA torch is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	astropt demo

# The CPU side-by-side figures of BENCHMARKS.md's tokenise section (the GPU ones: bash benchmarks/gpu.sh).
bench: install
	$(PYTHON) benchmarks/bench_tokenise.py --rows 512 --repeats 5 --workers 0 decode
	$(PYTHON) benchmarks/bench_tokenise.py --rows 1024 --files 2 --row-group-size 8 --repeats 5 open_files

clean:
	rm -rf data runs .astropt-demo .pytest_cache build *.egg-info
