"""Safe checkpoint loading: a ``.pt`` file is unpickled with ``torch.load(weights_only=True)`` and an allowlist, so a
hostile file is refused before any of its code runs.

A ``.pt`` checkpoint is a pickle, and a pickle can name any callable to run while it loads (``__reduce__``).
Ultralytics loads with ``weights_only=False`` unless ``ULTRALYTICS_SAFE_LOAD=1``, and its safe mode knows only its own
and torch's classes, so it refused our checkpoints. With ``yolo_fewshot`` imported, every checkpoint load that goes
through Ultralytics' ``torch_safe_load`` (``FewShotYOLO(path)``, ``yolo-fewshot ... model=x.pt``, ``resume=True``)
is a safe load:

1. the file must be a ``torch.save`` zip archive (a raw pickle is never loaded safely);
2. its pickle is scanned without being run (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`); of the
   globals it names, the plugin's own classes — ``nn.Module`` subclasses and dataclasses defined in ``yolo_fewshot``
   — and the numpy pieces of an array (reference thumbnails) are added to torch's safe globals;
3. Ultralytics' own safe mode (``torch_safe_load(..., safe_only=True)``) adds the Ultralytics and torch classes and
   loads with ``weights_only=True``: anything else (``os.system``, ``exec``, a foreign class) stops the unpickler at
   that global, and the user gets one line naming the file, the refused globals and the opt-out.

Opt-out, for old or foreign files you trust: ``FewShotYOLO(path, unsafe_load=True)``, ``yolo-fewshot ...
unsafe_load=True``, or ``YOLO_FEWSHOT_UNSAFE_LOAD=1`` for a whole process; each unsafe load logs a warning.
:mod:`yolo_fewshot._register` installs :func:`guarded` in place of Ultralytics' loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

UNSAFE_ENV = "YOLO_FEWSHOT_UNSAFE_LOAD"
NEVER = frozenset({"yolo_fewshot.encoders.hf.HFEncoder"})  # builds from the network: never part of a checkpoint
_local = threading.local()


class UnsafeCheckpointError(ValueError):
    """A checkpoint that safe loading refuses (it could run code while it loads)."""


@contextlib.contextmanager
def unsafe_loading(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), checkpoints load without the allowlist when ``enabled``."""
    before = getattr(_local, "unsafe", False)
    _local.unsafe = bool(enabled) or before
    try:
        yield
    finally:
        _local.unsafe = before


def unsafe_requested() -> bool:
    """Whether the user opted out of safe loading (:func:`unsafe_loading` or ``YOLO_FEWSHOT_UNSAFE_LOAD``)."""
    env = os.environ.get(UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")
    return env or getattr(_local, "unsafe", False)


def plugin_class(name: str) -> type | None:
    """The plugin class a checkpoint global names, when it may be unpickled: an ``nn.Module`` subclass or a dataclass
    defined in ``yolo_fewshot`` (never a function, never a name imported from elsewhere)."""
    module, _, attr = name.rpartition(".")
    if not module.startswith("yolo_fewshot.") or name in NEVER:
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    from torch import nn

    return obj if issubclass(obj, nn.Module) or dataclasses.is_dataclass(obj) else None


def _numpy_globals() -> list:
    """What unpickling a numpy array needs (reference thumbnails are arrays): reconstruct, ndarray, dtypes."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever this numpy version keeps it
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64)]
    dtypes += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    aliases = [(reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")]
    return [*aliases, np.ndarray, np.dtype, *dtypes]


def allow_checkpoint_classes(file: str | Path) -> list[str]:
    """Add the plugin classes (and numpy array pieces) that ``file``'s pickle names to torch's safe globals; returns
    the names the scan found. Nothing in the file runs."""
    import torch

    needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    entries: list[Any] = [c for c in map(plugin_class, needed) if c is not None]
    if any(n.startswith("numpy.") for n in needed):
        entries += _numpy_globals()
    if entries:
        torch.serialization.add_safe_globals(entries)
    return needed


def refusal(file: str | Path, names: list[str]) -> str:
    """The one line a refused checkpoint gets."""
    what = f"its pickle names {', '.join(sorted(names)[:5])}" if names else "its pickle is not a plain checkpoint"
    return (
        f"refused to load {file}: {what}, which a yolo_fewshot or Ultralytics checkpoint never holds and which "
        "could run code while loading; use checkpoints you trained, or, only if you trust this file, load it with "
        f"unsafe_load=True (or {UNSAFE_ENV}=1)"
    )


def guarded(upstream: Callable) -> Callable:
    """Ultralytics' ``torch_safe_load(weight, safe_only=None)`` made safe by default (see the module docstring)."""

    def torch_safe_load(weight, safe_only: bool | None = None):
        if safe_only is None:
            safe_only = not unsafe_requested()
        if not safe_only:
            from ultralytics.utils import LOGGER

            LOGGER.warning(f"loading {weight} with unsafe_load: its pickle may run code; only for files you trust")
            return upstream(weight, safe_only=False)
        file = Path(str(weight))
        if not file.is_file():  # a bare asset name: Ultralytics resolves (downloads) it and loads it safely
            return upstream(weight, safe_only=True)
        if not zipfile.is_zipfile(file):
            raise UnsafeCheckpointError(
                f"refused to load {file}: not a checkpoint written by torch.save (empty, truncated, or a raw pickle, "
                "which is never loaded safely); use the .pt your training wrote, or, only if you trust this file, "
                f"load it with unsafe_load=True (or {UNSAFE_ENV}=1)"
            )
        try:
            allow_checkpoint_classes(file)
        except ValueError:  # a TorchScript archive: Ultralytics' loader says so in its own words
            pass
        try:
            return upstream(weight, safe_only=True)
        except TypeError as e:
            if not isinstance(e.__cause__, pickle.UnpicklingError):
                raise
            import torch

            try:  # after the attempt, whatever Ultralytics allows is registered: what is left was refused
                left = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
            except ValueError:
                left = []
            raise UnsafeCheckpointError(refusal(file, left)) from None

    torch_safe_load.__doc__ = upstream.__doc__
    return torch_safe_load


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at ``path``, loaded safely (or as the user opted out)."""
    from ultralytics.nn import tasks

    return tasks.torch_safe_load(str(path))[0]
