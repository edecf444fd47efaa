"""``timellm data download``: the ETT files from the public ETDataset repository, verified.

Each file is streamed into a temporary file beside its target while its sha256 is computed,
and renamed over the target only when the hash is the pinned one (an atomic write: a failed
or refused download leaves nothing behind). An existing file is never overwritten: one with
the pinned hash is kept as it is, a different one is refused with its path.

Only hashes verified by this project are pinned. A file without a pinned hash is refused
unless ``--allow-unverified`` is given; then it is written and its sha256 printed, so that it
can be compared with a trusted copy (and pinned here).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from timellm_lib.data.windows import DataError
from timellm_lib.files import atomic_file

BASE_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small"
BASE_URL_ENV = "TIMELLM_ETT_BASE_URL"  # e.g. a mirror, or a local server in tests
DEFAULT_DIR = "data/ETT-small"
# sha256 of the files as published; None: not verified by this project yet
PINNED_SHA256: dict[str, str | None] = {
    "ETTh1": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    "ETTh2": None,
    "ETTm1": None,
    "ETTm2": None,
}
CHUNK = 1 << 16


@dataclass
class Downloaded:
    name: str
    path: Path
    sha256: str
    status: str  # downloaded | already present | downloaded (unverified)

    def line(self) -> str:
        return f"{self.name}: {self.status}: {self.path} (sha256 {self.sha256})"


def download_command(name: str) -> str:
    """The command that fetches ETT file ``name`` (for error messages)."""
    return f"timellm data download {name}"


def base_url(explicit: str | None = None) -> str:
    """``explicit``, else $TIMELLM_ETT_BASE_URL, else the ETDataset repository."""
    return (explicit or os.environ.get(BASE_URL_ENV) or BASE_URL).rstrip("/")


def download_ett(
    names: list[str],
    folder: str | Path = DEFAULT_DIR,
    url: str | None = None,
    allow_unverified: bool = False,
) -> list[Downloaded]:
    """Fetch the ETT files ``names`` into ``folder``; see the module docstring. All names
    are checked before anything is fetched."""
    unknown = [n for n in names if n not in PINNED_SHA256]
    if unknown:
        raise DataError(f"unknown ETT file(s) {unknown}; choose from {list(PINNED_SHA256)}")
    unpinned = [n for n in names if PINNED_SHA256[n] is None]
    if unpinned and not allow_unverified:
        raise DataError(
            f"no verified sha256 is pinned for {unpinned}, so their content cannot be checked; "
            "add --allow-unverified to download them anyway (the sha256 of each file is "
            "printed, compare it with a trusted copy), or fetch them yourself"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [_fetch(name, folder, base_url(url)) for name in names]


def _fetch(name: str, folder: Path, base: str) -> Downloaded:
    target = folder / f"{name}.csv"
    pinned = PINNED_SHA256[name]
    if target.exists():
        have = file_sha256(target)
        if pinned is not None and have == pinned:
            return Downloaded(name, target, have, "already present")
        if pinned is not None:
            raise DataError(
                f"{target} exists but its sha256 {have} is not the published {name}'s "
                f"{pinned}; it is left as it is. Move it away (or delete it) and download again"
            )
    source = f"{base}/{name}.csv"
    digest = hashlib.sha256()
    existing = target.read_bytes() if target.exists() else None
    try:
        with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 (http/https)
            if existing is not None:  # unverified: compare, never overwrite
                body = response.read()
                if body != existing:
                    raise DataError(
                        f"{target} exists and differs from {source}; it is left as it is. "
                        "Move it away (or delete it) and download again"
                    )
                return Downloaded(name, target, hashlib.sha256(body).hexdigest(), "already present")
            with atomic_file(target) as out:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                got = digest.hexdigest()
                if pinned is not None and got != pinned:
                    raise DataError(
                        f"{source} has sha256 {got}, not the pinned {pinned} of {name}; nothing "
                        f"was written. The file at that address changed or is not {name}: "
                        f"check --base-url / ${BASE_URL_ENV}"
                    )
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DataError(
            f"could not download {source} ({err}); check the network or the address "
            f"(--base-url, ${BASE_URL_ENV}), or download the file yourself into {folder}"
        ) from err
    status = "downloaded" if pinned else "downloaded (unverified: compare the sha256)"
    return Downloaded(name, target, got, status)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def run_data_command(args: object) -> int:
    """``timellm data download NAME ... [--dir DIR] [--base-url URL] [--allow-unverified]``."""
    for item in download_ett(args.names, args.dir, args.base_url, args.allow_unverified):
        print(item.line())
    return 0
