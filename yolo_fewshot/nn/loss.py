"""Ultralytics' detection loss with a class count that follows the bound prototypes (one per reference class)."""

from __future__ import annotations

from ultralytics.utils.loss import v8DetectionLoss


class EpisodicDetectionLoss(v8DetectionLoss):
    """``v8DetectionLoss`` whose number of classes is the episode's (the head itself scores one class at a time)."""

    def set_num_classes(self, n: int) -> None:
        """Use ``n`` classes for target assignment and the classification loss."""
        if n != self.nc:
            self.nc = n
            self.no = n + self.reg_max * 4
            self.assigner.num_classes = n
