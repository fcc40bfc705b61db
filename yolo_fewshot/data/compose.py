"""Scene composition: paste RGBA object cut-outs on background photos, with the artefacts that keep pasting honest.

A detector trained on naive cut-and-paste learns the paste edge, not the object (Dwibedi et al., "Cut, Paste and
Learn", ICCV 2017). So every object is feathered (its alpha eroded and blurred), colour-jittered, scaled, flipped and
slightly rotated; objects may occlude each other up to a bound; the whole scene gets sensor noise, optional blur and
JPEG compression. Boxes are tight around each object's *visible* pixels after occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Placed:
    """One object in a composed scene: ``key`` identifies it to the caller; ``box`` is xyxy pixels (visible part)."""

    key: int
    box: tuple[int, int, int, int]
    visible: float  # visible share of the object's pixels after later objects were pasted over it


def jitter_cutout(rgba: np.ndarray, rng: np.random.Generator, max_side: int, rotate: float = 10.0) -> np.ndarray:
    """Scale an RGBA cut-out (``[H, W, 4]`` uint8, RGB order) to ``max_side``, flip, rotate and colour-jitter it.

    Returns:
        ``[h, w, 4]`` float32 in [0, 1]; alpha feathered so the paste edge is soft.
    """
    h, w = rgba.shape[:2]
    s = max_side / max(h, w)
    im = cv2.resize(rgba, (max(2, round(w * s)), max(2, round(h * s))), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        im = im[:, ::-1]
    if rotate:
        ang = float(rng.uniform(-rotate, rotate))
        h, w = im.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
        c, sn = abs(m[0, 0]), abs(m[0, 1])
        nw, nh = int(h * sn + w * c) + 1, int(h * c + w * sn) + 1
        m[:, 2] += (nw - w) / 2, (nh - h) / 2
        im = cv2.warpAffine(np.ascontiguousarray(im), m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))
    rgb = im[..., :3].astype(np.float32) / 255
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in degrees, S and V in [0, 1]
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-6, 6)) % 360
    hsv[..., 1] *= rng.uniform(0.8, 1.2)
    hsv[..., 2] *= rng.uniform(0.75, 1.2)
    rgb = np.clip(cv2.cvtColor(np.clip(hsv, 0, [360, 1, 1]).astype(np.float32), cv2.COLOR_HSV2RGB), 0, 1)
    a = cv2.erode(im[..., 3], np.ones((3, 3), np.uint8)).astype(np.float32) / 255
    a = cv2.GaussianBlur(a, (0, 0), float(rng.uniform(0.6, 1.2)))
    return np.dstack([rgb, a]).astype(np.float32)


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int, min_scale: float = 0.4) -> np.ndarray:
    """A random square crop of ``photo`` (at least ``min_scale`` of its short side), resized to ``size``; float."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(min_scale, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32) / 255


def compose(
    background: np.ndarray,
    cutouts: list[np.ndarray],
    rng: np.random.Generator,
    max_occlusion: float = 0.4,
    tries: int = 30,
) -> tuple[np.ndarray, list[Placed]]:
    """Paste jittered cut-outs (from :func:`jitter_cutout`) at random places on a float background ``[S, S, 3]``.

    An object is placed only where it leaves every earlier object at least ``1 - max_occlusion`` visible; after
    ``tries`` failed positions it is dropped (and absent from the returned list).

    Returns:
        The scene (float ``[S, S, 3]`` in [0, 1]) and the placed objects, ``key`` = index into ``cutouts``.
    """
    img = background.copy()
    size_h, size_w = img.shape[:2]
    owner = np.full((size_h, size_w), -1, np.int32)
    areas: dict[int, int] = {}
    for key, cut in enumerate(cutouts):
        h, w = cut.shape[:2]
        if h >= size_h or w >= size_w:
            continue
        for _ in range(tries):
            y, x = int(rng.integers(0, size_h - h)), int(rng.integers(0, size_w - w))
            mask = cut[..., 3] > 0.5
            region = owner[y : y + h, x : x + w]
            covered = np.bincount(region[mask & (region >= 0)], minlength=key + 1)
            if all(
                (np.count_nonzero(owner == j) - covered[j]) >= (1 - max_occlusion) * areas[j]
                for j in areas
                if covered[j]
            ):
                break
        else:
            continue
        a = cut[..., 3:4]
        img[y : y + h, x : x + w] = cut[..., :3] * a + img[y : y + h, x : x + w] * (1 - a)
        region[mask] = key
        areas[key] = int(mask.sum())
    placed = []
    for key, area in areas.items():
        ys, xs = np.nonzero(owner == key)
        if len(ys) == 0:
            continue
        placed.append(Placed(key, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), len(ys) / area))
    return img, placed


def finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global photometric artefacts over the whole scene (noise, sometimes blur); returns uint8 RGB."""
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 0.9)))
    img = img + rng.normal(0, rng.uniform(0.005, 0.025), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def clean_photo(rgba: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A reference-style photo: the object alone, filling ~60-80 % of a plain light background. Returns uint8 RGB
    ``[size, size, 3]`` and the object's xyxy box."""
    cut = jitter_cutout(rgba, rng, int(size * rng.uniform(0.6, 0.8)), rotate=0.0)
    g = rng.uniform(0.78, 0.95)
    ramp = np.linspace(-0.04, 0.04, size, dtype=np.float32)[:, None, None]
    bg = np.full((size, size, 3), g, np.float32) + ramp
    h, w = cut.shape[:2]
    y, x = (size - h) // 2, (size - w) // 2
    a = cut[..., 3:4]
    bg[y : y + h, x : x + w] = cut[..., :3] * a + bg[y : y + h, x : x + w] * (1 - a)
    ys, xs = np.nonzero(cut[..., 3] > 0.5)
    box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
    return finish(bg, rng), box
