"""``yolo-fewshot demo``: the whole user path on real photos, on a CPU, in under 15 minutes.

1. builds a small fold of the real-photo benchmark (:mod:`yolo_fewshot.data.benchmark`; fruit and vegetables are
   the novel classes, never seen in training);
2. trains ``yolov8n-psalm-p2`` episodically on the base classes with the offline ``efficientnet-lite0`` encoder;
3. scores it with seeded K-shot references (base and novel AP, pycocotools);
4. detects the novel objects in held-out scenes from three reference photos each and saves annotated images with the
   reference thumbnails;
writing everything to ``runs/demo/`` (``results.md``, ``results.json``, ``predictions/``, ``demo.jpg``).
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
    "epochs": 12,
    "imgsz": 256,
    "batch": 16,
    "n_way": 2,
    "n_train": 240,
    "n_val": 48,
    "shots": "1,3",
    "project": "runs",
    "name": "demo",
    "encoder": "efficientnet-lite0",
    "model": "yolov8n-psalm-p2.yaml",
    "workers": 2,
    "conf": 0.25,  # score threshold of the saved predictions
}
REF_SHOTS = 3  # reference photos per novel class for the predictions


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
    out = (Path(cfg["project"]) / cfg["name"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}

    data_dir = out / "data"
    yaml = data_dir / "fold0.yaml"
    if not yaml.is_file():  # the data is deterministic: a rerun reuses it
        src = load_sources(default_cache())
        build_fold(src, data_dir, 0, size=cfg["imgsz"], n_train=cfg["n_train"], n_val=cfg["n_val"],
                   n_novel_train=0, n_instance=0)  # fmt: skip
    timing["data_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    weights = out / "train" / "weights" / "last.pt"
    if weights.is_file() and not training_finished(weights):  # an interrupted demo: continue, do not start over
        FewShotYOLO(str(weights)).train(resume=True)
    elif not weights.is_file():
        FewShotYOLO(cfg["model"], encoder=cfg["encoder"]).train(
            data=str(yaml), epochs=cfg["epochs"], imgsz=cfg["imgsz"], batch=cfg["batch"], n_way=cfg["n_way"],
            project=str(out), name="train", exist_ok=True, workers=cfg["workers"], seed=0, plots=False,
            shots=str(cfg["shots"]).split(",")[-1], seeds=1, val=False,  # validated once below, with every K
            warmup_epochs=1,  # Ultralytics' 3 warm-up epochs would be a quarter of this short run
        )  # fmt: skip
    timing["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    model = FewShotYOLO(str(weights))
    metrics = model.val(
        data=str(yaml), shots=cfg["shots"], seeds=1, imgsz=cfg["imgsz"], batch=cfg["batch"], save_json=True,
        plots=False, project=str(out), name="val", exist_ok=True, workers=0,
    )  # fmt: skip
    rows = [{k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()} for r in metrics.fewshot]
    timing["val_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    refs, scenes = _novel_refs_and_scenes(data_dir, out / "refs", REF_SHOTS, 6)
    pred_dir = out / "predictions"
    shutil.rmtree(pred_dir, ignore_errors=True)
    results = model.predict(
        [str(s) for s in scenes], refs=str(refs), imgsz=cfg["imgsz"], conf=cfg["conf"], save=True,
        project=str(out), name="predictions", exist_ok=True, verbose=False,
    )  # fmt: skip
    found = [
        {"image": Path(r.path).name, "detections": [[r.names[int(c)], round(float(p), 3)] for c, p in
                                                    zip(r.boxes.cls, r.boxes.conf)]}
        for r in results
    ]  # fmt: skip
    _overview(sorted(pred_dir.glob("*.jpg"))[:4], out / "demo.jpg")
    timing["predict_s"] = time.perf_counter() - t3
    timing["total_s"] = time.perf_counter() - t0

    report = {"settings": cfg, "validation": rows, "predictions": found, "timing_s": {k: round(v, 1) for k, v in
                                                                                    timing.items()}}  # fmt: skip
    write_atomic(out / "results.json", json.dumps(report, indent=1))
    write_atomic(out / "results.md", _markdown(report))
    print(_markdown(report))
    print(f"demo: outputs in {out} (results.md, demo.jpg, predictions/) after {timing['total_s'] / 60:.1f} min")
    return out


def _novel_refs_and_scenes(data_dir: Path, refs_dir: Path, k: int, n_scenes: int) -> tuple[Path, list[Path]]:
    """A reference folder (``<class>/*.jpg``: K clean photos per novel class, cropped to the object) and held-out
    val scenes that contain novel objects."""
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
    scenes = [
        data_dir / "fold0" / "images" / "val" / f"{int(i):06d}.jpg"
        for i, objs in objects.items()
        if any(o["label"] in split.novel for o in objs)
    ]
    return refs_dir, scenes[:n_scenes]


def _overview(images: list[Path], path: Path, side: int = 384) -> None:
    """A 2x2 grid of annotated predictions (the README's picture)."""
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
    while len(tiles) % 2:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i : i + 2]) for i in range(0, len(tiles), 2)])
    ok, buf = cv2.imencode(".jpg", grid, [cv2.IMWRITE_JPEG_QUALITY, 85])
    write_atomic(path, buf.tobytes())


def _markdown(report: dict) -> str:
    rows, t = report["validation"], report["timing_s"]
    lines = [
        "| K (references per class) | base AP50 | base AP50-95 | novel AP50 | novel AP50-95 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shots']} | {r.get('coco_base_mAP50', float('nan')):.3f} | "
            f"{r.get('coco_base_mAP50-95', float('nan')):.3f} | {r.get('coco_novel_mAP50', float('nan')):.3f} | "
            f"{r.get('coco_novel_mAP50-95', float('nan')):.3f} |"
        )
    n_det = sum(len(p["detections"]) for p in report["predictions"])
    lines += [
        "",
        f"Predictions: {n_det} detections (conf >= {report['settings']['conf']}) of the novel classes in "
        f"{len(report['predictions'])} held-out scenes, from {REF_SHOTS} reference photos per class.",
        f"Time: data {t['data_s']:.0f} s, training {t['train_s'] / 60:.1f} min, validation {t['val_s']:.0f} s, "
        f"predictions {t['predict_s']:.0f} s; total {t['total_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"
