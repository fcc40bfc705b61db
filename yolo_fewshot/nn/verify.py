"""CropVerifier: re-score the best candidate boxes by encoding their crops with the trunk and comparing with the
prototypes.

The second stage of two-stage matching detectors (DE-ViT re-classifies proposals from the same frozen backbone; the
one-shot trackers' verification re-encodes the candidate). A box pooled from the one-pass scene map mixes its
surroundings into it; re-encoding the crop alone, the way the reference itself was encoded, ranks a target's own
reference first among the objects of its scene 95 % of the time on the benchmark, against 83 % from the one-pass map
(probe in issue 11). The cost is one trunk pass over ``topk`` small crops per image, so it is optional and measured
(README, benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, roi_align

from ..encoders.base import masked_mean


@dataclass
class CropVerifier:
    """Settings and the re-scoring step of crop verification.

    Attributes:
        topk: Candidates per image (after a class-agnostic NMS on the head's best class score).
        size: Crop side fed to the trunk (pixels).
        context: Context around each box, as a fraction of its longer side on each side (references use 0.1).
        iou: IoU of the candidate NMS.
        obj_power: Exponent of the head's objectness in the verified score.
        sim_power: Exponent of the crop cosine (clamped at 0) in the verified score.
        top1: Keep each candidate only for its most similar class (an object is one thing).
    """

    topk: int = 10
    size: int = 128
    context: float = 0.1
    iou: float = 0.6
    obj_power: float = 0.5
    sim_power: float = 4.0
    top1: bool = True

    @torch.no_grad()
    def __call__(self, trunk, img: Tensor, y: Tensor, obj: Tensor, protos: Tensor) -> Tensor:
        """Re-score ``y``: candidates get the verified score, every other anchor 0.

        Args:
            trunk: The detector's trunk, ``[K, 3, S, S]`` in [0, 1] -> list of level maps (the last is compared).
            img: The model's input ``[B, 3, H, W]`` in [0, 1].
            y: Decoded predictions ``[B, 4 + N, A]`` (xywh in input pixels, class probabilities).
            obj: Objectness logits ``[B, 1, A]``.
            protos: Last-level prototypes ``[B|1, N, M, D]``.

        Returns:
            ``[B, 4 + N, A]`` with the same boxes.
        """
        b, a = y.shape[0], y.shape[-1]
        boxes = xywh_to_xyxy(y[:, :4].transpose(1, 2))  # [B, A, 4]
        best = y[:, 4:].amax(1)  # [B, A]
        cand = []
        for i in range(b):
            k = min(a, max(self.topk * 10, 300))
            top = best[i].topk(k).indices
            keep = batched_nms(boxes[i, top], best[i, top], torch.zeros_like(top), self.iou)[: self.topk]
            cand.append(top[keep])
        idx = torch.cat([torch.full_like(c, i) for i, c in enumerate(cand)])
        anchors = torch.cat(cand)
        crops, masks = self.crops(img, idx, boxes[idx, anchors])
        emb = masked_mean(trunk(crops)[-1], masks)  # [C, D]
        q = F.normalize(protos.mean(2), dim=-1, eps=1e-6).expand(b, -1, -1)[idx]  # [C, N, D]
        cos = (q @ F.normalize(emb, dim=-1, eps=1e-6)[:, :, None]).squeeze(-1)  # [C, N]
        score = cos.clamp_min(0).pow(self.sim_power) * obj[idx, 0, anchors].sigmoid().pow(self.obj_power)[:, None]
        if self.top1:
            score = score * F.one_hot(cos.argmax(1), cos.shape[1]).to(score)
        out = y.clone()
        out[:, 4:] = 0
        out[idx, 4:, anchors] = score.to(y.dtype)
        return out

    def crops(self, img: Tensor, idx: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Square, aspect-preserving crops ``[C, 3, S, S]`` around ``boxes`` (xyxy, image ``idx``) with ``context``,
        and masks ``[C, 1, S, S]`` of the box inside each crop — the reference crops' layout."""
        wh = boxes[:, 2:] - boxes[:, :2]
        side = wh.amax(1).clamp_min(2) * (1 + 2 * self.context)
        ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
        win = torch.cat([ctr - side[:, None] / 2, ctr + side[:, None] / 2], 1)  # [C, 4]
        crops = roi_align(img, torch.cat([idx[:, None].to(win), win], 1), self.size, 1.0, 2, aligned=True)
        # the box inside its window, in crop pixels
        inner = (boxes - win[:, :2].repeat(1, 2)) / side[:, None] * self.size
        grid = torch.arange(self.size, device=img.device, dtype=img.dtype) + 0.5
        mx = (grid[None] >= inner[:, 0:1]) & (grid[None] <= inner[:, 2:3])  # [C, S]
        my = (grid[None] >= inner[:, 1:2]) & (grid[None] <= inner[:, 3:4])
        masks = (my[:, :, None] & mx[:, None, :]).to(img.dtype)[:, None]
        return crops, masks


def xywh_to_xyxy(b: Tensor) -> Tensor:
    """``[..., 4]`` centre-size boxes -> corner boxes."""
    xy, wh = b[..., :2], b[..., 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], -1)
