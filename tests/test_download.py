"""`timellm data download`, offline: the files are served by a local HTTP server on 127.0.0.1
(the real ETTh1.csv from ../shared, or files made here), never fetched from the network."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from timellm_lib import cli
from timellm_lib.config import load_config
from timellm_lib.data import DataError, build_datasets
from timellm_lib.data.download import BASE_URL_ENV, PINNED_SHA256, file_sha256


@pytest.fixture
def serve() -> Iterator:
    """serve(folder) -> the base URL of an HTTP server on 127.0.0.1 serving ``folder``."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def download(*args: str) -> int:
    return cli.main(["data", "download", *args])


def errors(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_downloads_etth1_verified_and_atomically(tmp_path, etth1_path, serve, capsys):
    assert file_sha256(etth1_path) == PINNED_SHA256["ETTh1"]  # the pin is the real file's
    url = serve(etth1_path.parent)
    target = tmp_path / "data/ETT-small"
    assert download("ETTh1", "--dir", str(target), "--base-url", url) == 0
    assert (target / "ETTh1.csv").read_bytes() == etth1_path.read_bytes()
    assert sorted(p.name for p in target.iterdir()) == ["ETTh1.csv"]  # no temporary left
    assert "ETTh1: downloaded" in capsys.readouterr().out
    # again: the verified file is kept, not fetched again
    stamp = (target / "ETTh1.csv").stat().st_mtime_ns
    assert download("ETTh1", "--dir", str(target), "--base-url", "http://127.0.0.1:9") == 0
    assert "already present" in capsys.readouterr().out
    assert (target / "ETTh1.csv").stat().st_mtime_ns == stamp


def test_base_url_from_the_environment(tmp_path, etth1_path, serve, monkeypatch):
    monkeypatch.setenv(BASE_URL_ENV, serve(etth1_path.parent))
    assert download("ETTh1", "--dir", str(tmp_path)) == 0
    assert file_sha256(tmp_path / "ETTh1.csv") == PINNED_SHA256["ETTh1"]


def test_checksum_mismatch_is_refused_and_writes_nothing(tmp_path, serve, capsys):
    served = tmp_path / "served"
    served.mkdir()
    (served / "ETTh1.csv").write_text("date,OT\n2016-07-01 00:00:00,1.0\n")
    target = tmp_path / "data"
    assert download("ETTh1", "--dir", str(target), "--base-url", serve(served)) == 2
    assert "not the pinned" in errors(capsys)
    assert list(target.iterdir()) == []


def test_an_existing_different_file_is_never_overwritten(tmp_path, etth1_path, serve, capsys):
    target = tmp_path / "data"
    target.mkdir()
    (target / "ETTh1.csv").write_text("mine\n")
    assert download("ETTh1", "--dir", str(target), "--base-url", serve(etth1_path.parent)) == 2
    assert "exists but its sha256" in errors(capsys)
    assert (target / "ETTh1.csv").read_text() == "mine\n"


def test_files_without_a_pinned_hash_need_an_explicit_flag(tmp_path, serve, capsys):
    served = tmp_path / "served"
    served.mkdir()
    (served / "ETTh2.csv").write_text("date,OT\n2016-07-01 00:00:00,1.0\n")
    url, target = serve(served), tmp_path / "data"
    if PINNED_SHA256["ETTh2"] is not None:
        pytest.fail("ETTh2 is pinned now: serve the real file here instead")
    assert download("ETTh1", "ETTh2", "--dir", str(target), "--base-url", url) == 2
    assert "--allow-unverified" in errors(capsys)
    assert not target.exists() or list(target.iterdir()) == []  # nothing fetched, not ETTh1 either
    assert download("ETTh2", "--dir", str(target), "--base-url", url, "--allow-unverified") == 0
    out = capsys.readouterr().out
    assert f"sha256 {file_sha256(served / 'ETTh2.csv')}" in out and "unverified" in out
    (served / "ETTh2.csv").write_text("date,OT\n2016-07-01 00:00:00,2.0\n")  # changed upstream
    assert download("ETTh2", "--dir", str(target), "--base-url", url, "--allow-unverified") == 2
    assert "differs from" in errors(capsys)
    assert (target / "ETTh2.csv").read_text().endswith("1.0\n")


def test_unknown_name_and_missing_file_name_the_command(tmp_path, capsys, repo_root, monkeypatch):
    assert download("ETTh9", "--dir", str(tmp_path)) == 2
    assert "unknown ETT file(s) ['ETTh9']" in errors(capsys)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(repo_root / "configs/etth1_512_96.yaml")
    assert cfg.data.path == "data/ETT-small/ETTh1.csv"
    with pytest.raises(DataError, match="run `timellm data download ETTh1 --dir data/ETT-small`"):
        build_datasets(cfg.data)
