"""``yolo-fewshot studio key=value ...``: parse the studio's keys and serve the page until Ctrl+C.

Its keys are its own (``model``, ``host``, ``port``, ``encoder``, ``workdir``), not Ultralytics', so the studio parses
them here; every mistake (an unknown key, a port in use, a model that does not load, the extra not installed) is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": "yolov8n-lite0-proto.yaml",  # = logic.DEFAULT_MODEL (not imported: parsing stays light)
    "host": "127.0.0.1",  # this machine only, unless host= says otherwise
    "port": 7878,
    "encoder": None,
    "workdir": "runs/studio",
}


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """``["model=best.pt", "port=8000"]`` -> ``{"model": "best.pt", "port": 8000, ...}`` (defaults filled in).

    Raises:
        ValueError: Not ``key=value``, an unknown key, or a port that is not a number in 1..65535.
    """
    out = dict(DEFAULTS)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or not key:
            raise ValueError(f"argument '{a}' is not key=value (e.g. port=7878)")
        if key not in DEFAULTS:
            raise ValueError(f"studio takes only {', '.join(f'{k}=' for k in DEFAULTS)}; got '{a}'")
        out[key] = value
    try:
        out["port"] = int(out["port"])
    except ValueError:
        raise ValueError(f"port={out['port']} is not a number") from None
    if not 0 < out["port"] < 65536:
        raise ValueError(f"port={out['port']} is not in 1..65535")
    return out


def main(argv: Sequence[str]) -> int:
    """Run the studio; returns the exit status (2 with one line on stderr for a mistake, 0 after Ctrl+C)."""
    try:
        args = parse(argv)
        try:
            from .app import launch
        except ImportError as e:
            raise ImportError(
                f"the studio needs its extra ({e}); install it with: pip install -c constraints.txt '.[studio]'"
            ) from None
        launch(**args, block=True)
    except KeyboardInterrupt:
        return 0
    except (ValueError, OSError, ImportError, TypeError) as e:
        text = str(e).strip()
        print(f"yolo-fewshot: error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
