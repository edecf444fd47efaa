# Set-up contract: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0; an already installed torch in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
# Exact versions of every other package (transitive ones too) that CI tested; `make lock`
# regenerates it from the newest releases that pyproject.toml allows.
LOCK := requirements.lock
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
# `make test-latest`: the newest releases, in a venv of their own (never the locked .venv)
LATEST_VENV := .venv-latest
# The browser tests drive Debian's Chromium (never a browser download); CHROMIUM names another.
CHROMIUM ?= chromium

.PHONY: setup demo test test-browser test-latest lock chromium lint format lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -c $(LOCK) -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (timellm)"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p outputs/notebooks
	$(VENV)/bin/papermill -k python3 --cwd . notebooks/01_train.ipynb outputs/notebooks/01_train.ipynb

# The browser tests (tests/browser) run too when Chromium is installed; `make test-browser`
# installs it. Without it they are skipped, and said so.
test: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/browser
	@if command -v $(CHROMIUM) >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory test-browser; \
	else \
		echo "make test: SKIPPED the browser tests (tests/browser): no Chromium on this machine;" \
			"'make test-browser' installs it and runs them"; \
	fi

# JupyterLab on 127.0.0.1 with a random port and token, headless Chromium through Playwright;
# every notebook is run with its smoke parameters (screenshots in outputs/browser/).
test-browser: chromium $(BROWSER_STAMP)
	CHROMIUM="$$(command -v $(CHROMIUM))" $(PY) -m pytest -q tests/browser

$(BROWSER_STAMP): $(STAMP)
	$(PY) -m pip install -c $(LOCK) -e ".[dev,browser]"
	touch $(BROWSER_STAMP)

# Regenerate the lock: a throw-away venv takes the newest releases pyproject.toml allows (torch
# stays TORCH_SPEC and out of the lock), and pip freeze writes what it got. Then `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[dev,browser]"
	{ echo "# pip constraints: the exact versions CI tested (Python 3.11, Linux x86_64; torch is"; \
	  echo "# TORCH_SPEC in the Makefile). Written by 'make lock'; 'make setup' installs them."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The fast, non-browser tests on the newest releases pyproject.toml allows (upgraded at each
# call), so an upstream change shows up here before it reaches the lock or a user.
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || \
		$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-constraint.txt  # newest of all else, not torch
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch-constraint.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(transformers|torch|numpy|pandas|papermill|nbclient)=='
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow and not locked_install" --ignore=tests/browser -p no:cacheprovider

# Debian's chromium through apt (root, or sudo); nothing to do when it is installed.
chromium:
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
		echo "installing Debian's chromium with apt-get"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; \
	}

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

clean:
	rm -rf outputs .pytest_cache .ruff_cache .venv-lock $(LATEST_VENV)
