"""Colour histograms: kernel-weighted HSV histograms of boxes, compared by the Bhattacharyya coefficient.

Swain & Ballard, "Color Indexing", IJCV 1991 (an object's colour histogram identifies it among many); the kernel
weighting and the Bhattacharyya coefficient as in Comaniciu, Ramesh & Meer, "Kernel-Based Object Tracking", TPAMI
2003 (an Epanechnikov profile over the box, so the background in its corners counts little).

Why instance search needs it: the frozen ImageNet trunk's pooled features are built to ignore what an ImageNet class
does not depend on, and colour is much of that (a Granny Smith and a Fuji are both "apple"); at 20-60 px the trunk
sees little else. Colour is what tells one apple from its look-alikes. Coarse bins (8 hues x 3 saturations x 2
values) because the scenes' lighting and the pasting's blur move colours between fine bins; measured on fold 0's
instance scenes (``tools/probe_found.py``, found at <= 0.2 false positives per scene) coarser and finer ones did
worse (docs/instance-search.md, "Colour").
"""

from __future__ import annotations

import torch
from torch import Tensor

BINS: tuple[int, int, int] = (8, 3, 2)  # hue, saturation, value
# The Bhattacharyya coefficient of unrelated objects' histograms at these bins (fold 0's instance scenes: mean 0.31,
# median 0.25 over every candidate and reference): a coefficient above it is evidence for the class, below against.
UNRELATED: float = 0.3


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """``[..., 3, H, W]`` RGB in [0, 1] -> HSV ``[..., 3, H, W]``: hue in [0, 1) (a turn), saturation and value in
    [0, 1] (OpenCV's definition, scaled)."""
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(-3)
    mn, _ = rgb.min(-3)
    d = v - mn
    s = torch.where(v > 0, d / v.clamp_min(1e-8), torch.zeros_like(v))
    dd = d.clamp_min(1e-8)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))
    h = torch.where(d > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], -3)


def box_kernel(masks: Tensor) -> Tensor:
    """Epanechnikov weights ``[C, S, S]`` over each mask's box (``masks`` ``[C, 1, S, S]``: 1 inside an axis-aligned
    box): ``1 - r^2`` with ``r`` the distance to the box centre in half-sides, 0 outside the box."""
    m = masks[:, 0] > 0.5  # [C, S, S]
    s = m.shape[-1]
    grid = torch.arange(s, device=masks.device, dtype=torch.float32) + 0.5
    cols, rows = m.any(1).float(), m.any(2).float()  # [C, S]: the box's columns and rows

    def extent(on: Tensor) -> tuple[Tensor, Tensor]:  # first and last index + 1 of each row of ``on``
        n = on.sum(1).clamp_min(1)
        lo = torch.where(on > 0, grid, grid.new_tensor(float(s))).amin(1) - 0.5
        return lo, lo + n

    x1, x2 = extent(cols)
    y1, y2 = extent(rows)
    dx = (grid[None] - (x1 + x2)[:, None] / 2) / ((x2 - x1)[:, None] / 2)  # [C, S]
    dy = (grid[None] - (y1 + y2)[:, None] / 2) / ((y2 - y1)[:, None] / 2)
    k = (1 - dy[:, :, None] ** 2 - dx[:, None, :] ** 2).clamp_min(0)
    return k * m


def colour_histograms(crops: Tensor, masks: Tensor, bins: tuple[int, int, int] = BINS) -> Tensor:
    """Kernel-weighted HSV histograms of the boxes in crops.

    Args:
        crops: ``[C, 3, S, S]`` RGB in [0, 1] (the verifier's and the references' crops).
        masks: ``[C, 1, S, S]``, 1 inside the box (the object) and 0 in the crop's context.
        bins: Hue, saturation and value bins.

    Returns:
        ``[C, H * S * V]`` histograms summing to 1 (uniform where a box has no weight).
    """
    hb, sb, vb = bins
    hsv = rgb_to_hsv(crops.float().clamp(0, 1))
    h = (hsv[:, 0] * hb).long().clamp(0, hb - 1)
    s = (hsv[:, 1] * sb).long().clamp(0, sb - 1)
    v = (hsv[:, 2] * vb).long().clamp(0, vb - 1)
    idx = ((h * sb + s) * vb + v).flatten(1)  # [C, S*S]
    w = box_kernel(masks).flatten(1)
    n = hb * sb * vb
    out = torch.zeros(len(crops), n, device=crops.device).scatter_add_(1, idx, w)
    total = out.sum(1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-12), torch.full_like(out, 1 / n))


def colour_similarity(hists: Tensor, protos: Tensor, b: int, idx: Tensor) -> Tensor:
    """Bhattacharyya coefficient ``[C, N]`` (in [0, 1]; 1: the same histogram) of each crop's histogram ``[C, H]``
    (image ``idx`` of ``b``) with each class's ``protos`` ``[B|1, N, H]`` (the mean of its references')."""
    q = protos.to(hists).clamp_min(0).expand(b, -1, -1)[idx]  # [C, N, H]
    return (q.sqrt() @ hists.clamp_min(0).sqrt()[:, :, None]).squeeze(-1)
