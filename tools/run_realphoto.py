"""Evaluate "find this object" methods on the real-photo set: is the target the top detection of the scene?

    python tools/run_realphoto.py                                  # methods cosine, sift, centernet -> runs/realphoto/
    python tools/run_realphoto.py --methods sift --pairs box graffiti
    python tools/run_realphoto.py --methods cosine model --model runs/detect/train/weights/best.pt
    python tools/run_realphoto.py --methods --sheet docs/realphoto_pairs.jpg   # only draw the pairs and their boxes

The set (data/manifests/realphoto.tsv, yolo_fewshot/data/realphoto.py) pairs one reference photo (optionally with a
box) with one scene; a pair is found when the method's single highest-scoring box has IoU >= 0.5 with a target box.
Reported overall and split instance / category and COCO / non-COCO, with every pair's top box, in results.json,
results.md and sheet.jpg (a contact sheet with each method's top box) under --out.

Methods (one reference each; nothing is trained):
  cosine     zero training: the frozen ImageNet EfficientNet-Lite0 trunk's cosine similarity between the reference
             crop and square sliding windows (yolo_fewshot/baselines/window_matching.py, as in the benchmark)
  sift       SIFT + RANSAC homography (OpenCV): the reference box projected into the scene; score = inliers
  centernet  the COCO CenterNet's 100 class-agnostic proposals, each crop re-encoded by the Lite0 trunk (P5, masked
             mean) and ranked by cosine to the reference prototype times objectness^0.5
  model      a FewShotYOLO checkpoint (--model PATH) given the reference photo and box; its top box at conf 0.001;
             --proposals head|centernet|keypoints (joined by +; both = head+centernet) picks the candidates its crop
             verification scores (prototype-head models)
Scenes and references longer than --max-side are shrunk for every method alike (boxes are mapped back).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cosine", "sift", "centernet", "model")
DEFAULT_METHODS = ("cosine", "sift", "centernet")
LABELS = {
    "cosine": "zero training: Lite0 cosine, sliding windows",
    "sift": "SIFT + RANSAC homography",
    "centernet": "CenterNet COCO proposals + Lite0 crop cosine x obj^0.5",
    "model": "FewShotYOLO model",
}
COLOURS = {"cosine": (255, 150, 0), "sift": (255, 0, 255), "centernet": (0, 170, 255), "model": (230, 0, 0)}  # RGB
COLOUR_NAMES = {"cosine": "orange", "sift": "magenta", "centernet": "blue", "model": "red"}


# -- images ------------------------------------------------------------------------------------------------------------
def shrink(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``img`` resized (area) so that its longer side is at most ``max_side``; returns it and the scale applied."""
    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w)) if max_side else 1.0
    if s >= 1.0:
        return img, 1.0
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), s


def ref_rgba(pair) -> np.ndarray:
    """The reference as RGB, or RGBA when it is a cut-out (the alpha becomes the crop's object mask)."""
    if pair.ref_mask is None:
        return pair.ref_image
    return np.dstack([pair.ref_image, (pair.ref_mask * 255).round().astype(np.uint8)])


# -- methods -----------------------------------------------------------------------------------------------------------
Detections = tuple[np.ndarray, np.ndarray]  # boxes [N, 4] xyxy px of the image given, scores [N]


def sift_homography(
    ref: np.ndarray, ref_box, scene: np.ndarray, ref_mask: np.ndarray | None = None
) -> tuple[np.ndarray | None, int]:
    """SIFT keypoints of the reference box matched into the scene and the box projected through a RANSAC homography
    (the library's :mod:`yolo_fewshot.nn.keypoint_match`, the model's ``proposals=...+keypoints`` source).

    Returns:
        ``(box, inliers)``: the projected box (xyxy scene px) or None when not found.
    """
    from yolo_fewshot.nn.keypoint_match import KeypointTemplate, features, match

    grey = cv2.cvtColor(scene, cv2.COLOR_RGB2GRAY) if scene.ndim == 3 else scene
    return match(KeypointTemplate.from_image(ref, ref_box, ref_mask), features(grey), (grey.shape[1], grey.shape[0]))


class SiftMethod:
    """(b) SIFT + RANSAC: one box (the projected reference box), scored by its inlier count."""

    def __call__(self, ref, ref_box, ref_mask, scene) -> Detections:
        box, n = sift_homography(ref, ref_box, scene, ref_mask)
        if box is None:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        return box[None], np.array([n], np.float32)


class CosineMethod:
    """(a) Zero training: the Lite0 trunk's cosine similarity between the reference and square sliding windows
    (:class:`~yolo_fewshot.baselines.window_matching.WindowMatcher`, reference crop with 10 % context, as the
    benchmark's ``cosine``)."""

    def __init__(self, encoder, size: int = 128) -> None:
        from yolo_fewshot.baselines.window_matching import WindowMatcher

        self.matcher = WindowMatcher(encoder, size=size)

    def __call__(self, ref, ref_box, ref_mask, scene) -> Detections:
        from yolo_fewshot.baselines.window_matching import sliding_windows

        windows = sliding_windows(scene.shape[1], scene.shape[0])
        emb = self.matcher.embed(scene, windows)
        proto = self.matcher.embed(ref, np.asarray(ref_box, np.float32)[None], context=0.1)[0]
        return windows, (emb @ proto).numpy()


def encode_crops(encoder, image: np.ndarray, boxes: np.ndarray, size: int, context: float = 0.1):
    """L2-normalised P5 masked-mean embeddings ``[N, D]`` of ``boxes`` in ``image`` (RGB, or RGBA whose alpha joins
    the mask)."""
    import torch

    from yolo_fewshot.references.crops import make_crop

    crops, masks = zip(*(make_crop(image, b.tolist(), size, context) for b in np.asarray(boxes).reshape(-1, 4)))
    emb = encoder.encode(torch.stack(crops), torch.stack(masks))[-1].mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


class CenterNetMethod:
    """(c) CenterNet COCO proposals (class-agnostic, 100 per scene), each crop re-encoded by the Lite0 trunk and scored
    ``max(cos, 0) * objectness ** power`` against the reference prototype (same crop rule, P5 masked mean)."""

    def __init__(self, encoder, size: int = 128, power: float = 0.5, top_k: int = 100) -> None:
        from yolo_fewshot.nn.centernet import CenterNetProposals

        self.encoder, self.size, self.power = encoder, size, power
        self.proposals = CenterNetProposals(top_k=top_k)

    def __call__(self, ref, ref_box, ref_mask, scene) -> Detections:
        props = self.proposals(scene)[0].numpy()
        if not len(props):
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        rgba = ref if ref_mask is None else np.dstack([ref, (ref_mask * 255).round().astype(np.uint8)])
        proto = encode_crops(self.encoder, rgba, np.asarray(ref_box)[None], self.size)[0]
        cos = (encode_crops(self.encoder, scene, props[:, :4], self.size) @ proto).clamp_min(0).numpy()
        return props[:, :4], cos * props[:, 4] ** self.power


class ModelMethod:
    """(d) A FewShotYOLO checkpoint: ``predict(scene, refs={"target": [(reference, box)]}, conf=0.001)``; its boxes
    and confidences (the scene goes in as BGR, Ultralytics' order for arrays; the reference as RGB(A))."""

    def __init__(
        self,
        path: str,
        imgsz: int | None = None,
        proposals: str | None = None,
        centernet_topk: int | None = None,
        topk: int | None = None,
        centernet_size: int | None = None,
    ) -> None:
        from yolo_fewshot import FewShotYOLO

        self.model, self.imgsz = FewShotYOLO(path), imgsz
        settings = (("centernet_topk", centernet_topk), ("topk", topk), ("centernet_size", centernet_size))
        if proposals is not None or any(v is not None for _, v in settings):
            from yolo_fewshot.nn.verify import CropVerifier

            extra = {k: v for k, v in settings if v is not None}
            self.model.model.set_verify(CropVerifier(**extra), proposals)

    def __call__(self, ref, ref_box, ref_mask, scene) -> Detections:
        rgba = ref if ref_mask is None else np.dstack([ref, (ref_mask * 255).round().astype(np.uint8)])
        kw = {"imgsz": self.imgsz} if self.imgsz else {}
        r = self.model.predict(
            np.ascontiguousarray(scene[..., ::-1]),
            refs={"target": [(rgba, [float(v) for v in ref_box])]},
            conf=0.001,
            verbose=False,
            **kw,
        )[0]
        return r.boxes.xyxy.cpu().numpy().reshape(-1, 4), r.boxes.conf.cpu().numpy().reshape(-1)


# -- evaluation --------------------------------------------------------------------------------------------------------
def evaluate(method: Callable[..., Detections], pair, max_side: int) -> dict:
    """Run one method on one pair (images shrunk to ``max_side``), score its top box; a JSON-able record."""
    from yolo_fewshot.data.realphoto import box_iou, top_box, top_hit

    scene, s_scale = shrink(pair.scene, max_side)
    ref, r_scale = shrink(pair.ref_image, max_side)
    mask = pair.ref_mask
    if mask is not None and r_scale < 1:
        mask = cv2.resize(mask, ref.shape[1::-1], interpolation=cv2.INTER_AREA)
    t0 = time.perf_counter()
    boxes, scores = method(ref, pair.ref_box * r_scale, mask, scene)
    seconds = time.perf_counter() - t0
    top = top_box(boxes, scores)
    if top is not None:
        top = np.asarray(top, np.float64) / s_scale
    iou = float(box_iou(top, pair.targets).max()) if top is not None else 0.0
    return {
        "hit": top_hit(top, pair.targets),
        "iou": round(iou, 4),
        "box": None if top is None else [round(float(v), 1) for v in top],
        "score": None if top is None else round(float(np.max(scores)), 5),
        "detections": int(len(scores)),
        "seconds": round(seconds, 3),
    }


def build_method(name: str, args) -> Callable[..., Detections]:
    """The method called ``name`` with the command line's settings."""
    if name == "sift":
        return SiftMethod()
    if name == "model":
        if not args.model:
            raise SystemExit("--methods model needs --model PATH (a FewShotYOLO checkpoint)")
        return ModelMethod(args.model, args.imgsz, args.proposals, args.centernet_topk, args.topk, args.centernet_size)
    from yolo_fewshot.encoders import build_encoder

    encoder = build_encoder(args.encoder)
    if name == "cosine":
        return CosineMethod(encoder, args.crop_size)
    return CenterNetMethod(encoder, args.crop_size)


def markdown(results: dict) -> str:
    """results.md: the summary table and the per-pair hits."""
    cols = ("all", "instance", "category", "coco", "non-coco")
    out = [
        "# Real-photo set: is the target the top detection (IoU >= 0.5)?",
        "",
        f"{results['n_pairs']} pairs (data/manifests/realphoto.tsv); {results['config']}",
        "",
        "| method | " + " | ".join(cols) + " | s / pair |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for name, m in results["methods"].items():
        cells = [f"{m['summary'][c]['found']}/{m['summary'][c]['pairs']} ({100 * m['summary'][c]['rate']:.0f} %)"
                 for c in cols]  # fmt: skip
        secs = np.mean([r["seconds"] for r in m["pairs"].values()])
        out.append(f"| {name}: {LABELS[name]} | " + " | ".join(cells) + f" | {secs:.2f} |")
    names = list(results["methods"])
    out += ["", "| pair | kind | COCO | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for p in results["pairs"]:
        hits = [
            ("✓" if results["methods"][n]["pairs"][p["id"]]["hit"] else "·")
            + f" {results['methods'][n]['pairs'][p['id']]['iou']:.2f}"
            for n in names
        ]
        out.append(f"| {p['id']} | {p['kind']} | {'yes' if p['coco'] else 'no'} | " + " | ".join(hits) + " |")
    out += ["", "Cells: ✓ found / · missed, then the top box's best IoU with a target."]
    return "\n".join(out) + "\n"


# -- contact sheet -----------------------------------------------------------------------------------------------------
def _fit(img: np.ndarray, w: int, h: int) -> tuple[np.ndarray, float]:
    s = min(w / img.shape[1], h / img.shape[0])
    return cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))), cv2.INTER_AREA), s


def _rect(img: np.ndarray, box, s: float, colour, width: int = 2) -> None:
    x1, y1, x2, y2 = (int(round(v * s)) for v in box)
    cv2.rectangle(img, (x1, y1), (x2, y2), colour, width)


def draw_sheet(pairs, path: Path, results: dict | None = None, cols: int = 3, cell: tuple[int, int] = (420, 170)):
    """A JPEG contact sheet: per pair the reference (its box in yellow) and the scene (targets in green, each
    method's top box in its colour when ``results`` are given), with the pair's id, kind and COCO flag."""
    cw, ch = cell
    rw = int(cw * 0.36)
    tiles = []
    for p in pairs:
        tile = np.full((ch + 16, cw, 3), 255, np.uint8)
        ref, rs = _fit(p.ref_image, rw - 4, ch)
        ref = ref.copy()
        _rect(ref, p.ref_box, rs, (255, 215, 0))
        scene, ss = _fit(p.scene, cw - rw, ch)
        scene = scene.copy()
        for t in p.targets:
            _rect(scene, t, ss, (0, 220, 0))
        for name, m in (results or {}).get("methods", {}).items():
            r = m["pairs"].get(p.id)
            if r and r["box"]:
                _rect(scene, r["box"], ss, COLOURS[name], 1)
        tile[: ref.shape[0], : ref.shape[1]] = ref
        tile[: scene.shape[0], rw : rw + scene.shape[1]] = scene
        text = f"{p.id} ({p.kind}, {'COCO' if p.coco else 'non-COCO'})"
        cv2.putText(tile, text, (2, ch + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    sheet = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    legend = "reference box: yellow; targets: green"
    if results:
        legend += "; top box of " + ", ".join(f"{n}: {COLOUR_NAMES[n]}" for n in results["methods"])
    bar = np.full((18, sheet.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, legend, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack([bar, sheet]), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 62])


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--model", help="FewShotYOLO checkpoint for --methods model")
    ap.add_argument("--imgsz", type=int, default=None, help="predict size for --methods model (default: the model's)")
    ap.add_argument(
        "--proposals",
        default=None,
        help="candidates of --methods model's crop verification (default: the model's setting)",
    )
    ap.add_argument("--centernet-topk", type=int, default=None, help="CenterNet candidates per image (model)")
    ap.add_argument("--topk", type=int, default=None, help="head candidates per image (model)")
    ap.add_argument("--centernet-size", type=int, default=None, help="CenterNet input side (model; a multiple of 32)")
    ap.add_argument("--pairs", nargs="*", help="evaluate only these pair ids")
    ap.add_argument("--manifest", help="another manifest (default: the committed one)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "realphoto"))
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--crop-size", type=int, default=128, help="crop side encoded by cosine and centernet")
    ap.add_argument("--max-side", type=int, default=1280, help="shrink longer images to this side (0: never)")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    ap.add_argument("--sheet", help="also write a contact sheet of the pairs and their boxes here (JPEG)")
    args = ap.parse_args(argv)

    import torch

    from yolo_fewshot.data.realphoto import FetchError, load_pairs, summarize

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    try:
        pairs = load_pairs(args.pairs, args.manifest)
    except FetchError as e:
        print(f"realphoto: {e}", file=sys.stderr)
        return 2
    config = f"max side {args.max_side} px, crops {args.crop_size} px, encoder {args.encoder}, {args.threads} thread(s)"
    if "model" in args.methods:
        config += f"; model {args.model}, imgsz {args.imgsz or 'its own'}, proposals {args.proposals or 'its own'}"
    results = {
        "n_pairs": len(pairs),
        "config": config,
        "pairs": [{"id": p.id, "kind": p.kind, "coco": p.coco, "category": p.category} for p in pairs],
        "methods": {},
    }
    for name in args.methods:
        method = build_method(name, args)
        per = {}
        for i, p in enumerate(pairs):
            with torch.inference_mode():
                per[p.id] = evaluate(method, p, args.max_side)
            r = per[p.id]
            print(f"{name}: {i + 1}/{len(pairs)} {p.id}: {'found' if r['hit'] else 'missed'} (IoU {r['iou']:.2f}, "
                  f"{r['seconds']:.1f} s)", flush=True)  # fmt: skip
        summary = summarize([per[p.id]["hit"] for p in pairs], pairs)
        results["methods"][name] = {"label": LABELS[name], "summary": summary, "pairs": per}
    if results["methods"]:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown(results))
        draw_sheet(pairs, out / "sheet.jpg", results)
        print(markdown(results))
        print(f"realphoto: {out / 'results.md'}, results.json, sheet.jpg (the methods' top boxes)")
    if args.sheet:
        draw_sheet(pairs, Path(args.sheet))
        print(f"realphoto: contact sheet of the pairs and their boxes -> {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
