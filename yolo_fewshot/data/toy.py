"""A tiny generated few-shot detection dataset from scikit-image's photos (deterministic, offline, seconds).

Four classes cut from real photos (cup, cat, face, rocket) pasted on blurred noise; ``rocket`` is novel by default.
For tests and speed tools, not a benchmark (that is ``tools/make_benchmark.py``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# object crops (RGB) cut from scikit-image's photos: class name -> (image name, rows, cols)
OBJECTS = {
    "cup": ("coffee", slice(40, 330), slice(110, 430)),
    "cat": ("chelsea", slice(20, 290), slice(60, 400)),
    "face": ("astronaut", slice(20, 220), slice(150, 330)),
    "rocket": ("rocket", slice(60, 420), slice(250, 400)),
}


def make_dataset(
    root: Path, n_train: int = 24, n_val: int = 8, size: int = 128, novel: str = "rocket", seed: int = 0
) -> Path:
    """Write ``root/images/{train,val}``, ``root/labels/...`` and ``root/data.yaml``; returns the YAML path."""
    from skimage import data  # scikit-image ships the photos

    rng = np.random.default_rng(seed)
    names = list(OBJECTS)
    crops = {k: getattr(data, img)()[rows, cols] for k, (img, rows, cols) in OBJECTS.items()}
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img = cv2.GaussianBlur(img, (0, 0), 3)
            lines = []
            for c in rng.choice(len(names), rng.integers(1, 3), replace=False):
                crop = crops[names[c]]
                s = rng.uniform(0.3, 0.5) * size / max(crop.shape[:2])
                h, w = max(8, int(crop.shape[0] * s)), max(8, int(crop.shape[1] * s))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                img[y : y + h, x : x + w] = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
                lines.append(f"{c} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    yaml = root / "data.yaml"
    yaml.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
        + f"novel: [{novel}]\n"
    )
    return yaml
