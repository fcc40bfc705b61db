"""How many objects instance search finds at a false-positive budget, and why it misses the others (issue 12's probe).

Runs the model's instance search (``predict``, ``top1=True``, one clean photo per object) over a fold's instance test
scenes, records every verified candidate (box, objectness, similarity to each reference, verified score) and then,
without running the model again:

* the share of the objects found at <= ``--fp`` false positives per scene with the best single score threshold, and
  at ``--conf`` (the demo's measure: a detection finds an object of its class at IoU >= 0.5, each object once);
* why the others are missed at ``--conf``: no candidate covers them (IoU >= 0.5), their best candidate goes to another
  reference, or it goes to theirs below the threshold; and what the false positives are.

Each candidate is kept for its best class and merged by Ultralytics-style NMS (per class; ``--agnostic``: whatever the
class), as ``predict`` does.

    python tools/probe_found.py --fold 0                                  # the shipped model on fold 0
    python tools/probe_found.py --fold 0 --ref-detail 48                  # + each reference shrunk to 48 px
    python tools/probe_found.py --fold 1 --model fold1.safetensors --agnostic

``--hubness N`` also records the same search over the first N training scenes of the fold (base classes only: the
fold's protocol keeps the novel objects out of them) as a bank, and rescores the test record with each reference's
cosine lowered by ``lam * (h_r - mean h)``, ``h_r`` the mean of its ``k`` highest cosines over the bank's candidates
(hubness reduction, CSLS: Conneau et al., "Word translation without parallel data", ICLR 2018): a reference that is
near everything (one apple among many apples) stops taking other objects' candidates.

    python tools/probe_found.py --fold 0 --hubness 120 --csls 0           # + the bank-corrected scores

The model's own hubness correction (``CropVerifier.hubness``, its ``hubness_bank``: :mod:`yolo_fewshot.nn.hubness`) is
on by default; ``--csls 0`` switches it off, which is what the probe's ``--hubness`` bank was measured against. So is
the colour histograms' agreement (``CropVerifier.colour``, :mod:`yolo_fewshot.nn.colour`); ``--colour 0`` switches it
off.

``--ref-detail S [S ...]`` adds, beside each reference photo, a copy shrunk until the object's longer side is S px
(the benchmark's references are ~210 px, its scene objects ~63 px): the probe behind docs/instance-search.md's
"views at scene detail" measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torchvision.ops import box_iou, nms

ROOT = Path(__file__).resolve().parents[1]


def references(root: Path, names: dict, out: Path, detail: list[int]) -> None:
    """One folder per object with its clean support photo cropped to it (and its shrunk copies)."""
    for i, objs in json.loads((root / "objects_support.json").read_text()).items():
        d = out / names[objs[0]["label"]]
        d.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(root / "images" / "support" / f"{int(i):06d}.jpg"))
        x1, y1, x2, y2 = objs[0]["box"]
        crop = img[y1:y2, x1:x2]
        cv2.imwrite(str(d / f"{int(i):06d}.png"), crop)
        for side in detail:
            f = side / max(crop.shape[:2])
            small = (max(1, round(crop.shape[1] * f)), max(1, round(crop.shape[0] * f)))
            cv2.imwrite(str(d / f"{int(i):06d}_s{side}.png"), cv2.resize(crop, small, interpolation=cv2.INTER_AREA))


def record(model, scenes: list[Path], refs: Path, imgsz: int, **settings) -> list[dict]:
    """Every scene's verified candidates: ``box`` [C, 4] (input px), ``obj`` [C], ``cos`` [C, N] (the similarity
    before scoring), ``score`` [C, N]; ``settings``:
    :class:`~yolo_fewshot.nn.verify.CropVerifier` fields to change (e.g. ``centernet_topk=20``). The references
    are set on every call: that is what hands the predictor the freshly wrapped verifier."""
    model.set_references(str(refs), keypoints=True if "keypoints" in str(settings.get("proposals", "")) else None)
    model.model.set_verify(True, top1=True)
    model.model.verifier = dataclasses.replace(model.model.verifier, **settings)
    verifier, rows = model.model.verifier, []
    candidates, compare, score = verifier.candidates, verifier.compare, verifier.score

    def keep_candidates(*a, **k):
        out = candidates(*a, **k)
        rows.append({"n": a[0].shape[0], "idx": out[1].cpu(), "box": out[3].float().cpu(), "obj": out[4].float().cpu()})
        return out

    def keep_compare(*a, **k):
        c = compare(*a, **k)
        rows[-1]["cos"] = c.float().cpu()
        return c

    def keep_score(*a, **k):
        s = score(*a, **k)
        rows[-1]["score"] = s.float().cpu()
        return s

    verifier.candidates, verifier.compare, verifier.score = keep_candidates, keep_compare, keep_score  # this one only
    names = [Path(r.path).name for r in model.predict([str(s) for s in scenes], imgsz=imgsz, conf=0.25, stream=True,
                                                       verbose=False, batch=1)]  # fmt: skip
    per_image = [  # a call may verify a batch of scenes: one row per scene
        {k: r[k][r["idx"] == i].numpy() for k in ("box", "obj", "cos", "score")} for r in rows for i in range(r["n"])
    ]
    assert len(per_image) == len(names), f"{len(per_image)} verified scenes for {len(names)} predictions"
    return [{"image": n, **r} for n, r in zip(names, per_image)]


def hubness(bank: np.ndarray, k: int = 50, lam: float = 0.75) -> np.ndarray:
    """Per-reference offset ``[N]`` from a bank's similarities ``[M, N]`` (candidates of scenes without the
    references' objects): ``lam * (h - mean h)``, ``h`` the mean of each reference's ``k`` highest (CSLS)."""
    h = -np.sort(-bank, 0)[: max(1, min(k, len(bank)))].mean(0)
    return lam * (h - h.mean())


def rescore(scenes: list[dict], offset: np.ndarray, verifier) -> list[dict]:
    """The scenes' candidates scored again by ``verifier.score`` from their similarities minus ``offset`` ``[N]``."""
    out = []
    for s in scenes:
        if len(s["cos"]):
            cos = torch.from_numpy((s["cos"] - offset).astype(np.float32))
            sc = verifier.score(cos, torch.from_numpy(s["obj"]), torch.zeros(len(cos), dtype=torch.long), 1)
            s = {**s, "score": sc.numpy()}
        out.append(s)
    return out


def detections(scene: dict, agnostic: bool, iou: float = 0.5) -> list[tuple[int, float, np.ndarray]]:
    """Each candidate with its best class, merged by NMS (per class unless ``agnostic``), best first."""
    sc = scene["score"]
    if not len(sc):
        return []
    cls, conf = sc.argmax(1), sc.max(1)
    boxes = torch.from_numpy(scene["box"]) + (0 if agnostic else torch.from_numpy(cls)[:, None].float() * 1e4)
    keep = nms(boxes, torch.from_numpy(conf).float(), iou).numpy()
    return sorted(((int(cls[k]), float(conf[k]), scene["box"][k]) for k in keep), key=lambda d: -d[1])


def iou(a, b) -> np.ndarray:
    t = lambda x: torch.as_tensor(np.asarray(x, np.float32)).reshape(-1, 4)  # noqa: E731
    return box_iou(t(a), t(b)).numpy()


def evaluate(scenes: list[dict], truth: dict, index: dict, agnostic: bool, fp: float, conf: float) -> dict:
    """Found share at <= ``fp`` false positives per scene (best threshold) and at ``conf``; misses and false positives
    by kind at ``conf``."""
    hits, n_obj = [], 0
    misses = {"no candidate": 0, "best candidate goes to another reference": 0, "below the threshold": 0}
    fps = {"a look-alike or another labelled object": 0, "part or loose box of an object": 0, "clutter": 0}
    for s in scenes:
        gts = [(index[c], b) for c, b in truth[s["image"]]]
        n_obj += len(gts)
        left, found = list(range(len(gts))), set()
        for c, p, b in detections(s, agnostic):
            match = [j for j in left if gts[j][0] == c and iou([b], [gts[j][1]])[0, 0] >= 0.5]
            hits.append((p, bool(match)))
            if match:
                left.remove(match[0])
                if p >= conf:
                    found.add(match[0])
            elif p >= conf:
                o = iou([b], [g for _, g in gts])[0] if gts else np.zeros(0)
                kind = (
                    "clutter"
                    if not len(o) or o.max() < 0.1
                    else (
                        "a look-alike or another labelled object"
                        if o.max() >= 0.5
                        else "part or loose box of an object"
                    )
                )
                fps[kind] += 1  # fmt: skip
        for c, b in (g for j, g in enumerate(gts) if j not in found):  # the objects missed at conf
            o = iou([b], s["box"])[0] if len(s["box"]) else np.zeros(0)
            if not len(o) or o.max() < 0.5:
                misses["no candidate"] += 1
            elif s["score"][o.argmax()].argmax() != c:
                misses["best candidate goes to another reference"] += 1
            elif s["score"][o.argmax(), c] < conf:
                misses["below the threshold"] += 1
    h = np.array(sorted(hits, key=lambda x: -x[0]), dtype=np.float64).reshape(-1, 2)
    hit, false = np.cumsum(h[:, 1]), np.cumsum(1 - h[:, 1])
    ok = false / len(scenes) <= fp
    at = h[:, 0] >= conf
    return {
        "scenes": len(scenes),
        "objects": n_obj,
        f"found_at_fp{fp}": round(float(hit[ok].max() / n_obj) if ok.any() else 0.0, 4),
        "threshold": round(float(h[ok][-1, 0]), 4) if ok.any() else None,
        f"found_at_conf{conf}": round(float(hit[at][-1] / n_obj) if at.any() else 0.0, 4),
        f"fp_per_scene_at_conf{conf}": round(float(false[at][-1] / len(scenes)) if at.any() else 0.0, 4),
        "missed_at_conf": misses,
        "false_positives_at_conf": fps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--model", default=None, help="a FewShotYOLO checkpoint or .safetensors (default: the shipped one)")
    ap.add_argument("--data", default=str(ROOT / "data" / "stamps"), help="the benchmark's folder")
    ap.add_argument("--ref-detail", type=int, nargs="*", default=[], help="add shrunk copies of each reference (px)")
    ap.add_argument("--agnostic", action="store_true", help="merge detections whatever their class")
    ap.add_argument("--centernet-topk", type=int, default=None, help="CenterNet candidates per image")
    ap.add_argument("--topk", type=int, default=None, help="the head's candidates per image")
    ap.add_argument("--size", type=int, default=None, help="verification crop side (px)")
    ap.add_argument("--csls", type=float, default=None, help="the verifier's hubness weight (0: off; default: its own)")
    ap.add_argument("--colour", type=float, default=None, help="the verifier's colour weight (0: off)")
    ap.add_argument("--proposals", default=None, help="the verifier's candidate sources, e.g. head+keypoints")
    ap.add_argument("--hubness", type=int, default=0, help="bank: this many of the fold's training scenes (0: none)")
    ap.add_argument("--hubness-k", type=int, nargs="*", default=[10, 50], help="the bank's nearest candidates")
    ap.add_argument("--hubness-lam", type=float, nargs="*", default=[0.5, 0.75, 1.0], help="offset weights")
    ap.add_argument("--fp", type=float, default=0.2, help="false positives per scene allowed")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()

    from yolo_fewshot import FewShotYOLO

    data = Path(args.data)
    root = data / f"fold{args.fold}-instance"
    names = yaml.safe_load((data / f"fold{args.fold}-instance.yaml").read_text())["names"]
    truth = {
        f"{int(i):06d}.jpg": [(names[o["label"]], o["box"]) for o in objs if o["label"] is not None]
        for i, objs in json.loads((root / "objects_test.json").read_text()).items()
    }
    model = FewShotYOLO(args.model) if args.model else FewShotYOLO()
    refs = Path(tempfile.mkdtemp(prefix="probe_found_refs_"))
    try:
        references(root, names, refs, args.ref_detail)
        given = (("centernet_topk", args.centernet_topk), ("topk", args.topk), ("size", args.size),
                 ("hubness", args.csls), ("colour", args.colour), ("proposals", args.proposals))  # fmt: skip
        settings = {k: v for k, v in given if v is not None}
        scenes = record(model, [root / "images" / "test" / n for n in truth], refs, args.imgsz, **settings)
        train = sorted((data / f"fold{args.fold}" / "images" / "train").glob("*.jpg"))[: args.hubness]
        bank = record(model, train, refs, args.imgsz, **settings) if train else []
    finally:
        shutil.rmtree(refs, ignore_errors=True)
    index = {v: k for k, v in model.model.names.items()}
    result = {
        "fold": args.fold,
        "model": args.model or "shipped",
        "ref_detail": args.ref_detail,
        "agnostic": args.agnostic,
        "centernet_topk": args.centernet_topk,
        "topk": args.topk,
        "size": args.size,
        "csls": args.csls,
        "colour": args.colour,
        "proposals": args.proposals,
        **evaluate(scenes, truth, index, args.agnostic, args.fp, args.conf),
    }
    if bank:
        cos = np.concatenate([s["cos"] for s in bank if len(s["cos"])])
        result["hubness"] = {"bank_scenes": len(bank), "bank_candidates": len(cos)}
        verifier = dataclasses.replace(model.model.verifier)  # a clean copy: record() wrapped the model's methods
        for k in args.hubness_k:
            for lam in args.hubness_lam:
                r = evaluate(rescore(scenes, hubness(cos, k, lam), verifier), truth, index, args.agnostic,
                             args.fp, args.conf)  # fmt: skip
                keys = (f"found_at_fp{args.fp}", "threshold", f"found_at_conf{args.conf}",
                        f"fp_per_scene_at_conf{args.conf}")  # fmt: skip
                result["hubness"][f"k{k}_lam{lam}"] = {x: r[x] for x in keys}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
