"""The one place where yolo_fewshot touches Ultralytics internals.

Ultralytics' ``parse_model`` (``ultralytics/nn/tasks.py``) looks layer names up in that module's globals, passes unknown
layers their raw YAML args, assumes output channels == input channels and cannot take a list ``from`` for them. So:

1. the plugin's layer classes are injected into ``ultralytics.nn.tasks``' namespace, so YAML rows can name them;
2. ``parse_model`` is rebuilt from its own installed source with one extra branch in front of ``if m in base_modules:``
   — a layer class that defines ``yaml_build(c_in, args, ctx) -> (args, c2)`` computes its own constructor args and
   output width from the input widths and the scaling context. Nothing else in the function changes;
3. Ultralytics' checkpoint loader ``torch_safe_load`` (which ``load_checkpoint`` looks up in its module at call time)
   is replaced by :func:`yolo_fewshot.checkpoint.guarded` around it: safe (``weights_only=True`` + an allowlist) by
   default, for every checkpoint loaded in the process.

All steps are idempotent. If the upstream source no longer has the anchor line or the variables the hook reads, the
import fails with a message naming the supported Ultralytics range instead of building a wrong model. Import paths of
the registered classes are part of the checkpoint format (checkpoints pickle them): keep them stable.

Also here, because they are Ultralytics process state: the version check, and offline font placement.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable
from pathlib import Path

SUPPORTED = (">=8.4.190", "<8.5")  # tested range; keep in sync with setup.cfg
HOOK_ATTR = "_yolo_fewshot_hook"
ORIGINAL_ATTR = "_yolo_fewshot_original"
ANCHOR = "        if m in base_modules:\n"
NEEDED = ("width", "max_channels", "reg_max", "end2end", "legacy", "scale", "ch", "f", "args", "d")
HOOK = (
    "        if getattr(m, 'yaml_build', None) is not None:  # yolo_fewshot: layer computes its own args and width\n"
    "            args, c2 = m.yaml_build([ch[x] for x in ([f] if isinstance(f, int) else f)], args, dict(\n"
    "                width=width, max_channels=max_channels, cfg=d, reg_max=reg_max, end2end=end2end, legacy=legacy,\n"
    "                scale=scale))\n"
    "        el"  # turns the anchor's `if` into `elif`
)


class UpstreamChanged(RuntimeError):
    """Ultralytics' internals are not what this plugin was written against."""


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def check_version(version: str | None = None) -> str:
    """Raise ImportError with a one-line fix when the installed Ultralytics is outside :data:`SUPPORTED`."""
    if version is None:
        import ultralytics

        version = ultralytics.__version__
    lo, hi = (_version_tuple(s.lstrip("<>=")) for s in SUPPORTED)
    if not lo <= _version_tuple(version) < hi:
        raise ImportError(
            f"yolo_fewshot needs ultralytics{','.join(SUPPORTED)}, found {version}; "
            f"run: pip install 'ultralytics{','.join(SUPPORTED)}'"
        )
    return version


def hooked_parse_model(source: str, namespace: dict) -> Callable:
    """Compile ``parse_model`` from ``source`` with the ``yaml_build`` branch, in ``namespace`` (tasks' globals).

    Raises:
        UpstreamChanged: When the anchor line is not found exactly once or a variable the hook reads is missing.
    """
    if source.count(ANCHOR) != 1:
        raise UpstreamChanged(
            "yolo_fewshot cannot hook ultralytics.nn.tasks.parse_model: the line "
            f"{ANCHOR.strip()!r} is not in it exactly once (upstream changed); "
            f"install ultralytics{','.join(SUPPORTED)}"
        )
    missing = [v for v in NEEDED if f"{v} = " not in source and f"{v}, " not in source and f"({v}" not in source]
    if missing:
        raise UpstreamChanged(
            f"yolo_fewshot cannot hook parse_model: upstream no longer defines {missing}; "
            f"install ultralytics{','.join(SUPPORTED)}"
        )
    patched = source.replace(ANCHOR, HOOK + ANCHOR.lstrip(), 1)
    scope: dict = {}
    exec(
        compile(patched, f"<yolo_fewshot hook of {namespace.get('__file__', 'parse_model')}>", "exec"), namespace, scope
    )
    fn = scope["parse_model"]
    setattr(fn, HOOK_ATTR, True)
    return fn


def upstream_parse_model() -> Callable:
    """Ultralytics' own ``parse_model`` (before or after hooking)."""
    from ultralytics.nn import tasks

    return getattr(tasks.parse_model, ORIGINAL_ATTR, tasks.parse_model)


def layers() -> dict[str, type]:
    """The layer classes YAML rows may name."""
    from .nn.cheaf import CHEAF
    from .nn.head import FewShotDetect
    from .nn.lite_backbone import LiteBackbone
    from .nn.prototype_detect import PrototypeDetect
    from .nn.psalm import PSALM
    from .nn.select import Select

    return {c.__name__: c for c in (CHEAF, PSALM, Select, FewShotDetect, PrototypeDetect, LiteBackbone)}


def register() -> None:
    """Inject the plugin layers into Ultralytics' YAML namespace and hook ``parse_model`` (idempotent)."""
    import ultralytics.nn as unn
    from ultralytics.nn import tasks

    check_version()
    for name, cls in layers().items():
        if tasks.__dict__.get(name, cls) is not cls:
            raise UpstreamChanged(
                f"ultralytics.nn.tasks already defines a different '{name}'; yolo_fewshot's layer "
                f"would shadow it (install ultralytics{','.join(SUPPORTED)})"
            )
        setattr(tasks, name, cls)
    if not getattr(tasks.parse_model, HOOK_ATTR, False):
        original = tasks.parse_model
        fn = hooked_parse_model(inspect.getsource(original), tasks.__dict__)
        setattr(fn, ORIGINAL_ATTR, original)
        tasks.parse_model = fn
        if getattr(unn, "parse_model", None) is not None:
            unn.parse_model = fn
    hook_checkpoint_loading()
    place_font()


def hook_checkpoint_loading() -> None:
    """Make Ultralytics' checkpoint loading safe by default (see :mod:`yolo_fewshot.checkpoint`; idempotent).

    Raises:
        UpstreamChanged: When ``load_checkpoint`` no longer loads through ``torch_safe_load`` (the guard would be
            bypassed, so the import refuses rather than load checkpoints unsafely).
    """
    import ultralytics.nn as unn
    from ultralytics.nn import tasks

    from .checkpoint import guarded

    if getattr(tasks.torch_safe_load, HOOK_ATTR, False):
        return
    if "torch_safe_load(weight)" not in inspect.getsource(tasks.load_checkpoint):
        raise UpstreamChanged(
            "yolo_fewshot cannot guard checkpoint loading: ultralytics.nn.tasks.load_checkpoint no longer calls "
            f"torch_safe_load (upstream changed); install ultralytics{','.join(SUPPORTED)}"
        )
    original = tasks.torch_safe_load
    fn = guarded(original)
    setattr(fn, HOOK_ATTR, True)
    setattr(fn, ORIGINAL_ATTR, original)
    tasks.torch_safe_load = fn
    if getattr(unn, "torch_safe_load", None) is not None:
        unn.torch_safe_load = fn


def place_font() -> None:
    """Put a local TTF where Ultralytics looks for Arial, so plotting never tries to download it (offline machines).

    Matplotlib ships DejaVuSans; it is copied under Ultralytics' font names only when those files are missing.
    """
    try:
        import matplotlib
        from ultralytics.utils import USER_CONFIG_DIR
    except ImportError:  # plots are optional
        return
    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dst = Path(USER_CONFIG_DIR) / name
        if src.is_file() and not dst.exists():
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)  # atomic: a concurrent reader never sees half a font
            except OSError:  # read-only config dir: plots fall back to Ultralytics' own handling
                return
