"""Training losses: Ultralytics' detection loss for the per-class head, and its class-agnostic + prototype-similarity
counterpart for :class:`~yolo_fewshot.nn.prototype_detect.PrototypeDetect`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from ultralytics.utils.loss import v8DetectionLoss


class EpisodicDetectionLoss(v8DetectionLoss):
    """``v8DetectionLoss`` whose number of classes is the episode's (the head itself scores one class at a time)."""

    def set_num_classes(self, n: int) -> None:
        """Use ``n`` classes for target assignment and the classification loss."""
        if n != self.nc:
            self.nc = n
            self.no = n + self.reg_max * 4
            self.assigner.num_classes = n


class PrototypeDetectionLoss(v8DetectionLoss):
    """Class-agnostic detection loss plus a similarity loss on the anchors assigned to objects.

    * Boxes, DFL and objectness: Ultralytics' own loss and task-aligned assignment with every labelled box as one
      class "object" — objectness learns from all boxes, including those of classes the episode does not ask about.
    * Similarity (``sim_loss``, gain ``hyp.cls``): at each foreground anchor, BCE of the N similarity logits against
      the one-hot episode slot of its assigned box — 1 for the object's own class, 0 for every other class of the
      episode (the sampled negatives and look-alikes), all 0 for an object of a class not asked about. Empty slots
      (all-zero prototypes) are left out. This teaches a metric (same class close, look-alikes far), not the base
      classes themselves.

    Labels: ``batch["cls"]`` holds the episode slot of each box, -1 for a box of a class not in its image's episode.
    """

    def __init__(self, model: Any, tal_topk: int = 10, tal_topk2: int | None = None) -> None:
        super().__init__(model, tal_topk, tal_topk2)
        self.loss_names = (*self.loss_names, "sim_loss")

    def loss(self, preds: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss ``[4] * batch size`` and its detached items (box, cls = objectness, dfl, sim)."""
        bs = preds["boxes"].shape[0]
        agnostic = {**batch, "cls": torch.zeros_like(batch["cls"])}
        (fg, gt_idx, *_), det, _ = self.get_assigned_targets_and_loss({**preds, "scores": preds["obj"]}, agnostic)
        sim = preds.get("sim")
        sim_loss = det.new_zeros(())
        if sim is not None and fg.any():
            sim_loss = self.similarity_loss(sim, fg, gt_idx, batch, bs) * self.hyp.cls
        loss = torch.cat([det, sim_loss[None]])
        return loss * bs, dict(zip(self.loss_names, loss.detach()))

    def similarity_loss(self, sim: Tensor, fg: Tensor, gt_idx: Tensor, batch: dict[str, Any], bs: int) -> Tensor:
        """Mean BCE over (foreground anchor, non-empty slot) pairs (see class docstring)."""
        n = sim.shape[1]
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1).float() + 1, batch["bboxes"]), 1)
        padded = self.preprocess(targets.to(self.device), bs, torch.ones(4, device=self.device))  # [B, G, 5]
        slot = padded[..., 0].long().sub(1).gather(1, gt_idx)[fg]  # [F]: slot of each fg anchor's box, -1 none
        onehot = F.one_hot(slot.clamp(min=0), n).float() * (slot >= 0)[:, None]
        logits = sim.permute(0, 2, 1)[fg]  # [F, N]
        valid = torch.ones_like(logits)
        protos = batch.get("protos")
        if protos is not None:  # empty episode slots carry all-zero prototypes
            filled = protos[-1].abs().flatten(2).sum(-1) > 0  # [B, N]
            valid = filled[:, None, :].expand(-1, fg.shape[1], -1)[fg].float()
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * valid
        return bce.sum() / valid.sum().clamp_min(1)
