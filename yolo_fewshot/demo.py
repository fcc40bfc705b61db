"""``yolo-fewshot demo``: the shipped model finding never-seen objects in real-photo scenes, on a CPU, in minutes.

1. builds a small fold of the real-photo benchmark (:mod:`yolo_fewshot.data.benchmark`; fruit and vegetables are the
   novel classes, never in a training image of the shipped model);
2. takes the shipped pretrained model (``FewShotYOLO()``), or with ``train=True`` first trains the model YAML
   episodically on the fold's base classes for a few epochs (the training path, for those who want to see it);
3. scores it with seeded K-shot references (K = 1 and 3): base and novel AP50 with pycocotools;
4. looks for the novel classes in every held-out scene that holds one, from ``ref_shots`` reference photos each
   (objects other than those to find: category search), and counts what it found at ``conf``: the share of novel
   objects found (IoU >= 0.5, right class) and the false positives per scene;
5. instance search, the use behind the project ("here is a photo of this object; find it"): every novel object
   (44 fruit and vegetables) is its own class with one clean photo of it as the reference, searched in held-out scenes
   where it sits among 1-3 look-alikes of its folder (other apples), counted the same way;
writing everything to ``runs/demo/`` (``results.md``, ``results.json``, ``predictions/`` with the reference
thumbnails in each picture, ``demo.jpg``: a contact sheet).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import write_atomic

DEFAULTS: dict[str, Any] = {
    "model": None,  # default: the shipped pretrained model (train=False) or yolov8n-lite0-proto.yaml (train=True)
    "train": False,  # first train the model YAML on the fold's base classes (a short episodic run)
    "epochs": 3,  # train=True only
    "imgsz": 320,
    "batch": 16,
    "n_way": 8,
    "n_train": 160,  # training scenes (train=True only)
    "n_val": 40,  # held-out scenes (validation and category search; 60 took the demo past 5 minutes)
    "n_instance": 40,  # held-out instance-search scenes (0: skip step 5)
    "shots": "1,3",
    "ref_shots": 3,  # reference photos per novel class for the predictions
    "project": "runs",
    "name": "demo",
    "conf": 0.25,  # score threshold of the predictions and of what counts as found / false positive
    "verify": True,
    # the demo is category search (any apple, from photos of other apples): classes do not compete for a box
    "top1": False,
    "proposals": None,  # verification's candidates (default: the model's; for instance search head+centernet+keypoints)
}
TRAIN_YAML = "yolov8n-lite0-proto.yaml"
SHEET = 6  # scenes in the contact sheet


def run_demo(**overrides: Any) -> Path:
    """Run the demo (see module docstring); returns the output folder. ``overrides``: keys of :data:`DEFAULTS`."""
    from . import FewShotYOLO
    from .data.benchmark import build_fold, load_sources
    from .data.debian import default_cache
    from .engine.cfg import parse_shots
    from .engine.train import training_finished

    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"demo does not take {unknown}; it takes {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    cfg["shots"] = ",".join(str(k) for k in parse_shots(cfg["shots"]))
    # verification settings, only with verification on (the model refuses them otherwise)
    ver = {k: cfg[k] for k in ("top1", "proposals") if cfg["verify"] and cfg[k] is not None}
    out = (Path(cfg["project"]) / cfg["name"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    say = lambda msg: print(f"demo [{(time.perf_counter() - t0) / 60:4.1f} min] {msg}", flush=True)  # noqa: E731

    data_dir = out / "data"
    yaml = data_dir / "fold0.yaml"
    n_train = int(cfg["n_train"]) if cfg["train"] else 0
    stamp = data_dir / "settings.json"
    wanted = json.dumps({"imgsz": cfg["imgsz"], "n_train": n_train, "n_val": cfg["n_val"], "inst": cfg["n_instance"]})
    if not yaml.is_file() or not stamp.is_file() or stamp.read_text() != wanted:  # deterministic: a rerun reuses it
        say("building a small fold of the real-photo benchmark (photos from Debian packages, fetched once)")
        shutil.rmtree(data_dir, ignore_errors=True)
        src = load_sources(default_cache())
        build_fold(src, data_dir, 0, size=cfg["imgsz"], n_train=n_train, n_val=cfg["n_val"], n_novel_train=0,
                   n_instance=int(cfg["n_instance"]), log=lambda m: None)  # fmt: skip
        write_atomic(stamp, wanted)
    timing["data_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if cfg["train"]:
        weights = out / "train" / "weights" / "last.pt"
        say(f"training {cfg['model'] or TRAIN_YAML} on the base classes for {cfg['epochs']} epochs")
        if weights.is_file() and not training_finished(weights):  # an interrupted demo: continue, do not start over
            FewShotYOLO(str(weights)).train(resume=True)
        elif not weights.is_file():
            FewShotYOLO(cfg["model"] or TRAIN_YAML).train(
                data=str(yaml), epochs=cfg["epochs"], imgsz=cfg["imgsz"], batch=cfg["batch"], n_way=cfg["n_way"],
                project=str(out), name="train", exist_ok=True, seed=0, plots=False, val=False,
                shots=cfg["shots"].split(",")[-1], seeds=1, optimizer="SGD", lr0=0.01, warmup_epochs=1,
            )  # fmt: skip
        model = FewShotYOLO(str(weights))
    else:
        model = FewShotYOLO(cfg["model"]) if cfg["model"] else FewShotYOLO()
    timing["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    say(f"scoring with K = {cfg['shots']} reference photos per class (pycocotools, base and novel classes)")
    metrics = model.val(
        data=str(yaml), shots=cfg["shots"], seeds=1, imgsz=cfg["imgsz"], batch=cfg["batch"], save_json=True,
        plots=False, project=str(out), name="val", exist_ok=True, workers=0, verify=cfg["verify"], verbose=False, **ver,
    )  # fmt: skip
    rows = [{k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()} for r in metrics.fewshot]
    timing["val_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    refs, scenes, truth = _novel_refs_and_scenes(data_dir, out / "refs", int(cfg["ref_shots"]))
    say(f"looking for the novel classes in {len(scenes)} held-out scenes from {cfg['ref_shots']} photos each")
    pred_dir = out / "predictions"
    shutil.rmtree(pred_dir, ignore_errors=True)
    results = model.predict(
        [str(s) for s in scenes], refs=str(refs), imgsz=cfg["imgsz"], conf=cfg["conf"], save=True, verify=cfg["verify"],
        project=str(out), name="predictions", exist_ok=True, verbose=False, stream=True, **ver,
    )  # fmt: skip
    found = _detections(results)
    score = found_and_false(found, truth)
    instance = None
    if cfg["n_instance"]:
        refs_i, scenes_i, truth_i = _instance_refs_and_scenes(data_dir, out / "refs-instance")
        shutil.rmtree(out / "predictions-instance", ignore_errors=True)  # no stale pictures in the contact sheet
        say(f"instance search: each of {len(list(refs_i.iterdir()))} novel objects from one photo of it, in "
            f"{len(scenes_i)} held-out scenes among look-alikes")  # fmt: skip
        results = model.predict(
            [str(s) for s in scenes_i], refs=str(refs_i), imgsz=cfg["imgsz"], conf=cfg["conf"], save=True,
            verify=cfg["verify"], project=str(out), name="predictions-instance", exist_ok=True, verbose=False,
            stream=True, **{**ver, "top1": True} if cfg["verify"] else {},
        )  # fmt: skip
        inst_found = _detections(results)
        instance = {**found_and_false(inst_found, truth_i), "predictions": inst_found}
    sheet = sorted(pred_dir.glob("*.jpg"))[: SHEET // 2 if instance else SHEET]
    sheet += sorted((out / "predictions-instance").glob("*.jpg"))[: SHEET - len(sheet)] if instance else []
    _contact_sheet(sheet, out / "demo.jpg")
    timing["predict_s"] = time.perf_counter() - t3
    timing["total_s"] = time.perf_counter() - t0

    report = {
        "settings": cfg,
        "model": getattr(model.model, "pt_path", None) or str(cfg["model"] or TRAIN_YAML),
        "validation": rows,
        "found": score,
        "predictions": found,
        "instance": instance,
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
    }
    write_atomic(out / "results.json", json.dumps(report, indent=1))
    write_atomic(out / "results.md", _markdown(report))
    print(_markdown(report))
    print(f"demo: outputs in {out} (results.md, demo.jpg, predictions/) after {timing['total_s'] / 60:.1f} min")
    return out


def found_and_false(predictions: list[dict], truth: dict[str, list[tuple[str, list[float]]]], iou: float = 0.5):
    """Share of the objects to find that a detection of their class finds (IoU >= ``iou``, each detection used once)
    and false positives per scene (detections that find nothing).

    Args:
        predictions: ``[{"image": name, "detections": [[class, score, xyxy], ...]}]`` (already thresholded).
        truth: Per image name, the objects to find: ``[(class, xyxy)]``.

    Returns:
        ``{"objects", "found", "found_share", "scenes", "false_positives", "fp_per_scene"}``.
    """
    n_obj = sum(len(v) for v in truth.values())
    hit = fp = 0
    for p in predictions:
        gts = list(truth.get(p["image"], []))
        for name, _, box in sorted(p["detections"], key=lambda d: -d[1]):
            match = max(
                ((box_iou(box, g), j) for j, (c, g) in enumerate(gts) if c == name), default=(0.0, -1)
            )  # fmt: skip
            if match[0] >= iou:
                hit += 1
                gts.pop(match[1])
            else:
                fp += 1
    scenes = len(predictions)
    return {
        "objects": n_obj,
        "found": hit,
        "found_share": round(hit / max(n_obj, 1), 4),
        "scenes": scenes,
        "false_positives": fp,
        "fp_per_scene": round(fp / max(scenes, 1), 4),
    }


def _detections(results) -> list[dict]:
    """Ultralytics results as ``[{"image": name, "detections": [[class, score, xyxy], ...]}]``."""
    out = []
    for r in results:
        dets = [(r.names[int(c)], float(p), b.tolist()) for c, p, b in zip(r.boxes.cls, r.boxes.conf, r.boxes.xyxy)]
        out.append({"image": Path(r.path).name, "detections": [[n, round(p, 3), [round(v) for v in b]]
                                                               for n, p, b in dets]})  # fmt: skip
    return out


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / union if union > 0 else 0.0


def _novel_refs_and_scenes(data_dir: Path, refs_dir: Path, k: int):
    """A reference folder (``<class>/*.jpg``: K clean photos per novel class, cropped to the object), the held-out
    scenes that hold a novel object, and those objects per scene."""
    import yaml as pyyaml

    from .data.split import FewShotSplit

    data = pyyaml.safe_load((data_dir / "fold0.yaml").read_text())
    split = FewShotSplit.from_data(data)
    shutil.rmtree(refs_dir, ignore_errors=True)
    support = json.loads((data_dir / "fold0" / "objects_support.json").read_text())
    for c in split.novel:
        (refs_dir / split.names[c]).mkdir(parents=True, exist_ok=True)
        ids = [int(i) for i, objs in support.items() if objs[0]["label"] == c][:k]
        for i in ids:
            img = cv2.imread(str(data_dir / "fold0" / "images" / "support" / f"{i:06d}.jpg"))
            x1, y1, x2, y2 = support[str(i)][0]["box"]
            cv2.imwrite(str(refs_dir / split.names[c] / f"{i:06d}.jpg"), img[y1:y2, x1:x2])
    objects = json.loads((data_dir / "fold0" / "objects_val.json").read_text())
    scenes, truth = [], {}
    for i, objs in objects.items():
        novel = [(split.names[o["label"]], o["box"]) for o in objs if o["label"] in split.novel]
        if novel:
            name = f"{int(i):06d}.jpg"
            scenes.append(data_dir / "fold0" / "images" / "val" / name)
            truth[name] = novel
    return refs_dir, scenes, truth


def _instance_refs_and_scenes(data_dir: Path, refs_dir: Path):
    """Instance search: a reference folder with one clean photo of each novel object (cropped to it), the held-out
    instance scenes, and the objects in each (every novel object is its own class)."""
    import yaml as pyyaml

    root = data_dir / "fold0-instance"
    names = pyyaml.safe_load((data_dir / "fold0-instance.yaml").read_text())["names"]
    shutil.rmtree(refs_dir, ignore_errors=True)
    for i, objs in json.loads((root / "objects_support.json").read_text()).items():
        (refs_dir / names[objs[0]["label"]]).mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(root / "images" / "support" / f"{int(i):06d}.jpg"))
        x1, y1, x2, y2 = objs[0]["box"]
        cv2.imwrite(str(refs_dir / names[objs[0]["label"]] / f"{int(i):06d}.jpg"), img[y1:y2, x1:x2])
    scenes, truth = [], {}
    for i, objs in json.loads((root / "objects_test.json").read_text()).items():
        name = f"{int(i):06d}.jpg"
        scenes.append(root / "images" / "test" / name)
        truth[name] = [(names[o["label"]], o["box"]) for o in objs if o["label"] is not None]  # (not clutter)
    return refs_dir, scenes, truth


def _contact_sheet(images: list[Path], path: Path, side: int = 320, cols: int = 3) -> None:
    """A grid of annotated predictions (the README's picture)."""
    if not images:
        return
    tiles = []
    for f in images:
        im = cv2.imread(str(f))
        s = side / max(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        canvas = np.full((side, side, 3), 255, np.uint8)
        canvas[: im.shape[0], : im.shape[1]] = im
        tiles.append(canvas)
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    ok, buf = cv2.imencode(".jpg", grid, [cv2.IMWRITE_JPEG_QUALITY, 85])
    write_atomic(path, buf.tobytes())


def _markdown(report: dict) -> str:
    rows, t, f, s = report["validation"], report["timing_s"], report["found"], report["settings"]
    lines = [
        f"Model: {report['model']}",
        "",
        "| K (references per class) | base AP50 | base AP50-95 | novel AP50 | novel AP50-95 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shots']} | {r.get('coco_base_mAP50', float('nan')):.3f} | "
            f"{r.get('coco_base_mAP50-95', float('nan')):.3f} | {r.get('coco_novel_mAP50', float('nan')):.3f} | "
            f"{r.get('coco_novel_mAP50-95', float('nan')):.3f} |"
        )
    lines += [
        "",
        f"Category search, held-out scenes, the novel classes searched from {s['ref_shots']} photos each of other "
        f"objects of the class, conf >= "
        f"{s['conf']}: **{f['found']} of {f['objects']} novel objects found ({100 * f['found_share']:.0f} %)**, "
        f"{f['false_positives']} false positives in {f['scenes']} scenes (**{f['fp_per_scene']:.2f} per scene**).",
    ]
    i = report.get("instance")
    if i:
        lines += [
            "",
            f"Instance search (each novel object its own class, found from one photo of it, among look-alikes), conf "
            f">= {s['conf']}: **{i['found']} of {i['objects']} objects found ({100 * i['found_share']:.0f} %)**, "
            f"{i['false_positives']} false positives in {i['scenes']} scenes (**{i['fp_per_scene']:.2f} per scene**).",
        ]
    lines += [
        "",
        f"Time: data {t['data_s']:.0f} s, training {t['train_s'] / 60:.1f} min, validation {t['val_s']:.0f} s, "
        f"predictions {t['predict_s']:.0f} s; total {t['total_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"
