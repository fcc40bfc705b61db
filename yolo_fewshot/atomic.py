"""Atomic file writes: a hidden temporary file in the target's folder, renamed over the target, so a reader or a killed
run never sees a half-written file (results, manifests, generated labels, reports, reference banks, images).

A writer killed mid-write (kill -9) leaves its temporary file behind; temporary names carry the writer's pid
(``.<name>.<pid>.<random>.tmp``), and a write first removes the leftovers of earlier writers of that file that are gone
(except in bulk-written folders: saved predictions), so they never pile up. A temporary file of a live writer (a
concurrent save) is never touched.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

LEGACY_STALE_S = 600.0  # temp files named without a pid (older versions): stale once untouched this long
_OURS = re.compile(r"^(\d+)\.[0-9a-f]+\.tmp$")
_LEGACY = re.compile(r"^[a-z0-9_]{8}$")  # tempfile.mkstemp's random part


def temp_path(path: str | Path) -> Path:
    """A fresh hidden temporary path next to ``path``, named after it and this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left behind; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for f in path.parent.iterdir():
        if not f.name.startswith(prefix) or not f.is_file():
            continue
        rest = f.name[len(prefix) :]
        ours = _OURS.match(rest)
        try:
            if ours:
                stale = not _alive(int(ours.group(1)))
            else:
                stale = bool(_LEGACY.match(rest)) and time.time() - f.stat().st_mtime > LEGACY_STALE_S
            if stale:
                f.unlink()
                removed.append(f)
        except OSError:  # raced with its owner or another cleaner: nothing to do
            continue
    return removed


def replace_atomic(path: str | Path, write: Callable[[str], object], clean: bool = True) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` writes a temporary file, which is then renamed over ``path``.

    Errors (a full disk, a folder that cannot be written) propagate as ``OSError``; the temporary file never stays.
    ``clean``: first remove stale temporary files of ``path`` (a scan of its folder: off for folders written file by
    file in bulk, such as saved predictions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        clean_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, content: str | bytes, clean: bool = True) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` atomically, creating its folder; returns the path (``clean``: see
    :func:`replace_atomic`)."""
    data = content.encode() if isinstance(content, str) else content

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a full disk raises here (ENOSPC), and the temporary file goes
            f.write(data)

    return replace_atomic(path, write, clean)


def write_image(path: str | Path, image) -> Path:
    """Encode the BGR ``image`` (by ``path``'s suffix) and write it atomically; raises instead of failing silently
    (``cv2.imwrite`` returns False on a full disk or an unwritable folder, and callers rarely look)."""
    import cv2

    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".jpg", image)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix or '.jpg'} for {path}")
    try:
        return write_atomic(path, buf.tobytes(), clean=False)  # one of many files in its folder: no scan per image
    except OSError as e:
        raise OSError(
            f"cannot write {path}: {e.strerror or e} (disk full, or a folder that cannot be written?); free space "
            "or save elsewhere (project=/name=)"
        ) from None
