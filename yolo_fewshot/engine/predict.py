"""FewShotPredictor: Ultralytics' DetectionPredictor whose saved and shown images carry the reference thumbnails.

Prediction itself is Ultralytics' own (the references are model state); only the picture a user looks at changes:
one small photo per reference class, with its name, drawn over the top-left corner so frame sizes (and videos) stay
as Ultralytics writes them. Saved images are written through :func:`yolo_fewshot.atomic.write_image`, so one that
cannot be written (a full disk) is an error, not a "Results saved" over an empty folder.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.models.yolo.detect import DetectionPredictor

from ..atomic import write_image
from .cfg import cpu_threads


def with_thumbnails(img: np.ndarray, thumbs: dict[str, np.ndarray], size: int = 64, pad: int = 4) -> np.ndarray:
    """A copy of the BGR image ``img`` with the RGB ``thumbs`` (name -> ``[T, T, 3]`` uint8) in a row at its top-left;
    thumbnails shrink to fit the image's width."""
    if not thumbs:
        return img
    out = img.copy()
    h, w = out.shape[:2]
    s = int(min(size, (w - pad) // len(thumbs) - pad, h // 3))
    if s < 12:
        return img
    x = pad
    for name, t in thumbs.items():
        tile = cv2.resize(np.ascontiguousarray(np.asarray(t)[..., ::-1]), (s, s), interpolation=cv2.INTER_AREA)
        out[pad : pad + s, x : x + s] = tile
        cv2.rectangle(out, (x - 1, pad - 1), (x + s, pad + s), (255, 255, 255), 1)
        cv2.putText(
            out,
            name[:10],
            (x + 2, pad + s - 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            max(0.3, s / 160),
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        x += s + pad
    return out


class FewShotPredictor(DetectionPredictor):
    """Ultralytics' predictor; saved/shown images show which references were searched for."""

    def setup_model(self, model, verbose: bool = True) -> None:
        """Ultralytics' model setup; on CPU, torch then uses every core (Ultralytics' device selection leaves one
        idle: 1 thread on a 2-core machine)."""
        super().setup_model(model, verbose)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())

    def _thumbs(self) -> dict:
        return getattr(getattr(self.model, "model", None), "reference_thumbnails", None) or {}

    def save_predicted_images(self, save_path, frame: int | None = 0):
        plotted, self.plotted_img = self.plotted_img, with_thumbnails(self.plotted_img, self._thumbs())
        try:
            if self.dataset.mode in {"stream", "video"}:
                return super().save_predicted_images(save_path, frame)
            write_image(Path(save_path).with_suffix(".jpg"), self.plotted_img)  # JPG, as Ultralytics; checked
        finally:
            self.plotted_img = plotted

    def show(self, p: str = ""):
        plotted, self.plotted_img = self.plotted_img, with_thumbnails(self.plotted_img, self._thumbs())
        try:
            return super().show(p)
        finally:
            self.plotted_img = plotted
