"""Reference photo (+ optional box) -> encoder-ready crop and object mask.

* Reading: any path OpenCV reads, or an array; grayscale is replicated to RGB, 16-bit is scaled to 8-bit, and an RGBA
  image's alpha becomes the object mask (photographic cut-outs need no box).
* Crop: the box (xyxy pixels; default the whole image) plus ``context`` of its longer side on each side, clipped to the
  image; resized with its aspect ratio kept so the longer side is the encoder's input size, and padded with grey (114,
  Ultralytics' letterbox value) to a square.
* Mask: 1 on the box's pixels (times alpha), 0 on context and padding, so encoders pool the object, not its
  surroundings.

Every user mistake raises one line that names the file and the fix; a reference too small to carry detail (below
:data:`MIN_SIDE` px) is warned about.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import cv2
import numpy as np

ImageLike = str | Path | np.ndarray
PAD_VALUE = 114
# How crops are framed; caches of crop embeddings are keyed by it (2: a context window past the image repeats the
# photo's edge instead of being clipped)
CROP_VERSION = 2
MIN_SIDE = 16  # px: a reference object smaller than this is upsampled from almost nothing (warned)


def read_image(src: ImageLike, what: str = "reference image") -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image as RGB uint8 ``[H, W, 3]`` and its alpha ``[H, W]`` in [0, 1] (None when opaque).

    Args:
        src: Path or array.
        what: What the image is, for messages (``"reference image"``, ``"image"`` for a scene).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file is not a readable image, or the array has an unsupported shape.
    """
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
        img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"cannot read {what} {path}: not an image or corrupt")
        if img.ndim == 3:  # OpenCV gives BGR(A)
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    else:
        img = np.asarray(src)
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{what} has unsupported dtype {img.dtype}; use uint8, uint16 or float in [0, 1]")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"{what} has shape {img.shape}; expected HxW, HxWx3 or HxWx4")
    alpha = None
    if img.shape[2] == 4:
        alpha = img[..., 3].astype(np.float32) / 255
        img = img[..., :3]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, 2)
    return np.ascontiguousarray(img), alpha


def box_numbers(box, where: str = "") -> tuple[float, float, float, float]:
    """``box`` as 4 finite floats ``x1, y1, x2, y2`` (one-line ValueError otherwise; ``where`` names its origin)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box {box!r}{where} must be 4 numbers [x1, y1, x2, y2] in pixels") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(box)}{where} must be 4 finite numbers [x1, y1, x2, y2] in pixels, not NaN or Inf")
    return x1, y1, x2, y2


def check_box(box, w: int, h: int, where: str = "") -> tuple[float, float, float, float]:
    """Validate an xyxy pixel box against an image of size ``w x h``."""
    x1, y1, x2, y2 = box_numbers(box, where)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {list(box)}{where} has zero or negative area; give [x1, y1, x2, y2] with x2>x1, y2>y1")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise ValueError(f"box {list(box)}{where} lies outside the {w}x{h} image")
    return x1, y1, x2, y2


def crop_array(
    src: ImageLike, box=None, size: int = 224, context: float = 0.1, min_side: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder-ready crop of the object in ``src``, in numpy (no torch: the ONNX runtime uses it).

    Args:
        src: Image path or array.
        box: Object box xyxy in pixels, or None for the whole image.
        size: Square output size (the encoder's input size).
        context: Context added around the box on each side, as a fraction of the box's longer side.
        min_side: Warn (``UserWarning``) when the object is smaller than this many pixels on a side (user
            references: :data:`MIN_SIDE`); 0 for none (training instances are filtered elsewhere).

    Returns:
        ``crop [size, size, 3]`` uint8 RGB and ``mask [size, size]`` float32 in [0, 1].
    """
    img, alpha = read_image(src)
    h, w = img.shape[:2]
    where = f" for {src}" if isinstance(src, (str, Path)) else ""
    x1, y1, x2, y2 = check_box(box, w, h, where) if box is not None else (0.0, 0.0, float(w), float(h))
    if min(x2 - x1, y2 - y1) < min_side:
        warnings.warn(
            f"reference {src if isinstance(src, (str, Path)) else '(array)'} is only {x2 - x1:g}x{y2 - y1:g} px; "
            f"below {min_side} px on a side it carries too little detail for a prototype (it is upsampled to {size} "
            "px): use a larger photo or box",
            UserWarning,
            stacklevel=3,
        )
    pad = context * max(x2 - x1, y2 - y1)
    cx1, cy1 = int(np.floor(x1 - pad)), int(np.floor(y1 - pad))
    cx2, cy2 = int(np.ceil(x2 + pad)), int(np.ceil(y2 + pad))
    mask = np.zeros((h, w), np.float32)
    mask[int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))] = 1
    if alpha is not None:
        mask *= alpha
    # The context window may reach past the image (a whole-photo reference, a box at the border): the photo's edge
    # pixels are repeated there rather than the window clipped, so that the object has the same size and place in the
    # crop as a scene's candidate has in its own (the context ring of a clipped window was lost and the object
    # filled the crop: instance search from cropped photos found 50 % of the demo's objects, 57 % with this).
    b = max(0, -cx1, -cy1, cx2 - w, cy2 - h)
    if b:
        img = cv2.copyMakeBorder(img, b, b, b, b, cv2.BORDER_REPLICATE)
        mask = cv2.copyMakeBorder(mask, b, b, b, b, cv2.BORDER_CONSTANT, value=0)
    img, mask = img[cy1 + b : cy2 + b, cx1 + b : cx2 + b], mask[cy1 + b : cy2 + b, cx1 + b : cx2 + b]
    ch, cw = img.shape[:2]
    scale = size / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img, mask = cv2.resize(img, (nw, nh), interpolation=interp), cv2.resize(mask, (nw, nh), interpolation=interp)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[top : top + nh, left : left + nw] = img
    full = np.zeros((size, size), np.float32)
    full[top : top + nh, left : left + nw] = mask
    return canvas, full


def make_crop(src: ImageLike, box=None, size: int = 224, context: float = 0.1, min_side: int = 0):
    """:func:`crop_array` as torch tensors: ``crop [3, size, size]`` float in [0, 1], ``mask [1, size, size]``."""
    import torch

    canvas, full = crop_array(src, box, size, context, min_side)
    return torch.from_numpy(canvas).permute(2, 0, 1).float() / 255, torch.from_numpy(full)[None]


def file_digest(src: ImageLike) -> str:
    """sha256 of a reference file's bytes (or of an array's pixels), to record where a prototype came from."""
    if isinstance(src, (str, Path)):
        return hashlib.sha256(Path(src).read_bytes()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(src).tobytes()).hexdigest()
