"""Keypoint matching: reference-driven box proposals from SIFT keypoints and a RANSAC homography.

Lowe, "Distinctive Image Features from Scale-Invariant Keypoints", IJCV 2004 (SIFT, the ratio test); Fischler & Bolles,
"Random Sample Consensus", CACM 1981. Where the reference and the scene show the same instance — a poster, a packaged
product, a building front, a calibration board — local features find it wherever it is, at any scale and in-plane
rotation, and whatever COCO's classes are: the real-photo set's instance pairs that CenterNet's boxes miss are found
this way (docs/realphoto.md). The reference box projected through the homography is one candidate
box per class; :class:`~yolo_fewshot.nn.verify.CropVerifier` scores it like every other candidate (the crop cosine
decides).

A reference's keypoints are computed once, when the references are set (:class:`KeypointTemplate`, plain arrays: no
code is loaded with them); the scene's once per image, for all classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MAX_SIDE = 1000  # px: a reference photo is shrunk until its box's longer side is at most this (time, memory)


@dataclass
class KeypointTemplate:
    """SIFT keypoints of one reference object.

    Attributes:
        points: Keypoint positions ``[P, 2]`` (x, y) in the template's pixels (the box's top-left is the origin).
        descriptors: SIFT descriptors ``[P, 128]`` float32.
        size: ``(w, h)`` of the box in the template's pixels: its corners are projected into the scene.
    """

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[float, float]

    @classmethod
    def from_image(
        cls, img: np.ndarray, box: Sequence[float] | None = None, mask: np.ndarray | None = None
    ) -> KeypointTemplate:
        """Keypoints inside ``box`` of ``img``.

        Args:
            img: RGB (or grey) uint8 image ``[H, W(, 3)]``.
            box: The object's box (xyxy px), or None for the whole image.
            mask: Optional object mask ``[H, W]`` in [0, 1] (a cut-out's alpha): keypoints only where it is > 0.5.
        """
        h, w = img.shape[:2]
        x1, y1, x2, y2 = (0.0, 0.0, float(w), float(h)) if box is None else (float(v) for v in box)
        # found on the whole photo, masked to the box: descriptors near the box's edge see the pixels around it
        grey = _grey(img)
        m = np.zeros(grey.shape, np.uint8)
        m[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = 255
        if mask is not None:
            m[mask <= 0.5] = 0
        s = min(1.0, MAX_SIDE / max(x2 - x1, y2 - y1, 1.0))
        if s < 1:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
            m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
        pts, desc = features(grey, m)
        return cls(pts / s - np.float32([x1, y1]), desc, (x2 - x1, y2 - y1))

    def __len__(self) -> int:
        return len(self.points)


def _grey(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img)


def features(grey: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoint positions ``[P, 2]`` float32 and descriptors ``[P, 128]`` float32 of a grey uint8 image."""
    kps, desc = cv2.SIFT_create().detectAndCompute(grey, mask)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    return np.float32([k.pt for k in kps]), desc.astype(np.float32)


def match(
    template: KeypointTemplate,
    scene: tuple[np.ndarray, np.ndarray],
    scene_size: tuple[int, int],
    ratio: float = 0.75,
    min_inliers: int = 8,
    ransac_px: float = 5.0,
) -> tuple[np.ndarray | None, int]:
    """Find ``template`` in a scene: Lowe's ratio test, a RANSAC homography, the box's corners projected.

    Args:
        template: The reference's keypoints.
        scene: The scene's ``(points, descriptors)`` from :func:`features`.
        scene_size: ``(w, h)`` of the scene (the box is clipped to it).
        ratio: Ratio-test threshold.
        min_inliers: Fewer RANSAC inliers than this = not found.
        ransac_px: RANSAC reprojection threshold in scene pixels.

    Returns:
        ``(box, inliers)``: the projected box's extent (xyxy scene px, float32 ``[4]``), or None when not found (too
        few matches or inliers, or a degenerate projection: not convex, or under 0.01 % of the scene).
    """
    pts, desc = scene
    if len(template) < 4 or len(pts) < 4:
        return None, 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(template.descriptors, desc, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < max(4, min_inliers):
        return None, 0
    src = template.points[[g.queryIdx for g in good]]
    dst = pts[[g.trainIdx for g in good]]
    hom, inl = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px, maxIters=5000, confidence=0.999)
    n = int(inl.sum()) if inl is not None else 0
    if hom is None or n < min_inliers:
        return None, n
    w, h = template.size
    quad = cv2.perspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]])[None], hom)[0]
    sw, sh = scene_size
    if not np.isfinite(quad).all() or not cv2.isContourConvex(quad.reshape(-1, 1, 2)):
        return None, n
    box = np.float32([quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()])
    box[0::2], box[1::2] = box[0::2].clip(0, sw), box[1::2].clip(0, sh)
    if (box[2] - box[0]) * (box[3] - box[1]) < 1e-4 * sw * sh:
        return None, n
    return box, n


def keypoint_boxes(
    templates: Sequence[Sequence[KeypointTemplate]], scene: np.ndarray, **kw
) -> tuple[np.ndarray, np.ndarray]:
    """Each class's best match in one scene.

    Args:
        templates: Per class, the keypoints of its references (a class may have none).
        scene: RGB or grey uint8 ``[H, W(, 3)]``.
        **kw: :func:`match` settings.

    Returns:
        ``boxes [N, 4]`` (xyxy scene px; zeros where not found) and ``inliers [N]`` (0 where not found), N = classes.
    """
    grey = _grey(scene)
    feats = features(grey) if any(len(t) for ts in templates for t in ts) else None
    boxes, inliers = np.zeros((len(templates), 4), np.float32), np.zeros(len(templates), np.int64)
    for c, ts in enumerate(templates):
        for t in ts if feats is not None else ():
            box, n = match(t, feats, (grey.shape[1], grey.shape[0]), **kw)
            if box is not None and n > inliers[c]:
                boxes[c], inliers[c] = box, n
    return boxes, inliers
