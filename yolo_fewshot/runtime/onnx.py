"""Torch-free inference of the dynamic-references export: reference photos -> prototypes -> detection -> NMS.

Needs only onnxruntime, numpy and OpenCV: ``encoder.onnx`` turns reference crops into embeddings (averaged per class,
as ``aggregate(mean)`` does), ``detector.onnx`` takes the letterboxed image and the ``[N, M, ΣD]`` prototypes; boxes
go through class-aware NMS (OpenCV) and back to the original image. Inputs are checked here, so a wrong prototype array
gets a one-line error naming the expected shape instead of an onnxruntime stack trace; so do a truncated or foreign
ONNX file, the detector and encoder given the wrong way round, an empty source folder and an unreadable scene.

    rt = FewShotOnnx("detector.onnx", "encoder.onnx")
    rt.set_references({"backpack": ["b1.jpg", ("frame.jpg", [412, 80, 470, 220])]})
    detections = rt.predict("scene.jpg", conf=0.25)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_image
from ..references.crops import MIN_SIDE, crop_array, read_image

GRAPHS = {"detector": ("images", "prototypes"), "encoder": ("crops", "masks")}  # each graph's inputs


def read_onnx(path: str | Path):
    """The ONNX ``ModelProto`` at ``path`` without its weights' external data; a truncated or non-ONNX file is one
    line (not protobuf's ``DecodeError``)."""
    import onnx

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is damaged, whatever the parser says
        raise ValueError(
            f"cannot read ONNX file {path}: truncated or corrupt ({type(e).__name__}); export it again"
        ) from None


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (see :func:`read_onnx` for its errors)."""
    return {p.key: p.value for p in read_onnx(path).metadata_props}


def _session(path: str | Path, providers: Sequence[str], role: str = "detector"):
    import onnxruntime as ort

    read_onnx(path)  # one line for a missing or damaged file, before onnxruntime's own messages
    try:
        sess = ort.InferenceSession(str(path), providers=list(providers))
    except Exception as e:  # onnxruntime's InvalidProtobuf / Fail: a damaged or unsupported graph
        raise ValueError(f"cannot read ONNX file {path}: {str(e).strip().splitlines()[0]}; export it again") from None
    raw = sess.get_modelmeta().custom_metadata_map.get("yolo_fewshot")
    if raw is None:
        raise ValueError(
            f"{path} is not a yolo_fewshot dynamic-references export (no 'yolo_fewshot' metadata); "
            "export with model.export(format='onnx', dynamic_refs=True)"
        )
    inputs = tuple(i.name for i in sess.get_inputs())
    if inputs != GRAPHS[role]:
        other = next((g for g, names in GRAPHS.items() if names == inputs), "another")
        raise ValueError(
            f"{path} is the {other} graph (inputs {', '.join(inputs)}), given as the {role}; "
            "use FewShotOnnx(detector.onnx, encoder.onnx)"
        )
    return sess, json.loads(raw)


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad to ``size x size`` with 114 (Ultralytics' LetterBox, centred)."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = round(h * r), round(w * r)
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = round((size - nh) / 2 - 0.1), round((size - nw) / 2 - 0.1)
    out = np.full((size, size, 3), 114, np.uint8)
    out[top : top + nh, left : left + nw] = img
    return out, r, (left, top)


def nms(pred: np.ndarray, conf: float, iou: float, max_det: int) -> np.ndarray:
    """``[4 + N, A]`` (xywh + class scores) -> ``[n, 6]`` xyxy, score, class after class-aware NMS."""
    scores = pred[4:].max(0)
    cls = pred[4:].argmax(0)
    keep = scores > conf
    boxes, scores, cls = pred[:4, keep].T, scores[keep], cls[keep]
    if not len(scores):
        return np.zeros((0, 6), np.float32)
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    rects = np.concatenate([xyxy[:, :2], boxes[:, 2:]], 1).tolist()  # OpenCV takes x, y, w, h
    idx = cv2.dnn.NMSBoxesBatched(rects, scores.tolist(), cls.tolist(), conf, iou)
    idx = np.array(idx, int).reshape(-1)[:max_det]
    return np.concatenate([xyxy[idx], scores[idx, None], cls[idx, None]], 1).astype(np.float32)


class FewShotOnnx:
    """The dynamic-references detector (+ encoder) in onnxruntime.

    Args:
        detector: ``detector.onnx``.
        encoder: ``encoder.onnx`` (needed by :meth:`set_references`; prototypes can also be given directly).
        providers: onnxruntime execution providers.
    """

    def __init__(
        self,
        detector: str | Path,
        encoder: str | Path | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.det, self.meta = _session(detector, providers, "detector")
        self.enc = _session(encoder, providers, "encoder")[0] if encoder is not None else None
        self.dims, self.tokens = list(self.meta["dims"]), int(self.meta["tokens"])
        self.width = sum(self.dims)
        self.names: list[str] = []
        self.prototypes: np.ndarray | None = None

    def set_prototypes(self, prototypes: np.ndarray, names: Sequence[str]) -> None:
        """Use ``prototypes [N, M, ΣD]`` for classes ``names`` (checked: one clear line on a wrong shape)."""
        p = np.asarray(prototypes, np.float32)
        want = f"[N, {self.tokens}, {self.width}] (levels {self.dims})"
        if p.ndim != 3 or p.shape[1] != self.tokens or p.shape[2] != self.width:
            raise ValueError(f"prototypes have shape {list(p.shape)}; this detector takes {want}")
        if p.shape[0] == 0 or p.shape[0] != len(names):
            raise ValueError(f"{p.shape[0]} prototypes for {len(names)} class names; give one per class, at least one")
        if not np.isfinite(p).all():
            raise ValueError("prototypes contain NaN or Inf")
        if np.abs(p).max() > np.finfo(np.float16).max:  # as reference banks: no encoder gives such values
            raise ValueError(
                f"prototypes are out of range (|value| up to {np.abs(p).max():.3g}, more than float16's largest, "
                f"{np.finfo(np.float16).max:g}); make them with set_references or the model's encoder"
            )
        self.prototypes, self.names = p, list(names)

    def set_references(self, refs: Mapping[str, Sequence], context: float = 0.1) -> None:
        """Encode ``{class: [photo | (photo, box)]}`` with ``encoder.onnx`` and average per class."""
        if self.enc is None:
            raise ValueError(
                "no encoder.onnx was given; pass it to FewShotOnnx(detector, encoder) or use set_prototypes"
            )
        if not refs:
            raise ValueError("no references given: pass {class name: [photos]}")
        size, protos = int(self.meta["input_size"]), []
        for name, items in refs.items():
            items = list(items)
            if not items:
                raise ValueError(f"class '{name}' has no reference image")
            crops, masks = zip(
                *(crop_array(*(i if isinstance(i, tuple) else (i, None)), size, context, MIN_SIDE) for i in items)
            )
            x = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255
            m = np.stack(masks)[:, None].astype(np.float32)
            protos.append(self.enc.run(None, {"crops": x, "masks": m})[0].mean(0))
        self.set_prototypes(np.stack(protos), list(refs))

    def predict(self, image, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[dict]:
        """Detections in ``image`` (path or RGB array): ``[{"box": xyxy px, "score", "class", "name"}]``."""
        if self.prototypes is None:
            raise ValueError("no references set; call set_references() or set_prototypes() first")
        img, _ = read_image(image, "image")
        x, r, (left, top) = letterbox(img, int(self.meta["imgsz"]))
        out = self.det.run(
            None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32) / 255, "prototypes": self.prototypes}
        )[0][0]
        dets = nms(out, conf, iou, max_det)
        dets[:, [0, 2]] = ((dets[:, [0, 2]] - left) / r).clip(0, img.shape[1])
        dets[:, [1, 3]] = ((dets[:, [1, 3]] - top) / r).clip(0, img.shape[0])
        return [
            {"box": d[:4].tolist(), "score": float(d[4]), "class": int(d[5]), "name": self.names[int(d[5])]}
            for d in dets
        ]


def is_dynamic_export(path: str | Path) -> bool:
    """Whether ``path`` is a ``detector.onnx`` written by ``export(dynamic_refs=True)``."""
    if not str(path).endswith(".onnx") or not Path(path).is_file():
        return False
    model = read_onnx(path)
    return any(p.key == "yolo_fewshot" for p in model.metadata_props) and len(model.graph.input) == 2


def predict_files(
    rt: FewShotOnnx, source: str | Path, conf: float = 0.25, iou: float = 0.7, save_dir: Path | None = None
) -> list[tuple[str, list[dict]]]:
    """Run ``rt`` on an image or a folder of images; optionally save annotated copies to ``save_dir`` (a copy that
    cannot be written is an ``OSError``, never a silent gap)."""
    from ..references.build import IMAGE_SUFFIXES

    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if src.is_dir() else [src]
    if not files:
        raise FileNotFoundError(f"source folder {src} has no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for f in files:
        dets = rt.predict(f, conf=conf, iou=iou)
        out.append((str(f), dets))
        if save_dir is not None:
            img = cv2.cvtColor(read_image(f, "image")[0], cv2.COLOR_RGB2BGR)
            for d in dets:
                x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
                cv2.rectangle(img, (x1, y1), (x2, y2), (0, 200, 255), 2)
                cv2.putText(
                    img,
                    f"{d['name']} {d['score']:.2f}",
                    (x1, max(12, y1 - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.5,
                    (0, 200, 255),
                    1,
                )
            write_image(save_dir / f.name, img)
    return out
