"""FewShotDetect: Ultralytics' Detect run once per (image, reference class), merged to Ultralytics' output format.

The head sees the fusion neck's ``[B*N, C, H, W]`` maps and scores "is this the referenced object" with one class
channel (``nc=1``). :meth:`FewShotDetect.forward_head` folds the N per-class runs back into Ultralytics' raw prediction
dict: ``scores [B, N, A]`` (one column per reference class) and, per anchor, the box distribution of the class that
scores highest there (``boxes [B, 4*reg_max, A]``). Everything downstream — decoding, NMS, the loss, metrics,
``Results``, the Exporter — then works unchanged with ``N`` classes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from ultralytics.nn.modules.head import Detect

from .prototypes import PrototypeConsumer


class FewShotDetect(Detect, PrototypeConsumer):
    """Ultralytics ``Detect`` with one score per reference class and per-anchor box selection across classes."""

    @classmethod
    def yaml_build(cls, c_in: list[int], args: list[Any], ctx: dict[str, Any]) -> tuple[list[Any], int]:
        """YAML ``[[P2, P3, P4, P5], 1, FewShotDetect, [nc]]``: same arguments as Ultralytics gives ``Detect``."""
        cls.legacy = ctx["legacy"]
        return [1, ctx["reg_max"], bool(ctx["end2end"]), list(c_in)], 0  # a head has no output width

    def forward_head(self, x: list[Tensor], box_head=None, cls_head=None) -> dict[str, Tensor]:
        """Raw predictions for ``x`` (levels ``[B*N, C, H, W]``), merged over the N classes (see module docstring)."""
        preds = super().forward_head(x, box_head, cls_head)
        n = self.num_classes
        if not preds or n is None:
            return preds
        return merge_class_predictions(preds, n)


def merge_class_predictions(preds: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Fold per-(image, class) head outputs into one multi-class prediction per image.

    Args:
        preds: ``boxes [B*N, 4R, A]``, ``scores [B*N, 1, A]``, ``feats`` (levels ``[B*N, C, H, W]``).
        n: Number of classes N.

    Returns:
        ``boxes [B, 4R, A]`` (per anchor, from the highest-scoring class), ``scores [B, N, A]``, ``feats`` of the
        first class (only their shapes are used downstream, for anchors).
    """
    boxes, scores = preds["boxes"], preds["scores"]
    a = scores.shape[-1]
    scores = scores.reshape(-1, n, a)  # [B, N, A]
    boxes = boxes.reshape(scores.shape[0], n, -1, a)  # [B, N, 4R, A]
    best = scores.detach().argmax(1)  # [B, A]
    boxes = boxes.gather(1, best[:, None, None, :].expand(-1, 1, boxes.shape[2], -1)).squeeze(1)
    feats = [f.reshape(-1, n, *f.shape[1:])[:, 0] for f in preds["feats"]]
    return {**preds, "boxes": boxes, "scores": scores, "feats": feats}
