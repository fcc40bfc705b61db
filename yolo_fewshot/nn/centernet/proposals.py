"""CenterNetProposals: class-agnostic object proposals from the COCO CenterNet (objectness = max over the 80 classes).

Zhou, Wang & Krähenbühl, "Objects as Points", 2019: a box per heatmap peak. Here the 80 COCO class heatmaps are
merged into one objectness map by a max over classes **before** the 3x3 peak search, so every cell yields at most one
proposal (its box is class-agnostic anyway: the ltrb maps have no class axis) and the top-k spends its budget on
distinct places, not on the same box under several class names. Measured on real photographs (DESIGN.md, "Real-photo
objectness"): the 100 boxes of this network cover the target in 7 of 8 scenes, where objectness learned from pasted
stamps covers none. Objects outside COCO's classes are not its strength: reference-driven proposals have to add them.

Image handling (documented contract):
    - input: a list of ``H x W x 3`` uint8 (or float 0..255) numpy arrays, RGB (``bgr=True`` for OpenCV's
      ``imread`` order), each its own size; or a float tensor ``[B, 3, H, W]`` / ``[3, H, W]`` RGB in 0..255.
    - ``letterbox=False`` (default, what the graph's users do): plain resize to ``size x size`` (bilinear), aspect
      not kept; boxes are mapped back per axis.
    - ``letterbox=True``: the long side resized to ``size``, aspect kept, padded right/bottom with grey 114; boxes
      are mapped back by the one scale.
    - output: boxes in the **input image's pixels** (xyxy), clipped to the image, zero-area ones dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .decode import boxes_at, heatmap_peaks
from .model import CenterNet
from .session import BACKENDS, objectness_maps

PAD_VALUE = 114.0


class CenterNetProposals:
    """``images -> list of [K, 5]`` boxes ``x1, y1, x2, y2, objectness`` in input pixels (see the module doc).

    Args:
        model: A loaded :class:`CenterNet`; None loads the shipped weights (sha256-checked).
        size: Network input side (the graph was trained and verified at 512; multiples of 32 run).
        top_k: Proposals per image at most.
        min_score: Drop proposals whose objectness is below this.
        letterbox: Keep the aspect ratio (pad) instead of the plain resize.
        nms_iou: Class-agnostic NMS IoU threshold; None = peaks only (the graph's own rule).
        bgr: Numpy inputs are BGR (OpenCV) rather than RGB.
        device: Where the network runs.
        backend: What runs it: ``auto`` (onnxruntime on the CPU, about twice as fast; torch elsewhere), ``torch``
            or ``onnxruntime`` (:func:`~yolo_fewshot.nn.centernet.session.objectness_maps`).
    """

    def __init__(
        self,
        model: CenterNet | None = None,
        size: int = 512,
        top_k: int = 100,
        min_score: float = 0.0,
        letterbox: bool = False,
        nms_iou: float | None = None,
        bgr: bool = False,
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ) -> None:
        if size % 32:
            raise ValueError(f"CenterNetProposals size must be a multiple of 32, got {size}")
        self.device = torch.device(device)
        self.model = (model if model is not None else CenterNet.from_file()).to(self.device).eval()
        self.size, self.top_k, self.min_score = int(size), int(top_k), float(min_score)
        self.letterbox, self.nms_iou, self.bgr = bool(letterbox), nms_iou, bool(bgr)
        if backend not in BACKENDS:
            raise ValueError(f"CenterNetProposals backend={backend!r} must be one of {', '.join(BACKENDS)}")
        self.backend = backend

    # -- pre / post -----------------------------------------------------------------------------------------------
    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """The image's size inside the network input."""
        if not self.letterbox:
            return self.size, self.size
        r = self.size / max(h, w)
        return max(1, round(h * r)), max(1, round(w * r))

    def preprocess(self, image: np.ndarray | Tensor) -> tuple[Tensor, tuple[int, int]]:
        """One image -> network input ``[3, size, size]`` float RGB 0..255 and its original ``(H, W)``."""
        s = self.size
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
            h, w = image.shape[:2]
            nh, nw = self._resized_hw(h, w)
            im = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            if self.bgr:
                im = im[..., ::-1]
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(self.device)
        else:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
            h, w = image.shape[-2:]
            nh, nw = self._resized_hw(h, w)
            x = F.interpolate(image[None].float().to(self.device), (nh, nw), mode="bilinear", align_corners=False)[0]
        if (nh, nw) != (s, s):
            x = F.pad(x, (0, s - nw, 0, s - nh), value=PAD_VALUE)
        return x, (int(h), int(w))

    def _to_input_pixels(self, boxes: Tensor, hw: tuple[int, int]) -> Tensor:
        """Network-input pixels -> original image pixels (``[K, 4]``), clipped."""
        h, w = hw
        nh, nw = self._resized_hw(h, w)
        scale = boxes.new_tensor([w / nw, h / nh, w / nw, h / nh])
        out = boxes * scale
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out

    # -- call -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray | Tensor] | np.ndarray | Tensor) -> list[Tensor]:
        """Propose boxes.

        Args:
            images: See the module doc; a single numpy image or ``[3, H, W]`` tensor is taken as a batch of one.

        Returns:
            One float32 CPU tensor ``[K, 5]`` per image (``K <= top_k``), sorted by objectness, descending.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        elif isinstance(images, Tensor):
            images = [images] if images.ndim == 3 else list(images)
        prepared = [self.preprocess(im) for im in images]
        if not prepared:
            return []
        batch = torch.stack([x for x, _ in prepared])
        objectness, ltrb = objectness_maps(self.model, batch, self.backend)  # max over classes, box distances
        objectness = heatmap_peaks(objectness).flatten(1)  # [B, H*W]
        scores, index = objectness.topk(min(self.top_k, objectness.shape[1]), dim=1)
        boxes = boxes_at(ltrb, index, ltrb.shape[-1], self.model.stride)  # [B, K, 4] network pixels
        out = []
        for i, (_, hw) in enumerate(prepared):
            b = self._to_input_pixels(boxes[i], hw)
            keep = (scores[i] >= self.min_score) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b, s = b[keep], scores[i][keep]
            if self.nms_iou is not None and len(b):
                from torchvision.ops import nms

                k = nms(b, s, self.nms_iou)
                b, s = b[k], s[k]
            out.append(torch.cat([b, s[:, None]], dim=1).float().cpu())
        return out
