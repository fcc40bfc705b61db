"""Fetch a Debian package's files without installing it: ``apt-get download`` + ``dpkg -x`` into a cache folder.

The real-photo benchmark is built from photographs that ship in Debian packages (the only photo sources reachable
from a machine with no internet but the package registries); extracting into a cache keeps the system untouched and
needs no root. Idempotent: an extracted package is reused (a marker file is written last, so an interrupted
extraction is redone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def default_cache() -> Path:
    """Where packages are extracted unless told otherwise: ``$YOLO_FEWSHOT_CACHE/debian`` or
    ``~/.cache/yolo_fewshot/debian``."""
    return Path(os.environ.get("YOLO_FEWSHOT_CACHE", Path.home() / ".cache" / "yolo_fewshot")) / "debian"


class FetchError(RuntimeError):
    """A package could not be fetched or extracted; the message says why and what to do."""


def fetch_debian(package: str, cache: Path) -> Path:
    """Download and extract ``package`` under ``cache``; returns the extraction root (holds ``usr/share/...``).

    Raises:
        FetchError: apt-get / dpkg is missing, or the download failed (no network, unknown package).
    """
    root = Path(cache) / package
    marker = root / ".extracted"
    if marker.is_file():
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise FetchError(
                f"'{tool}' not found: the benchmark's photos come from the Debian package {package}; run on "
                f"Debian/Ubuntu, or extract the package by hand into {root} and create {marker}"
            )
    debs = Path(cache) / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        r = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not found:
            msg = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise FetchError(
                f"apt-get download {package} failed ({msg}); it needs the Debian package index "
                "(run `apt-get update` once) and access to a Debian mirror"
            )
    if root.exists():
        shutil.rmtree(root)  # a partial extraction from an interrupted run
    r = subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        raise FetchError(f"dpkg -x {found[-1].name} failed: {r.stderr.strip().splitlines()[-1:]}; delete it and retry")
    marker.write_text(found[-1].name + "\n")
    return root
