# Set-up contract: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0; an already installed torch in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (timellm)"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p outputs/notebooks
	$(VENV)/bin/papermill -k python3 --cwd . notebooks/01_train.ipynb outputs/notebooks/01_train.ipynb

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

clean:
	rm -rf outputs .pytest_cache .ruff_cache
