"""objectness_maps: the CenterNet's class-agnostic objectness and box maps, run by onnxruntime on the CPU.

The same network as :class:`~yolo_fewshot.nn.centernet.CenterNet` (the loaded torch module is exported to ONNX in
memory, once per process and input size; nothing is written to disk and nothing is read back from a file), reduced to
what proposals use: the max over the 80 class heatmaps and the four box distances. onnxruntime's CPU kernels run this
MobileNetV3 about twice as fast as torch eager (512 x 512, one thread: 64 ms against 125 ms; the outputs agree within
1e-6 on the heatmap and 1e-3 px on the distances), which is most of what the ported network adds to a verified
prediction (``tools/bench_speed.py --proposals head``). On other devices, or where the export or onnxruntime fails
(one warning), the torch module runs.
"""

from __future__ import annotations

import io
import warnings
import weakref

import torch
from torch import Tensor, nn

from .model import CenterNet

BACKENDS = ("auto", "torch", "onnxruntime")
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(H, W, threads): session | None}


class ObjectnessMaps(nn.Module):
    """``[B, 3, H, W]`` RGB 0..255 -> objectness ``[B, 1, H/4, W/4]`` (max over the class heatmaps) and ltrb
    ``[B, 4, H/4, W/4]`` (input pixels): the part of :class:`CenterNet` that class-agnostic proposals read.

    Args:
        model: A loaded :class:`CenterNet`.
    """

    def __init__(self, model: CenterNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Run the trunk and head; merge the classes."""
        heatmap, ltrb = self.model.head(self.model.trunk(images))
        return heatmap.amax(dim=1, keepdim=True), ltrb


def _session(model: CenterNet, hw: tuple[int, int]):
    """The onnxruntime session of ``model`` at input size ``hw`` (built on first use), or None where it cannot be."""
    threads = torch.get_num_threads()
    sessions = _SESSIONS.setdefault(model, {})
    key = (*hw, threads)
    if key not in sessions:
        sessions[key] = None
        try:
            import onnxruntime as ort

            buffer = io.BytesIO()
            example = torch.zeros(1, 3, *hw)
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's constant-folding notes
                torch.onnx.export(
                    ObjectnessMaps(model).eval(),
                    (example,),
                    buffer,
                    input_names=["images"],
                    output_names=["objectness", "ltrb"],
                    dynamic_axes={"images": {0: "batch"}, "objectness": {0: "batch"}, "ltrb": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads  # as many as torch is allowed (Ultralytics sets it on CPU)
            options.log_severity_level = 3
            # torch runs right after it (the crops' trunk pass): threads that spin-wait would take the cores from it
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[key] = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any failure means: run the torch module instead
            from ultralytics.utils import LOGGER

            LOGGER.warning(f"CenterNet: onnxruntime unavailable ({type(e).__name__}: {e}); running it in torch")
    return sessions[key]


def objectness_maps(model: CenterNet, images: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """CenterNet's objectness and ltrb maps of ``images`` ``[B, 3, H, W]`` (RGB 0..255, H and W multiples of 32).

    Args:
        model: A loaded :class:`CenterNet` (eval mode).
        images: The network input.
        backend: ``auto`` (onnxruntime for CPU tensors, else torch), ``torch`` or ``onnxruntime`` (CPU only).

    Returns:
        Objectness ``[B, 1, H/4, W/4]`` in (0, 1) and ltrb ``[B, 4, H/4, W/4]`` in input pixels, on ``images``'s
        device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"CenterNet backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and images.device.type != "cpu":
        raise ValueError(f"CenterNet backend='onnxruntime' runs on the CPU; the images are on {images.device}")
    session = None
    if backend != "torch" and images.device.type == "cpu":
        session = _session(model, tuple(images.shape[-2:]))
        if session is None and backend == "onnxruntime":
            raise RuntimeError("CenterNet backend='onnxruntime' could not be built (see the warning above)")
    if session is None:
        return ObjectnessMaps(model)(images)
    objectness, ltrb = session.run(None, {"images": images.detach().float().contiguous().numpy()})
    return torch.from_numpy(objectness), torch.from_numpy(ltrb)
