"""Hubness reduction for instance search: each reference's similarity lowered by how close it is to generic objects.

Conneau, Lample, Ranzato, Denoyer & Jégou, "Word translation without parallel data", ICLR 2018 (cross-domain
similarity local scaling, CSLS); the hubness problem of nearest-neighbour search in high dimensions: Radovanović,
Nanopoulos & Ivanović, "Hubs in space", JMLR 2010.

In a high-dimensional embedding some points are near everything (hubs). Among 44 references of apples, tomatoes and
flowers, a reference that is a hub takes other objects' candidates (the target's best reference is another object's,
and that other object is not even in the scene) and passes its threshold on clutter, while a reference far from
everything never reaches it. CSLS corrects each reference by its mean similarity ``h_r`` to its ``k`` nearest
neighbours in a *bank* of generic objects: the similarity becomes ``cos - lam * (h_r - mean_r h_r)``, centred so that
the scores' overall scale (the calibration, :attr:`~yolo_fewshot.nn.verify.CropVerifier.gamma`) stays where it was.
The bank is what the candidates are — crops of labelled objects of the model's training scenes, cut and encoded as
verification cuts candidates — stored with the model (``hubness_bank``, a statistic of its training data like
``coco_center``). With one reference the offset is 0 by construction.

Measured (``tools/probe_found.py --fold F --model M`` against ``--csls 0``: instance search over a fold's 150
scenes, found at ≤ 0.2 false positives per scene; docs/instance-search.md): fold 0, the shipped model and
its bank of 1 024 training-scene objects, 65.9 → 73.1 %; fold 2, its own weights and bank, 43.7 → 46.8 %; validator
instance 1-shot AP50 0.867 → 0.871 and 0.646 → 0.653. Offline on fold 0's record: a bank of reference photos instead of
scene crops 64.1 % (a reference is framed unlike a candidate). The bank must not hold the objects searched for: fold 1
searched by the shipped model, whose training scenes (its bank) hold fold 1's very stamps, 57.3 → 56.0 % (57.7 % with a
bank of fold 1's own training scenes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.base import masked_mean
from .layout import GRID, layout_pool
from .whitening import Whitening

BANK_PREFIX = "hubness_bank."  # the bank's tensors in a pretrained file: ``hubness_bank.means.0``, ``.layouts.0``, ...


@torch.no_grad()
def bank_embeddings(
    trunk: Callable[[Tensor], Sequence[Tensor]], crops: Tensor, masks: Tensor, levels: int = 3, grid: int = GRID
) -> dict[str, Tensor]:
    """A bank's embeddings: the crops' normalised masked means and layouts on the trunk's last ``levels`` levels.

    Args:
        trunk: ``[K, 3, S, S]`` in [0, 1] -> level maps (P2..P5), the detector's own trunk.
        crops: Object crops ``[K, 3, S, S]`` in [0, 1], cut as verification cuts candidates
            (:meth:`~yolo_fewshot.nn.verify.CropVerifier.crops`).
        masks: Their boxes inside the crops ``[K, 1, S, S]``.
        levels: How many of the last levels.
        grid: Layout cells per side (:mod:`~yolo_fewshot.nn.layout`).

    Returns:
        ``{"means.<l>": [K, D_l], "layouts.<l>": [K, G * G * D_l]}`` for ``l`` in ``0..levels-1`` (float32, CPU),
        which :func:`merge_banks` concatenates and :func:`bank_similarity` reads.
    """
    feats = trunk(crops)[-levels:]
    out = {}
    for i, f in enumerate(feats):
        out[f"means.{i}"] = F.normalize(masked_mean(f.float(), masks.float()), dim=-1, eps=1e-6).cpu()
        out[f"layouts.{i}"] = layout_pool(f.float(), masks.float(), grid).cpu()
    return out


def merge_banks(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate banks (:func:`bank_embeddings` of successive batches) row-wise."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def check_bank(bank: dict[str, Tensor], dims: Sequence[int] | None = None) -> int:
    """The number of objects in ``bank``; raises ``ValueError`` in one line for a malformed one.

    Args:
        bank: ``means.<l>`` ``[K, D_l]`` and ``layouts.<l>`` ``[K, G * G * D_l]`` for the same levels.
        dims: The model's prototype dimensions per level (its last ``len`` levels), checked when given.
    """
    levels = sorted(int(k.split(".")[1]) for k in bank if k.startswith("means."))
    want = {f"{kind}.{i}" for kind in ("means", "layouts") for i in range(len(levels))}
    if not levels or set(bank) != want:
        raise ValueError(f"hubness bank has tensors {sorted(bank)[:6]}; expected means.<l> and layouts.<l> per level")
    rows = {t.shape[0] if t.ndim == 2 else -1 for t in bank.values()}
    if len(rows) != 1 or -1 in rows or not rows.pop():
        shapes = [tuple(t.shape) for t in bank.values()]
        raise ValueError(f"hubness bank tensors must be [K, D] with one K > 0, got {shapes}")
    if not all(torch.isfinite(t).all() for t in bank.values()):
        raise ValueError("hubness bank holds non-finite values")
    if dims is not None:
        got = [bank[f"means.{i}"].shape[1] for i in range(len(levels))]
        if got != list(dims)[-len(levels) :]:
            raise ValueError(f"hubness bank of dimensions {got} does not fit the model's prototypes {list(dims)}")
        for i, d in enumerate(got):
            g = bank[f"layouts.{i}"].shape[1] / d
            if g != int(g) or round(g**0.5) ** 2 != g:
                raise ValueError(f"hubness bank layouts.{i} of width {int(g * d)} are no grid of {d}-d cells")
    return bank["means.0"].shape[0]


def bank_similarity(
    bank: dict[str, Tensor],
    protos: Sequence[Tensor],
    layouts: Sequence[Tensor] | None,
    share: float,
    levels: int,
    white: Whitening | None = None,
) -> Tensor:
    """Similarity ``[B|1, N, K]`` of each class with each bank object, as verification compares a candidate
    (:meth:`~yolo_fewshot.nn.verify.CropVerifier.compare` without votes): the masked-mean cosine over the last
    ``levels`` levels, mixed with the layouts' (the better of direct and mirrored) at ``share``.

    Args:
        bank: :func:`bank_embeddings`' tensors (at least ``levels`` levels).
        protos: Per level the prototypes ``[B|1, N, M, D_l]`` (the trunk's last levels).
        layouts: Per level the classes' layouts ``[B|1, N, 2, G * G * D_l]``, or None (masked means only).
        share: The layouts' share (0-1).
        levels: How many of the last levels are compared.
        white: The model's whitening (:mod:`~yolo_fewshot.nn.whitening`), applied to the classes as verification
            applies it to references, with ``bank`` whitened by :func:`whiten_bank` (once per model); None: raw
            cosines.
    """
    have = sum(k.startswith("means.") for k in bank)
    n = min(levels, have, len(protos))
    cos = 0
    if share < 1 or not layouts:
        for j, (i, p) in enumerate(zip(range(have - n, have), protos[-n:])):
            q, e = p.float().mean(2), bank[f"means.{i}"].float()  # [B|1, N, D], [K, D]
            q = white(q, j, n) if white is not None else F.normalize(q, dim=-1, eps=1e-6)
            cos = cos + q @ e.to(q).T
        cos = cos / n
    if share > 0 and layouts:
        m = min(n, len(layouts))
        lay = 0
        for j, (i, t) in enumerate(zip(range(have - m, have), layouts[-m:])):
            q, e = t.float(), bank[f"layouts.{i}"].float()  # [B|1, N, 2, G*G*D], [K, G*G*D]
            q = white.cells(q, j, m) if white is not None else F.normalize(q, dim=-1, eps=1e-6)
            lay = lay + torch.einsum("bnvd,kd->bnkv", q, e.to(q)).amax(-1)
        cos = (1 - share) * cos + share * lay / m
    return cos


def whiten_bank(bank: dict[str, Tensor], white: Whitening) -> dict[str, Tensor]:
    """A bank's tensors in the model's whitening (float32): masked means whitened, layouts cell by cell — what
    :func:`bank_similarity` compares whitened classes with. A statistic of the model: computed once, not per frame
    (44 classes against 1 024 objects: 35 ms a frame whitened each time, 5 ms raw)."""
    have = sum(k.startswith("means.") for k in bank)
    out = {}
    for i in range(have):
        out[f"means.{i}"] = white(bank[f"means.{i}"], i, have)
        out[f"layouts.{i}"] = white.cells(bank[f"layouts.{i}"], i, have)
    return out


def hubness_offset(sim: Tensor, k: int = 10, lam: float = 0.5) -> Tensor:
    """CSLS offsets ``[B|1, N]`` from the classes' similarities to a bank ``sim`` ``[B|1, N, K]``:
    ``lam * (h - mean h)``, ``h`` each class's mean over its ``k`` most similar bank objects; 0 with one class.

    Args:
        sim: :func:`bank_similarity`.
        k: Nearest bank objects averaged (10: the probe's best with ``lam`` 0.5 on fold 0; 50 with 0.75 about equal).
        lam: The offset's weight.
    """
    h = sim.topk(min(k, sim.shape[-1]), dim=-1).values.mean(-1)  # [B|1, N]
    return lam * (h - h.mean(-1, keepdim=True))
