"""Zero-training baseline: the support encoder's cosine similarity over multi-scale sliding windows.

What a user can do with no detector at all: embed every window of the image with the same frozen encoder that
embeds the references, and call a window the class whose prototype it is most similar to. The benchmark runs it
next to the trained detectors so their gain over "just the encoder" is measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision

from ..encoders.base import SupportEncoder
from ..references.crops import crop_array


def sliding_windows(
    w: int, h: int, sizes: Sequence[float] = (0.15, 0.25, 0.4, 0.6), overlap: float = 0.5
) -> np.ndarray:
    """Square windows (xyxy px) whose sides are ``sizes`` of the image's short side, at ``overlap``; ``[W, 4]``."""
    out = []
    for frac in sizes:
        s = max(8, int(round(frac * min(w, h))))
        step = max(1, int(s * (1 - overlap)))
        xs = list(range(0, max(1, w - s + 1), step))
        ys = list(range(0, max(1, h - s + 1), step))
        if xs[-1] != w - s and w > s:
            xs.append(w - s)  # cover the right / bottom edge too
        if ys[-1] != h - s and h > s:
            ys.append(h - s)
        out += [(x, y, x + s, y + s) for y in ys for x in xs]
    return np.asarray(out, np.float32)


class WindowMatcher:
    """Embed windows and references with one encoder; detections = windows by cosine similarity.

    Args:
        encoder: A frozen support encoder (its last level, pooled over tokens, is the embedding).
        size: Crop side the windows and references are encoded at (smaller than the encoder's default for speed).
    """

    def __init__(self, encoder: SupportEncoder, size: int = 128) -> None:
        self.encoder, self.size = encoder.eval(), size

    def embed(self, image: np.ndarray, boxes: np.ndarray, context: float = 0.0) -> torch.Tensor:
        """``[N, D]`` L2-normalised embeddings of ``boxes`` (xyxy px) in an RGB ``image``."""
        crops = [crop_array(image, b.tolist(), self.size, context)[0] for b in boxes]
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
        emb = self.encoder.encode(x)[-1].mean(1)  # last level, mean over tokens: [N, D]
        return torch.nn.functional.normalize(emb, dim=-1)

    def detect(
        self, windows: np.ndarray, emb: torch.Tensor, prototypes: torch.Tensor, iou: float = 0.5, max_det: int = 100
    ) -> list[tuple[list[float], float, int]]:
        """Each window votes for its most similar prototype (``[C, D]``, normalised); class-wise NMS.

        Returns:
            ``(box xyxy, score, class index)`` with score = cosine similarity, best first.
        """
        sim = emb @ prototypes.T  # [W, C]
        score, cls = sim.max(1)
        keep = torchvision.ops.batched_nms(torch.from_numpy(windows), score, cls, iou)[:max_det]
        return [(windows[i].tolist(), float(score[i]), int(cls[i])) for i in keep.tolist()]
