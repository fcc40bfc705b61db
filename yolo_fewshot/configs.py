"""Where the plugin's model YAMLs live and how a name such as ``yolov8n-psalm-p2.yaml`` resolves to one.

Ultralytics resolves bare YAML names only inside its own package, so ``FewShotYOLO`` resolves ours here: a path that
exists is used as is; otherwise the name is looked up in ``cfg/models/`` (shipped as package data ``yolo_fewshot/cfg``
by a normal install, or the repository's top-level ``cfg/`` in a source checkout), with the scale letter removed the
way Ultralytics does (``yolov8n-psalm-p2.yaml`` -> ``yolov8-psalm-p2.yaml`` at scale ``n``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent
CFG_DIRS = (_PKG / "cfg" / "models", _PKG.parent / "cfg" / "models")  # installed, then source checkout
_SCALED = re.compile(r"^(yolov\d+)([nslmx])(-.+)?\.ya?ml$")


def model_yamls() -> list[Path]:
    """All model YAMLs the plugin ships (unscaled names)."""
    for d in CFG_DIRS:
        if d.is_dir():
            return sorted(d.glob("*.yaml"))
    return []


def resolve_model_yaml(name: str | Path) -> tuple[Path, str]:
    """Resolve a model YAML name or path.

    Args:
        name: A path to a YAML file, or a shipped name with or without a scale letter.

    Returns:
        The YAML file and the scale letter ('' when the name carries none).

    Raises:
        FileNotFoundError: With the list of shipped names, when nothing matches.
    """
    path = Path(name)
    m = _SCALED.match(path.name)
    scale = m.group(2) if m else ""
    if path.is_file():
        return path, scale
    unscaled = f"{m.group(1)}{m.group(3) or ''}.yaml" if m else path.name
    for d in CFG_DIRS:
        for cand in (d / path.name, d / unscaled):
            if cand.is_file():
                return cand, scale
    shipped = ", ".join(p.name for p in model_yamls()) or "none found"
    raise FileNotFoundError(
        f"model YAML '{name}' not found; use a path or one of: {shipped} (add a scale letter n/s/m/l/x after 'yolov8')"
    )


def load_model_yaml(name: str | Path) -> dict[str, Any]:
    """Load a model YAML into the dict Ultralytics' model classes take (``scale`` and ``yaml_file`` filled in)."""
    from ultralytics.utils import YAML

    path, scale = resolve_model_yaml(name)
    d = YAML.load(path)
    if scale:
        if scale not in (d.get("scales") or {}):
            raise ValueError(f"{path.name} has no scale '{scale}'; it defines {sorted(d.get('scales') or {})}")
        d["scale"] = scale
    elif d.get("scales"):
        d["scale"] = next(iter(d["scales"]))  # Ultralytics' default: the first scale, said out loud here
    d["yaml_file"] = str(name)
    return d


def neck_levels(cfg: dict[str, Any]) -> int:
    """Number of pyramid levels the model's prototypes are made for: the length of the fusion neck's YAML ``from``
    (PSALM / CHEAF), or half of the prototype head's (PrototypeDetect takes neck levels then as many trunk levels)."""
    for f, _, m, _ in cfg.get("head", []) + cfg.get("backbone", []):
        if m in ("PSALM", "CHEAF"):
            return len(f) if isinstance(f, list) else 1
        if m == "PrototypeDetect":
            return len(f) // 2
    raise ValueError(f"{cfg.get('yaml_file', 'model YAML')} has no PSALM, CHEAF or PrototypeDetect row")
