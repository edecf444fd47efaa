# Set-up contract: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0; an already installed torch in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
# The browser tests drive Debian's Chromium (never a browser download); CHROMIUM names another.
CHROMIUM ?= chromium

.PHONY: setup demo test test-browser chromium lint format lab clean

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
	$(PY) -m pip install -e ".[dev,browser]"
	touch $(BROWSER_STAMP)

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
	rm -rf outputs .pytest_cache .ruff_cache
