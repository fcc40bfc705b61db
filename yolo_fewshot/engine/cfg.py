"""Run settings the plugin adds to Ultralytics' (``yolo-fewshot train ... n_way=4``) and their defaults.

Ultralytics' config checker rejects unknown keys, so the engine classes are given Ultralytics' defaults extended
with these (trainer) or hold them aside while Ultralytics parses the rest (validator).
"""

from __future__ import annotations

from typing import Any

from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

PLUGIN_DEFAULTS: dict[str, Any] = {
    "encoder": None,  # support encoder override (default: the model YAML's)
    "refs": None,  # reference folder or .safetensors bank (predict/track/export)
    "n_way": 4,  # classes per training episode (present + negatives)
    "k_max": 5,  # references per training prototype: K ~ U[1, k_max]
    "hard_negatives": 0.5,  # share of negative episode slots given to look-alike classes (most similar embeddings)
    "shots": "1,3,5",  # validation: references per class (list or comma string)
    "seeds": 1,  # validation: reference draws per shot count
    "views": 2,  # cached augmented views per training instance
    "fewshot_cache": None,  # embedding cache dir (default: <dataset root>/.yolo_fewshot_cache)
    "finetune": False,  # TFA-style: train on K shots (shots=K) of every class, novel included; backbone frozen
}

FEWSHOT_CFG = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **PLUGIN_DEFAULTS})


def parse_shots(v: Any) -> list[int]:
    """``"1,3,5"`` / ``[1, 3, 5]`` / ``3`` -> ``[1, 3, 5]`` with a clear error for anything else."""
    items = v if isinstance(v, (list, tuple)) else str(v).replace(" ", "").strip("[]()").split(",")
    try:
        shots = [int(x) for x in items if str(x)]
    except ValueError:
        raise ValueError(f"shots={v!r} must be positive integers, e.g. shots=1,3,5") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"shots={v!r} must be positive integers, e.g. shots=1,3,5")
    return shots
