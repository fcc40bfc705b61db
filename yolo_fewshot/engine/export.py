"""Dynamic-references export: a detector graph with inputs ``images [B, 3, H, W]`` and ``prototypes [N, M, ΣD]``
(any number of classes N) plus an encoder graph ``crops [K, 3, S, S], masks [K, 1, S, S] -> embeddings [K, M, ΣD]``.

Ultralytics' Exporter takes one input (and refused a prototype input for YOLOE, #25530), so this goes through
``torch.onnx`` directly, with the model in Ultralytics' export state (fused, Detect in export mode). ``ΣD`` is the
concatenation of the levels the detector fuses (the encoder's last ones); the graphs' metadata (``yolo_fewshot``)
tells :mod:`yolo_fewshot.runtime.onnx` the level widths, tokens, sizes and stride.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model import add_onnx_metadata
from ..nn.head import FewShotDetect
from ..nn.prototype_detect import PrototypeDetect


class DetectorGraph(nn.Module):
    """``(images, prototypes [N, M, ΣD]) -> [B, 4 + N, anchors]`` with the prototypes as a graph input."""

    def __init__(self, det: nn.Module) -> None:
        super().__init__()
        self.det, self.dims = det, list(det.proto_dims)

    def forward(self, images: Tensor, prototypes: Tensor) -> Tensor:
        self.det._protos = [p[None] for p in torch.split(prototypes, self.dims, dim=-1)]
        try:
            return self.det.predict(images)
        finally:
            self.det._protos = None


class EncoderGraph(nn.Module):
    """``(crops [K, 3, S, S] in [0, 1], masks [K, 1, S, S]) -> [K, M, ΣD]`` over the detector's levels."""

    def __init__(self, encoder: nn.Module, levels: int) -> None:
        super().__init__()
        self.encoder, self.levels = encoder, levels

    def forward(self, crops: Tensor, masks: Tensor) -> Tensor:
        return torch.cat(self.encoder(crops, masks)[-self.levels :], -1)


def export_dynamic(model, out_dir: str | Path, imgsz: int = 640, opset: int = 17) -> tuple[Path, Path]:
    """Write ``detector.onnx`` and ``encoder.onnx`` for ``model`` (a FewShotYOLO) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = copy.deepcopy(model.encoder).float().eval()
    det = copy.deepcopy(model.model).float().eval()
    det._protos = None
    det.verifier = None  # crop verification re-encodes crops with data-dependent indexing: not part of a graph
    det.fuse(verbose=False)
    for m in det.modules():
        if isinstance(m, (FewShotDetect, PrototypeDetect)):
            m.export, m.format, m.dynamic = True, "onnx", False
    levels, spec = len(det.proto_dims), enc.spec
    meta = {
        "dims": list(det.proto_dims),
        "tokens": spec.tokens,
        "input_size": spec.input_size,
        "imgsz": imgsz,
        "stride": int(det.stride.max()),
        "encoder": spec.to_dict(),
    }
    d_path, e_path = out_dir / "detector.onnx", out_dir / "encoder.onnx"
    x = torch.zeros(1, 3, imgsz, imgsz)
    p = torch.zeros(2, spec.tokens, sum(det.proto_dims))
    torch.onnx.export(
        DetectorGraph(det).eval(),
        (x, p),
        str(d_path),
        input_names=["images", "prototypes"],
        output_names=["output0"],
        opset_version=opset,
        dynamo=False,
        dynamic_axes={"images": {0: "batch"}, "prototypes": {0: "classes"}, "output0": {0: "batch", 1: "outputs"}},
    )
    s = spec.input_size
    torch.onnx.export(
        EncoderGraph(enc, levels).eval(),
        (torch.zeros(2, 3, s, s), torch.ones(2, 1, s, s)),
        str(e_path),
        input_names=["crops", "masks"],
        output_names=["embeddings"],
        opset_version=opset,
        dynamo=False,
        dynamic_axes={"crops": {0: "refs"}, "masks": {0: "refs"}, "embeddings": {0: "refs"}},
    )
    for f in (d_path, e_path):
        add_onnx_metadata(f, {"yolo_fewshot": json.dumps(meta)})
    return d_path, e_path
