"""A real JupyterLab server and a headless Chromium for the notebooks' browser tests.

The server serves a *lab root* made for the session: ``notebooks/`` holds copies of the
project's notebooks with their smoke parameters written in (as papermill injects them, without
executing anything), and every other top-level entry of the repository (``configs/``,
``data/``, ...) is linked in, so ``init_notebook`` finds ``notebooks/<name>`` and works from
the lab root exactly as it works from the repository root. Runs land in the lab root's own
``outputs/``, never in the repository's.

Chromium is Debian's (``apt-get install chromium``; ``CHROMIUM`` names another binary), driven
by Playwright without any browser download, and kept off the network. Without Chromium or
Playwright every browser test is skipped with the reason; ``make test-browser`` installs both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "outputs" / "browser"
# Flags that keep Chromium off the network and free of first-run state (a fresh
# --user-data-dir is given by launch_persistent_context). --no-sandbox: Chromium refuses to
# start its sandbox as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    *(["--no-sandbox"] if os.geteuid() == 0 else []),
]
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_S = 90


def smoke_parameters_file(notebook: Path) -> Path:
    """``configs/notebooks/<number>_smoke.yaml``, the notebook's smoke parameters."""
    return REPO_ROOT / "configs" / "notebooks" / f"{notebook.stem.split('_')[0]}_smoke.yaml"


def write_smoke_copy(notebook: Path, notebooks_dir: Path, extra: dict | None = None) -> Path:
    """Copy ``notebook`` into ``notebooks_dir`` with its smoke parameters (updated with
    ``extra``) injected after the parameters cell, the cell papermill would add, so "Run All
    Cells" runs the smoke case."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    smoke = smoke_parameters_file(notebook)
    if not smoke.is_file():
        raise FileNotFoundError(
            f"{notebook.name} has no smoke parameters: write {smoke.relative_to(REPO_ROOT)} "
            "(the values that make it run in seconds) so the browser test can run it"
        )
    values = {**(yaml.safe_load(smoke.read_text()) or {}), **(extra or {})}
    parameterized = parameterize_notebook(load_notebook_node(str(notebook)), values)
    copy = notebooks_dir / notebook.name
    nbformat.write(parameterized, copy)
    return copy


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory) -> Path:
    """The folder JupyterLab serves: notebooks/ for the smoke copies, the rest of the
    repository linked in, a fresh outputs/."""
    root = tmp_path_factory.mktemp("lab_root")
    for entry in REPO_ROOT.iterdir():
        if entry.name not in ("notebooks", "outputs") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    (root / "notebooks").mkdir()
    (root / "outputs").mkdir()
    return root


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which(os.environ.get("CHROMIUM", "chromium"))
    if path is None:
        pytest.skip(
            "no Chromium on this machine: `make test-browser` installs Debian's chromium "
            "(or set CHROMIUM to a Chromium binary)"
        )
    pytest.importorskip("playwright", reason="pip install -e '.[browser]' (make test-browser)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab server: its base URL, token and the folder it serves."""

    url: str
    token: str
    root: Path

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def add_notebook(self, notebook: Path, extra: dict | None = None) -> str:
        """Serve the smoke copy of the project's ``notebook``; returns its URL (?reset: a
        fresh workspace, so only this notebook is open)."""
        copy = write_smoke_copy(notebook, self.root / "notebooks", extra)
        return f"{self.url}/lab/tree/notebooks/{copy.name}?reset&token={self.token}"

    def shut_down_kernels(self) -> None:
        for session in self.api("GET", "sessions"):
            self.api("DELETE", f"sessions/{session['id']}")


def isolated_jupyter_env(home: Path) -> dict[str, str]:
    """Environment that hides the user's Jupyter config, settings, workspaces and kernels,
    so the server uses this project's kernel (the python3 spec of sys.prefix, launched with
    this interpreter) and nothing a user set up can change what the tests see."""
    config = home / "config"
    (config / "labconfig").mkdir(parents=True)
    # The "get Jupyter news?" notification would cover part of every screenshot.
    disabled = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (config / "labconfig" / "page_config.json").write_text(json.dumps(disabled))
    return {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_PREFER_ENV_PATH": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def lab(chromium, lab_root, tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1, a free port and a random token; shut down (kernels included)
    when the session ends, whether the tests passed or not."""
    home = tmp_path_factory.mktemp("jupyter_home")
    port, token = free_port(), secrets.token_hex(16)
    log_path = home / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={lab_root}",
        "--ServerApp.allow_root=True",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: kernel and cell state
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command,
            cwd=lab_root,
            env=isolated_jupyter_env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Lab(f"http://127.0.0.1:{port}", token, lab_root)
    try:
        wait_until_serving(running, server, log_path)
        yield running
    finally:
        stop_server(running, server)


def wait_until_serving(lab: Lab, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            lab.api("GET", "status")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"JupyterLab did not start within {SERVER_START_S} s; its log:\n{tail}")


def stop_server(lab: Lab, server: subprocess.Popen) -> None:
    """Ask the server to shut down (it stops its kernels), then make sure it is gone."""
    if server.poll() is None:
        try:
            lab.api("POST", "shutdown")
        except (urllib.error.URLError, ConnectionError):
            pass
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    """Headless Chromium with a fresh profile, shared by the session's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, lab):
    """A new tab; afterwards the tab is closed and the notebook's kernel shut down."""
    tab = browser.new_page()
    try:
        yield tab
    finally:
        tab.close()
        lab.shut_down_kernels()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
