"""Run settings the plugin adds to Ultralytics' (``yolo-fewshot train ... n_way=4``) and their defaults.

Ultralytics' config checker rejects unknown keys, so the engine classes are given Ultralytics' defaults extended
with these (trainer) or hold them aside while Ultralytics parses the rest (validator).
"""

from __future__ import annotations

import os
from typing import Any

from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

from ..references.cache import VIEWS

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
    "verify": True,  # prototype-head models: re-score the top boxes by encoding their crops (off: one pass only)
    # verification's candidates: head (its best boxes), centernet (COCO CenterNet's), keypoints (SIFT matches of the
    # references), joined by "+"; both = head+centernet; None: the verifier's default (head+centernet+keypoints with
    # top1, both without)
    "proposals": None,
    "top1": True,  # verification: classes compete for a box (references are instances); False for category search
    # verification: weight of instance search's hubness correction (nn/hubness.py); None: the verifier's default (0.5
    # with top1, 0 without), 0: off (e.g. when the model's training scenes hold the very objects searched for)
    "hubness": None,
    # verification: weight of instance search's colour histograms (nn/colour.py); None: the verifier's default (0.15
    # with top1, 0 without; grey frames skip it by themselves), 0: off (e.g. where lighting changes colours)
    "colour": None,
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


def check_settings(args: Any) -> None:
    """Refuse a bad plugin setting (``n_way=0``, ``seeds=-1``, ...) with one line, before any work: engine classes call
    this first, so a typo costs no dataset scan and no embedding pass. ``args``: a dict or namespace; absent keys are
    not checked.

    Raises:
        ValueError: Naming the key, its value and what it must be.
    """
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)

    def integer(key: str, lo: int, hi: int | None = None) -> None:
        v = get(key)
        if v is None:
            return
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        if not ok:
            want = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise ValueError(f"{key}={v!r} must be an integer {want}")

    integer("n_way", 1)  # classes per training episode
    integer("k_max", 1)  # references per training prototype
    integer("views", 1, len(VIEWS))  # cached augmented views per instance
    integer("seeds", 1)  # reference draws per shot count
    hn = get("hard_negatives")
    if hn is not None and (isinstance(hn, bool) or not isinstance(hn, (int, float)) or not 0 <= hn <= 1):
        raise ValueError(f"hard_negatives={hn!r} must be a number in [0, 1]")
    if get("shots") is not None:
        parse_shots(get("shots"))
    if get("top1") is not None and not isinstance(get("top1"), bool):
        raise ValueError(f"top1={get('top1')!r} must be True or False")
    for key in ("hubness", "colour"):
        if get(key) is not None:
            from ..nn.verify import check_weight

            check_weight(key, get(key))
    if get("proposals") is not None:
        from ..nn.verify import check_proposals

        check_proposals(get("proposals"))


def cpu_threads() -> int:
    """Torch threads for CPU work: every core (Ultralytics sets ``cpu_count - 1``, i.e. 1 on a 2-core machine, which
    halves the speed of a CPU training run). ``OMP_NUM_THREADS``, when set, wins."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, os.cpu_count() or 1)
