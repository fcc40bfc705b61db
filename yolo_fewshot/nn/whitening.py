"""Learned whitening of the trunk's descriptors for instance search: the photo-to-scene nuisance divided out.

Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018, §3.3 (learned
whitening from matching pairs); Mikolajczyk & Matas, "Improving descriptors for fast tree matching by optimal linear
projection", ICCV 2007.

A reference is a photo of the object alone, large and sharp; the object in a scene is small, blurred, recoloured by
its light and surrounded by clutter. The frozen ImageNet trunk's masked means move with all of that, in a few
directions much more than in others, and a cosine weighs every direction alike. The whitening learns those
directions from matching pairs — an object in a training scene and a reference photo of the same object — and shrinks
them: per level, a descriptor ``x`` (L2-normalised) becomes ``normalize((x - m) @ C_S^-p)``, ``m`` the mean of all
the pairs' descriptors, ``C_S`` the covariance of the pairs' differences shrunk towards its mean eigenvalue
(``C_S + s * tr(C_S) / D * I``) and ``p`` 1/2. Candidates, references, their layouts' cells and the hubness bank
are all compared in the whitened space.

The statistic needs the identity of each training object (which object every box is, and a photo of it), which the
benchmark's scenes carry (:func:`~yolo_fewshot.engine.train.training_whitening`); pairs of two members of one class
do not teach it (fold 0, ground-truth boxes: the target's own reference the most similar in 74.6 % of the objects
raw, 72.9-74.8 % whitened on class pairs, 82.9 % on identity pairs). It is stored with the model (``whitening.*``
tensors), like the hubness bank; a model without it compares raw cosines.

Measured in docs/instance-search.md, "Whitening, 224-px crops, keypoint candidates": instance search
found at <= 0.2 false positives per scene (``tools/probe_found.py``, 128-px crops) fold 0 75.3 -> 77.5 %, the demo's
scenes 72.4 -> 74.8 %; with 224-px crops 78.8 % and 78.7 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PREFIX = "whitening."  # its tensors in a pretrained file: ``whitening.mean.0``, ``whitening.matrix.0``, ...


@torch.no_grad()
def fit_whitening(scene: Tensor, photo: Tensor, shrinkage: float = 0.1, power: float = 0.5) -> tuple[Tensor, Tensor]:
    """One level's whitening from matching pairs.

    Args:
        scene: Descriptors of objects in scenes ``[P, D]``.
        photo: Descriptors of a reference photo of the same object, row by row ``[P, D]``.
        shrinkage: Weight of the mean eigenvalue added to the differences' covariance (0.1: fold 0's best of
            0.01-1; it keeps the directions the pairs never varied in from being blown up).
        power: ``C_S^-power`` (0.5: full whitening; 0.25 was lower: the demo's scenes 74.0 against 74.8 % found).

    Returns:
        The mean ``[D]`` and the matrix ``[D, D]`` (symmetric), float32.
    """
    if scene.shape != photo.shape or scene.ndim != 2 or len(scene) < 2:
        shapes = f"{tuple(scene.shape)}, {tuple(photo.shape)}"
        raise ValueError(f"whitening needs matching [P, D] pairs, P >= 2; got {shapes}")
    x = F.normalize(scene.double(), dim=-1, eps=1e-6)
    r = F.normalize(photo.double(), dim=-1, eps=1e-6)
    mean = torch.cat([x, r]).mean(0)
    diff = x - r
    cov = diff.T @ diff / len(diff)
    d = cov.shape[0]
    cov = cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    e, u = torch.linalg.eigh(cov)
    matrix = u @ torch.diag(e.clamp_min(1e-12).pow(-power)) @ u.T
    return mean.float(), matrix.float()


def whiten(x: Tensor, mean: Tensor, matrix: Tensor) -> Tensor:
    """Descriptors ``[..., D]`` -> whitened unit vectors ``[..., D]`` (float32): ``normalize((normalize(x) - mean)
    @ matrix)``."""
    x = F.normalize(x.float(), dim=-1, eps=1e-6)
    return F.normalize((x - mean.to(x)) @ matrix.to(x), dim=-1, eps=1e-6)


def whiten_cells(x: Tensor, mean: Tensor, matrix: Tensor) -> Tensor:
    """Layouts ``[..., G * G * D]`` (:mod:`~yolo_fewshot.nn.layout`) -> each ``D``-cell whitened (empty cells stay
    empty), the whole renormalised."""
    d = mean.shape[0]
    cells = x.float().reshape(*x.shape[:-1], -1, d)
    full = cells.norm(dim=-1, keepdim=True) > 1e-8
    return F.normalize((whiten(cells, mean, matrix) * full).flatten(-2), dim=-1, eps=1e-6)


class Whitening:
    """A model's whitening: per level (the trunk's last ``L``: P3-P5 for Lite0) a mean and a matrix.

    Args:
        tensors: ``{"mean.<l>": [D_l], "matrix.<l>": [D_l, D_l]}`` for ``l`` in ``0..L-1``, as stored.
    """

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.levels = check_whitening(tensors)
        self.tensors = {k: v.float() for k, v in tensors.items()}

    def level(self, i: int, of: int) -> tuple[Tensor, Tensor] | None:
        """The mean and matrix of level ``i`` of ``of`` compared levels (counted from the last, as the prototypes'
        last levels are); None when the model's whitening does not reach that far."""
        j = self.levels - of + i
        if not 0 <= j < self.levels:
            return None
        return self.tensors[f"mean.{j}"], self.tensors[f"matrix.{j}"]

    def __call__(self, x: Tensor, i: int, of: int) -> Tensor:
        """Level ``i`` of ``of``'s descriptors ``[..., D]`` whitened (normalised only where the level has none)."""
        w = self.level(i, of)
        return F.normalize(x.float(), dim=-1, eps=1e-6) if w is None else whiten(x, *w)

    def cells(self, x: Tensor, i: int, of: int) -> Tensor:
        """Level ``i`` of ``of``'s layouts ``[..., G * G * D]`` whitened cell by cell (normalised where none)."""
        w = self.level(i, of)
        return F.normalize(x.float(), dim=-1, eps=1e-6) if w is None else whiten_cells(x, *w)


def check_whitening(tensors: dict[str, Tensor], dims: Sequence[int] | None = None) -> int:
    """The number of levels of a stored whitening; raises ``ValueError`` in one line for a malformed one.

    Args:
        tensors: ``mean.<l>`` ``[D_l]`` and ``matrix.<l>`` ``[D_l, D_l]``.
        dims: The model's prototype dimensions (its last levels), checked when given.
    """
    levels = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("mean.") and k.split(".")[1].isdigit())
    want = {f"{kind}.{i}" for kind in ("mean", "matrix") for i in range(len(levels))}
    if not levels or set(tensors) != want:
        raise ValueError(f"whitening has tensors {sorted(tensors)[:6]}; expected mean.<l> and matrix.<l> per level")
    got = []
    for i in range(len(levels)):
        m, w = tensors[f"mean.{i}"], tensors[f"matrix.{i}"]
        if m.ndim != 1 or tuple(w.shape) != (len(m), len(m)):
            shapes = f"mean {tuple(m.shape)} and matrix {tuple(w.shape)}"
            raise ValueError(f"whitening level {i}: {shapes} must be [D] and [D, D]")
        if not (torch.isfinite(m).all() and torch.isfinite(w).all()):
            raise ValueError(f"whitening level {i} holds non-finite values")
        got.append(len(m))
    if dims is not None and got != list(dims)[-len(got) :]:
        raise ValueError(f"whitening of dimensions {got} does not fit the model's prototypes {list(dims)}")
    return len(levels)
