# biounet: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-fast bench clean peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU wheel; a bare `pip install torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,bench]"
	# elasticdeform's wheels are built against NumPy 1.x: rebuild it from source for NumPy 2 when needed
	$(PY) -c "import elasticdeform" 2>/dev/null || $(PY) -m pip install -q --force-reinstall --no-deps \
		--no-build-isolation --no-binary elasticdeform "elasticdeform==0.5.1"
	touch $(STAMP)

# The Cellpose peer of experiments/reproduce.py: its own environment, since Cellpose (through
# numba and OpenCV) pins NumPy below what biounet uses.
CELLPOSE_VENV := .venv-cellpose
$(CELLPOSE_VENV)/.installed:
	$(PYTHON) -m venv $(CELLPOSE_VENV)
	$(CELLPOSE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CELLPOSE_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(CELLPOSE_VENV)/bin/python -m pip install -q "cellpose==3.1.1.3"
	touch $@

peers: $(STAMP) $(CELLPOSE_VENV)/.installed

# The napari plugin's GUI stack (napari, PyQt6, pytest-qt, pytest-xvfb) for tests/test_napari.py;
# `make demo` does without it.
NAPARI_STAMP := $(VENV)/.installed-napari
$(NAPARI_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[napari-test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/biounet demo -o demo-output

test: $(STAMP) $(NAPARI_STAMP)
	$(PY) -m pytest -q -m "not extended"

test-all: $(STAMP) $(NAPARI_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/predict.py

clean:
	rm -rf $(VENV) $(CELLPOSE_VENV) demo-output build dist src/*.egg-info .pytest_cache .hypothesis
