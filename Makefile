# `make test` and `make demo` do all set-up themselves on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test test-gpu demo bench clean

# A CPU torch (on this machine's disk) only when no torch is importable, so a user's CUDA torch is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q tests

# On a GPU machine (nothing is installed: run from the checkout): the whole suite, `gpu` tests included;
# it refuses to start where torch sees no GPU, so the gpu tests cannot pass by being skipped.
test-gpu:
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: torch sees no CUDA GPU')"
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m pytest -q -rs $$($(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 8") tests

demo: install
	astropt demo

# The CPU side-by-side figures of BENCHMARKS.md's tokenise section (the GPU ones: bash benchmarks/gpu.sh).
bench: install
	$(PYTHON) benchmarks/bench_tokenise.py --rows 512 --repeats 5 --workers 0 decode
	$(PYTHON) benchmarks/bench_tokenise.py --rows 1024 --files 2 --row-group-size 8 --repeats 5 open_files

clean:
	rm -rf data runs .astropt-demo .pytest_cache build *.egg-info
