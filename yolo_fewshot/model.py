"""FewShotYOLO: the user-facing model, an Ultralytics ``Model`` whose detection task builds a FewShotDetectionModel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from ultralytics.engine.model import Model
from ultralytics.models import yolo
from ultralytics.utils import DEFAULT_CFG_DICT

from .configs import load_model_yaml
from .nn.detector import FewShotDetectionModel


class FewShotYOLO(Model):
    """Reference-image YOLO detector.

    Args:
        model: A model YAML (``yolov8n-psalm-p2.yaml``; shipped names resolve without a path) or a ``.pt`` checkpoint.
        task: Only ``detect``.
        verbose: Print the layer table when building from YAML.

    Examples:
        >>> model = FewShotYOLO("yolov8n-psalm-p2.yaml")
        >>> model.info()
    """

    def __init__(
        self, model: str | Path = "yolov8n-psalm-p2.yaml", task: str | None = None, verbose: bool = False
    ) -> None:
        if task not in (None, "detect"):
            raise ValueError(f"FewShotYOLO supports task='detect' only, got task='{task}'")
        super().__init__(model=model, task="detect", verbose=verbose)
        if isinstance(self.model, nn.Module) and not isinstance(self.model, FewShotDetectionModel):
            raise TypeError(
                f"{model} is a plain Ultralytics model, not a few-shot one; load it with ultralytics.YOLO or "
                "train a few-shot model with `yolo-fewshot train model=yolov8n-psalm-p2.yaml`"
            )

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        """Detection only; engine classes are Ultralytics' (specialised in their own modules as they land)."""
        return {
            "detect": {
                "model": FewShotDetectionModel,
                "trainer": yolo.detect.DetectionTrainer,
                "validator": yolo.detect.DetectionValidator,
                "predictor": yolo.detect.DetectionPredictor,
            }
        }

    def _new(self, cfg: str, task: str | None = None, model: Any = None, verbose: bool = False) -> None:
        """Build from one of our YAMLs (resolved by :func:`~yolo_fewshot.configs.load_model_yaml`)."""
        cfg_dict = load_model_yaml(cfg)
        self.cfg, self.task = str(cfg), "detect"
        self.model = (model or FewShotDetectionModel)(cfg_dict, verbose=verbose)
        self.overrides.update(model=self.cfg, task=self.task)
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}
        self.model.task = self.task
        self.model_name = self.cfg

    def set_prototypes(
        self, protos: Tensor | Sequence[Tensor] | None, names: Sequence[str] | dict | None = None
    ) -> FewShotYOLO:
        """Set the detector's reference prototypes (see :meth:`FewShotDetectionModel.set_prototypes`)."""
        self.model.set_prototypes(protos, names)
        if self.predictor is not None:  # a cached predictor holds the old class names
            self.predictor = None
        return self
