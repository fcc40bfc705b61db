"""K-shot subsets for the TFA-style fine-tune mode (Wang et al., "Frustratingly Simple Few-Shot Object Detection",
ICML 2020): for every class, K training images that contain it, drawn by seed; written as an Ultralytics image-list
file so the normal data pipeline reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ultralytics.data.utils import IMG_FORMATS, img2label_paths


def list_images(source: str | Path | list) -> list[str]:
    """Image files of a data YAML split entry (a folder, a list file, or a list of either)."""
    out: list[str] = []
    for s in source if isinstance(source, (list, tuple)) else [source]:
        p = Path(s)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.is_file() and p.suffix == ".txt":
            out += [
                str((p.parent / ln.strip()).resolve()) if ln.strip().startswith("./") else ln.strip()
                for ln in p.read_text().splitlines()
                if ln.strip()
            ]
        else:
            raise FileNotFoundError(f"training split {s} is neither an image folder nor a list file")
    return out


def kshot_images(images: list[str], classes: list[int], k: int, seed: int = 0) -> list[str]:
    """Up to ``k`` images per class (an image counts for every class it contains), drawn by ``seed``."""
    labels = {}
    for im, lp in zip(images, img2label_paths(images)):
        p = Path(lp)
        rows = p.read_text().split("\n") if p.is_file() else []
        labels[im] = {int(float(r.split()[0])) for r in rows if r.strip()}
    rng = np.random.default_rng(seed)
    chosen: dict[str, None] = {}
    for c in classes:
        pool = [im for im in images if c in labels[im]]
        have = [im for im in chosen if c in labels[im]]
        rest = [im for im in pool if im not in chosen]
        need = max(0, k - len(have))
        for i in rng.permutation(len(rest))[:need]:
            chosen[rest[i]] = None
    return list(chosen)


def write_kshot_list(images: list[str], path: Path) -> Path:
    """Write an Ultralytics image-list file (absolute paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(str(Path(im).resolve()) for im in images) + "\n")
    return path
