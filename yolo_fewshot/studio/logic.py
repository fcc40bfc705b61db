"""The reference studio's logic: the plain-Python steps the web page calls (no Gradio: they test without a browser).

A :class:`Studio` holds the model and everything the user made: the photos waiting for a box (a queue; a video stays
in it while frames are picked from it), the references (photo or video frame, box, class name, negative or not), an
optional loaded bank, and the last detections (kept at a low threshold, so the confidence slider only redraws).

Every user mistake raises :class:`StudioError`, whose text is the one line the page shows; a step that fails changes
nothing the user made. The references become a :class:`~yolo_fewshot.references.bank.ReferenceBank` through the same
:func:`~yolo_fewshot.references.build.build_bank` as ``FewShotYOLO.set_references``, so a bank saved here is the file
the API and the command line read, with the same prototypes.
"""

from __future__ import annotations

import math
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..references.bank import ClassReferences, ReferenceBank
from ..references.build import IMAGE_SUFFIXES, build_bank
from ..references.crops import box_numbers, read_image

DEFAULT_MODEL = "yolov8n-lite0-proto.yaml"  # an untrained instance already scores by the frozen trunk's cosine
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
RAW_CONF = 0.001  # detections are kept down to this score; the slider filters them without running the model again
MAX_FRAMES = 120  # a scene video is sampled to at most this many frames
MAX_IMAGES = 100  # a scene folder: at most this many images
MAX_SIDE = 1280  # kept scene images are shrunk to this longer side (boxes are reported in original pixels)
GALLERY_MAX = 24  # annotated pictures shown at once (a video's frames are sampled evenly)
EXPORT_KINDS = ("baked ONNX", "dynamic ONNX pair (zip)")


class StudioError(ValueError):
    """A user mistake (a bad upload, a missing name, a zero-area box): its text is one line for the page."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _name(path: str | Path) -> str:
    return Path(str(path)).name


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video (by its suffix)."""
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


def read_photo(path: str | Path, what: str = "reference photo") -> np.ndarray:
    """An uploaded photo as RGB uint8 ``[H, W, 3]``.

    Raises:
        StudioError: Not an image (or corrupt, or missing), named by its file name only.
    """
    try:
        img, _ = read_image(path, what)
    except (FileNotFoundError, ValueError):
        raise StudioError(
            f"{_name(path)} is not an image (or it is corrupt); upload a photo ({', '.join(sorted(IMAGE_SUFFIXES))})"
        ) from None
    return img


def video_frame(path: str | Path, index: int = 0) -> tuple[np.ndarray, int]:
    """Frame ``index`` of a video as RGB uint8, and the video's frame count.

    Raises:
        StudioError: Not a readable video, or no such frame.
    """
    cap = cv2.VideoCapture(str(path))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        if n <= 0:
            raise StudioError(f"{_name(path)} is not a video OpenCV can read (or it has no frame)")
        index = min(max(0, int(index)), n - 1)
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
    finally:
        cap.release()
    if not ok or frame is None:
        raise StudioError(f"cannot read frame {index} of {_name(path)} (a damaged video?)")
    return np.ascontiguousarray(frame[..., ::-1]), n


def annotation_box(value: Any) -> tuple[float, float, float, float] | None:
    """The box drawn on the annotator: ``value`` is its ``{"image": ..., "boxes": [{"xmin", "ymin", "xmax", "ymax"}]}``;
    None when no box is drawn (the whole photo is the object).

    Raises:
        StudioError: A box without four numbers.
    """
    boxes = (value.get("boxes") or []) if isinstance(value, dict) else []
    if not boxes:
        return None
    b = boxes[-1]
    try:
        return tuple(float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        raise StudioError(f"the drawn box {b!r} is not four numbers; draw it again") from None


def check_box(box: Sequence[float] | None, w: int, h: int) -> tuple[float, float, float, float] | None:
    """``box`` (xyxy pixels) clipped to a ``w x h`` image; None stays None (the whole photo).

    Raises:
        StudioError: Not four finite numbers, or zero area (after clipping).
    """
    if box is None:
        return None
    try:
        x1, y1, x2, y2 = box_numbers(box)  # the references' own check: four finite numbers
    except ValueError as e:
        raise StudioError(str(e)) from None
    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise StudioError(
            f"the box [{', '.join(f'{v:g}' for v in box)}] has zero area on the {w}x{h} photo: drag from one corner "
            "of the object to the opposite one (or remove the box to use the whole photo)"
        )
    return x1, y1, x2, y2


@dataclass
class Reference:
    """One reference the user made.

    Attributes:
        name: The class.
        image: The photo's path (read as the API reads it) or the pixels (a video frame), RGB uint8.
        box: The object's box, xyxy pixels, or None for the whole photo.
        negative: A look-alike that is NOT the class.
        source: What to call it (file name, "clip.mp4 frame 12").
    """

    name: str
    image: str | np.ndarray
    box: tuple[float, float, float, float] | None = None
    negative: bool = False
    source: str = ""

    @property
    def pixels(self) -> np.ndarray:
        return self.image if isinstance(self.image, np.ndarray) else read_photo(self.image)

    @property
    def caption(self) -> str:
        return f"{self.name}{' (negative)' if self.negative else ''}: {self.source}"

    def thumbnail(self, size: int = 128) -> np.ndarray:
        """The photo with its box drawn (red for a negative), its longer side ``size`` px, RGB."""
        img = self.pixels.copy()
        h, w = img.shape[:2]
        x1, y1, x2, y2 = self.box or (0, 0, w, h)
        color = (220, 40, 40) if self.negative else (40, 200, 60)
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), color, max(2, round(max(h, w) / 100)))
        s = size / max(h, w)
        return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


@dataclass
class Frame:
    """One scene picture and its detections (at :data:`RAW_CONF`): ``boxes [N, 6]`` xyxy, score, class in original
    pixels; ``image`` is BGR, shrunk by ``scale``."""

    label: str
    index: int
    image: np.ndarray
    boxes: np.ndarray
    scale: float = 1.0


@dataclass
class _Pending:
    path: str
    video: bool = False
    frame: int = 0
    frames: int = 1


@dataclass
class View:
    """What the page shows for the detections at one confidence: annotated pictures (RGB, caption), the table rows
    (source, frame, class, score, x1, y1, x2, y2) and, for a video, the annotated clip."""

    gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    video: Path | None = None


class Studio:
    """The model and the user's references, detections and files.

    Args:
        model: A model YAML or checkpoint (default: the prototype model; an untrained instance already detects by the
            frozen trunk's cosine similarity).
        workdir: Where saved banks, exports and annotated videos go.
        encoder: The support encoder (default: the model's own).
        threads: torch threads (None: torch's default).
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        workdir: str | Path = "runs/studio",
        encoder: str | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from .. import FewShotYOLO

        if threads:
            torch.set_num_threads(int(threads))
        suffix = Path(str(model)).suffix.lower()
        if suffix not in (".pt", ".yaml", ".yml"):
            raise StudioError(f"model={model}: the studio takes a model YAML or a .pt checkpoint (references change)")
        if suffix == ".pt" and not Path(str(model)).is_file():
            raise StudioError(f"model={model}: no such checkpoint")
        self.model_name = str(model)
        self.model = FewShotYOLO(model, encoder=encoder)
        self.workdir = Path(workdir)
        self.references: list[Reference] = []
        self.loaded: ReferenceBank | None = None
        self.loaded_from = ""
        self.pending: list[_Pending] = []
        self.frames: list[Frame] = []
        self.lock = threading.RLock()  # one step at a time: the page's events run in worker threads
        self._bank: ReferenceBank | None = None
        self._bank_key: tuple | None = None
        self._video_count = 0

    # -- the queue of uploaded photos ----------------------------------------------------------------------------------
    def enqueue(self, paths: Sequence[str | Path]) -> str:
        """Queue uploaded photos/videos to be boxed and named; files that are neither are skipped (named in the
        returned message, the others are queued)."""
        good, bad = [], []
        for p in paths:
            p = str(p)
            try:
                if is_video(p):
                    _, n = video_frame(p, 0)
                    good.append(_Pending(p, True, 0, n))
                else:
                    read_photo(p)
                    good.append(_Pending(p))
            except StudioError:
                bad.append(_name(p))
        if not good:
            raise StudioError(
                f"{', '.join(bad) or 'nothing'}: not an image or a video; upload photos "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) or a video ({', '.join(sorted(VIDEO_SUFFIXES))})"
            )
        with self.lock:
            self.pending.extend(good)
        msg = f"{len(good)} file(s) to box and name: draw a box on {_name(good[0].path)}"
        msg += " (or none for the whole photo), name the class and press Add reference"
        return msg + (f"; skipped {', '.join(bad)}: not an image or a video" if bad else "")

    @property
    def current(self) -> tuple[np.ndarray, str, int, int] | None:
        """The photo (or video frame) waiting for a box: ``(RGB pixels, source, frame, frame count)``, or None."""
        if not self.pending:
            return None
        p = self.pending[0]
        if p.video:
            img, _ = video_frame(p.path, p.frame)
            return img, f"{_name(p.path)} frame {p.frame}", p.frame, p.frames
        return read_photo(p.path), _name(p.path), 0, 1

    def select_frame(self, index: int) -> None:
        """Show frame ``index`` of the queued video."""
        with self.lock:
            if self.pending and self.pending[0].video:
                p = self.pending[0]
                p.frame = min(max(0, int(index)), p.frames - 1)

    def skip(self) -> str:
        """Drop the photo (or video) waiting for a box."""
        with self.lock:
            if not self.pending:
                raise StudioError("no photo is waiting for a box; upload reference photos first")
            p = self.pending.pop(0)
        return f"skipped {_name(p.path)}" + (f"; next: {_name(self.pending[0].path)}" if self.pending else "")

    def add_current(self, name: str, box: Sequence[float] | None = None, negative: bool = False) -> Reference:
        """Add the waiting photo (or the video's current frame) as a reference; a photo then leaves the queue, a video
        stays so more frames can be picked."""
        with self.lock:
            if not self.pending:
                raise StudioError("no photo to add: upload a reference photo (or a video) first")
            p = self.pending[0]
            if p.video:
                img, _ = video_frame(p.path, p.frame)
                ref = self.add_reference(img, name, box, negative, f"{_name(p.path)} frame {p.frame}")
            else:
                ref = self.add_reference(p.path, name, box, negative, _name(p.path))
                self.pending.pop(0)
            return ref

    # -- references ----------------------------------------------------------------------------------------------------
    def add_reference(
        self,
        image: str | Path | np.ndarray,
        name: str,
        box: Sequence[float] | None = None,
        negative: bool = False,
        source: str = "",
    ) -> Reference:
        """Add a reference (a photo path or RGB pixels, and its box; None = the whole photo).

        Raises:
            StudioError: No class name, not an image, a zero-area box, a negative of a class that has no reference.
        """
        name = (name or "").strip()
        if not name:
            raise StudioError("name the class first (e.g. backpack), then press Add reference")
        if isinstance(image, np.ndarray):
            try:
                image = pixels = read_image(image)[0]
            except ValueError as e:
                raise StudioError(one_line(e)) from None
        else:
            image = str(image)
            pixels = read_photo(image)
        h, w = pixels.shape[:2]
        box = check_box(box, w, h)
        with self.lock:
            canonical = {n.lower(): n for n in self.class_names}
            name = canonical.get(name.lower(), name)
            if negative and name not in canonical.values():
                raise StudioError(
                    f"a negative is a look-alike of a class: add a reference photo of '{name}' first (or pick the "
                    f"class it is mistaken for: {', '.join(canonical.values()) or 'none yet'})"
                )
            source = source or (_name(image) if isinstance(image, str) else "")
            ref = Reference(name, image, box, bool(negative), source)
            self.references.append(ref)
        return ref

    def remove(self, index: int | None) -> str:
        """Remove the ``index``-th picture of :meth:`gallery` (a loaded bank's class, or a photo reference); returns
        what was removed."""
        with self.lock:
            n_loaded = len(self.loaded) if self.loaded is not None else 0
            if index is None or not 0 <= int(index) < n_loaded + len(self.references):
                raise StudioError("select a reference in the gallery first (click it), then press Remove")
            if int(index) < n_loaded:
                name = self.loaded.names[int(index)]
                self.loaded.remove(name)
                self.loaded, self._bank_key = (self.loaded if len(self.loaded) else None), None
                return f"class {name} of the loaded bank"
            return self.references.pop(int(index) - n_loaded).caption

    def clear(self) -> None:
        """Remove every reference and the loaded bank."""
        with self.lock:
            self.references.clear()
            self.loaded, self.loaded_from, self._bank_key = None, "", None

    @property
    def class_names(self) -> list[str]:
        """The reference classes: the loaded bank's, then those of the photos (each once)."""
        names = list(self.loaded.names) if self.loaded is not None else []
        for r in self.references:
            if not r.negative and r.name not in names:
                names.append(r.name)
        return names

    def gallery(self) -> list[tuple[np.ndarray, str]]:
        """Pictures of the references: the loaded bank's thumbnails (one per class), then each photo with its box."""
        out = []
        if self.loaded is not None:
            for n, c in self.loaded.classes.items():
                thumb = c.thumbnail.numpy() if c.thumbnail is not None else np.full((64, 64, 3), 114, np.uint8)
                neg = c.negatives[0].shape[0] if c.negatives is not None else 0
                out.append((thumb, f"{n}: bank, K={c.k}" + (f", {neg} negative(s)" if neg else "")))
        out.extend((r.thumbnail(), r.caption) for r in self.references)
        return out

    def summary(self) -> str:
        """``2 classes (cat K=2, dog K=1 + 1 negative)``."""
        parts = []
        bank_k = {n: c.k for n, c in self.loaded.classes.items()} if self.loaded is not None else {}
        for n in self.class_names:
            k = bank_k.get(n, 0) + sum(1 for r in self.references if r.name == n and not r.negative)
            neg = sum(1 for r in self.references if r.name == n and r.negative)
            parts.append(f"{n} K={k}" + (f" + {neg} negative(s)" if neg else ""))
        return f"{len(parts)} class(es)" + (f" ({', '.join(parts)})" if parts else "")

    def bank(self) -> ReferenceBank:
        """The references as a bank (encoded once per change), made the model's classes.

        Raises:
            StudioError: No reference yet.
        """
        with self.lock:
            key = (id(self.loaded), len(self.loaded or ()), tuple(id(r) for r in self.references))
            if self._bank is not None and key == self._bank_key:
                return self._bank
            if not self.class_names:
                raise StudioError(
                    "no references yet: upload a photo of the object, draw its box, name the class and press Add "
                    "reference (or load a bank)"
                )
            positives: dict[str, list] = {}
            negatives: dict[str, list] = {}
            for r in self.references:
                (negatives if r.negative else positives).setdefault(r.name, []).append((r.image, r.box))
            encoder = self.model.encoder
            try:
                made = build_bank(encoder, positives) if positives else None
                negs = build_bank(encoder, negatives) if negatives else None
            except (ValueError, OSError) as e:
                raise StudioError(one_line(e)) from None
            for b, kind in ((made, False), (negs, True)):  # the page's file names, not "<array>" / temp paths
                for n, c in b.classes.items() if b is not None else ():
                    refs = [r for r in self.references if r.name == n and r.negative == kind]
                    for s, r in zip(c.sources, refs):
                        s["file"] = r.source
            method = self.loaded.method if self.loaded is not None else "mean"
            bank = ReferenceBank(encoder.spec, method)
            for n in self.class_names:
                parts = [b.classes[n] for b in (self.loaded, made) if b is not None and n in b.classes]
                neg_parts = [c.negatives for c in parts if c.negatives is not None]
                neg_sources = [s for c in parts for s in c.negative_sources]
                if negs is not None and n in negs.classes:
                    neg_parts.append(negs.classes[n].embeddings)
                    neg_sources += negs.classes[n].sources
                merged = _concat(parts, neg_parts, neg_sources)
                bank.add(n, merged.embeddings, merged.sources, merged.negatives, merged.negative_sources,
                         merged.thumbnail)  # fmt: skip
            self.model.set_references(bank)
            self._bank, self._bank_key = bank, key
            self.frames = []  # old detections belong to the old classes
            return bank

    def save_bank(self, path: str | Path) -> Path:
        """Write the references as a ``.safetensors`` bank (the file ``FewShotYOLO.set_references`` reads)."""
        path = Path(str(path).strip() or self.workdir / "references.safetensors").expanduser()
        if path.suffix != ".safetensors":
            raise StudioError(f"a bank file ends in .safetensors, not '{path.suffix or path.name}'")
        bank = self.bank()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return bank.save(path)
        except OSError as e:
            raise StudioError(f"cannot write {path}: {one_line(e)}") from None

    def load_bank(self, path: str | Path) -> ReferenceBank:
        """Load a bank: it replaces the references (photos and any earlier bank); a bad file changes nothing."""
        path = Path(str(path).strip()).expanduser()
        if path.suffix != ".safetensors":
            raise StudioError(f"{path.name or path} is not a bank: a bank file ends in .safetensors")
        try:
            bank = ReferenceBank.load(path)
            bank.check_encoder(self.model.encoder.spec)
        except (ValueError, OSError) as e:
            raise StudioError(one_line(e).replace(str(path), path.name)) from None
        with self.lock:
            self.references.clear()
            self.loaded, self.loaded_from, self._bank_key = bank, path.name, None
        self.bank()
        return bank

    # -- detection -----------------------------------------------------------------------------------------------------
    def detect(self, source: str | Path | np.ndarray, conf: float = 0.25) -> View:
        """Detect the reference classes in an image (path or RGB array), a short video, or a folder of images.

        Raises:
            StudioError: No references, no scene, a file that is neither image nor video, an empty folder.
        """
        if source is None or (isinstance(source, str) and not source.strip()):
            raise StudioError("no scene: upload an image or a short video, or type a file or folder path")
        with self.lock:
            self.bank()
            frames: list[Frame] = []
            if isinstance(source, np.ndarray):
                frames.append(self._detect_image(read_image(source, "scene")[0], "scene", 0))
            else:
                path = Path(str(source).strip()).expanduser()
                if not path.exists():
                    raise StudioError(f"{path} does not exist on this machine")
                if path.is_dir():
                    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
                    if not files:
                        raise StudioError(f"folder {path} has no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
                    frames = [self._detect_image(read_photo(f, "scene"), f.name, 0) for f in files]
                elif is_video(path):
                    frames = self._detect_video(path)
                else:
                    frames.append(self._detect_image(read_photo(path, "scene"), path.name, 0))
            self.frames = frames
            return self.view(conf)

    def _detect_image(self, rgb: np.ndarray, label: str, index: int) -> Frame:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        r = self.model.predict(bgr, conf=RAW_CONF, verbose=False)[0]
        return _frame(label, index, bgr, r.boxes.data.cpu().numpy())

    def _detect_video(self, path: Path) -> list[Frame]:
        _, n = video_frame(path, 0)
        stride = max(1, math.ceil(n / MAX_FRAMES))
        frames = []
        for i, r in enumerate(self.model.predict(str(path), stream=True, conf=RAW_CONF, vid_stride=stride,
                                                 verbose=False)):  # fmt: skip
            if i >= MAX_FRAMES:
                break
            frames.append(_frame(path.name, i * stride, r.orig_img, r.boxes.data.cpu().numpy()))
        if not frames:
            raise StudioError(f"{path.name}: no frame could be read")
        return frames

    def view(self, conf: float) -> View:
        """The last detections at confidence ``conf`` (no model run): annotated pictures, table rows, video."""
        from ultralytics.engine.results import Results

        from ..engine.predict import with_thumbnails

        conf = float(conf)
        with self.lock:
            frames, names = list(self.frames), dict(self.model.model.names)
            thumbs = getattr(self.model.model, "reference_thumbnails", None) or {}
        import torch

        view = View()
        pictures = []
        for f in frames:
            keep = f.boxes[f.boxes[:, 4] >= conf] if len(f.boxes) else f.boxes
            for x1, y1, x2, y2, s, c in keep:
                view.rows.append([f.label, f.index, names.get(int(c), str(int(c))), round(float(s), 4),
                                  *(round(float(v), 1) for v in (x1, y1, x2, y2))])  # fmt: skip
            shown = keep.copy()
            shown[:, :4] *= f.scale
            r = Results(f.image, path=f.label, names=names, boxes=torch.from_numpy(shown))
            pictures.append((np.ascontiguousarray(with_thumbnails(r.plot(), thumbs)[..., ::-1]), f))
        video = len(frames) > 1 and all(f.label == frames[0].label for f in frames) and is_video(frames[0].label)
        step = max(1, math.ceil(len(pictures) / GALLERY_MAX))
        view.gallery = [
            (img, f"{f.label}" + (f" frame {f.index}" if video else "") + f": {int((f.boxes[:, 4] >= conf).sum())}")
            for img, f in pictures[::step]
        ]
        if video:
            view.video = self._write_video([img for img, _ in pictures])
        return view

    def _write_video(self, pictures: list[np.ndarray]) -> Path | None:
        """The annotated frames as a WebM (VP8, plays in browsers), or None where OpenCV cannot write one."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._video_count += 1
        path = self.workdir / f"detections_{self._video_count}.webm"
        h, w = pictures[0].shape[:2]
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), 10, (w, h))
        if not out.isOpened():
            return None
        for p in pictures:
            out.write(np.ascontiguousarray(p[..., ::-1]))
        out.release()
        return path

    # -- export --------------------------------------------------------------------------------------------------------
    def export(self, kind: str = EXPORT_KINDS[0], imgsz: int = 640) -> Path:
        """Export the model with the references: baked ONNX (one input, classes fixed) or the dynamic pair
        (``detector.onnx`` + ``encoder.onnx``, zipped). Files go to ``workdir/export``."""
        if kind not in EXPORT_KINDS:
            raise StudioError(f"unknown export '{kind}'; choose {' or '.join(EXPORT_KINDS)}")
        imgsz = int(imgsz or 640)
        if imgsz < 32 or imgsz % 32:
            raise StudioError(f"image size {imgsz} must be a multiple of 32 (e.g. 640)")
        with self.lock:
            self.bank()
            out = (self.workdir / "export").resolve()
            out.mkdir(parents=True, exist_ok=True)
            net = self.model.model
            had, old = "pt_path" in net.__dict__, getattr(net, "pt_path", None)
            net.pt_path = str(out / f"{Path(self.model_name).stem}.pt")  # Ultralytics writes next to pt_path
            try:  # (FewShotYOLO.export keeps crop verification out of the graph and of the Exporter's FLOPs probe)
                if kind == EXPORT_KINDS[0]:
                    return Path(self.model.export(format="onnx", imgsz=imgsz))
                det = Path(self.model.export(format="onnx", dynamic_refs=True, imgsz=imgsz))
                zpath = det.parent.with_suffix(".zip")
                with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
                    for f in (det, det.with_name("encoder.onnx")):
                        z.write(f, f"{det.parent.name}/{f.name}")
                return zpath
            except (StudioError, KeyboardInterrupt):
                raise
            except Exception as e:  # the exporter's failures are the user's to read, in one line
                raise StudioError(f"export ({kind}) failed: {one_line(e)}") from e
            finally:
                if had:
                    net.pt_path = old
                else:
                    net.__dict__.pop("pt_path", None)
                self.model.predictor = None  # the exporter fused the model: predict sets up again


def _frame(label: str, index: int, bgr: np.ndarray, boxes: np.ndarray) -> Frame:
    """A :class:`Frame`, the picture shrunk to :data:`MAX_SIDE` (boxes stay in original pixels)."""
    h, w = bgr.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    if scale < 1:
        bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return Frame(label, index, np.ascontiguousarray(bgr), np.asarray(boxes, np.float32).reshape(-1, 6), scale)


def _concat(parts: list[ClassReferences], neg_parts: list[list], neg_sources: list[dict]) -> ClassReferences:
    """One class from several: embeddings (and negatives) stacked along K, sources in order, the first thumbnail."""
    import torch

    emb = [torch.cat([p.embeddings[lv] for p in parts]) for lv in range(len(parts[0].embeddings))]
    neg = [torch.cat([n[lv] for n in neg_parts]) for lv in range(len(neg_parts[0]))] if neg_parts else None
    thumb = next((p.thumbnail for p in parts if p.thumbnail is not None), None)
    return ClassReferences(emb, [s for p in parts for s in p.sources], neg, list(neg_sources), thumb)
