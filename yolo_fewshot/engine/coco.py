"""COCO-format evaluation with pycocotools, so few-shot numbers are the standard ones.

Ground truth is built from the Ultralytics dataset's own (checked) labels with the image ids Ultralytics'
``pred_to_json`` gives predictions (the file stem, as an int when numeric), so any YOLO-format dataset can be scored;
both files are written next to the run.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_atomic
from ..data.support import label_shape


def image_id(im_file: str) -> int | str:
    """The image id Ultralytics' ``pred_to_json`` uses for ``im_file``."""
    stem = Path(im_file).stem
    return int(stem) if stem.isnumeric() else stem


def coco_ground_truth(labels: Sequence[dict], names: dict[int, str], class_map: Sequence[int]) -> dict:
    """COCO ``instances`` dict from Ultralytics dataset labels (``im_file``, ``shape`` (h, w), ``cls``, ``bboxes``
    normalised xywh)."""
    images, anns = [], []
    for lb in labels:
        h, w = label_shape(lb)
        iid = image_id(lb["im_file"])
        images.append({"id": iid, "file_name": Path(lb["im_file"]).name, "height": int(h), "width": int(w)})
        for c, (x, y, bw, bh) in zip(lb["cls"].reshape(-1).tolist(), lb["bboxes"].tolist()):
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": int(class_map[int(c)]),
                    "bbox": [round(v, 3) for v in box],
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": int(class_map[i]), "name": n} for i, n in names.items()]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_evaluate(gt: dict, dets: list[dict], cat_ids: Sequence[int] | None = None) -> tuple[float, float]:
    """pycocotools bbox mAP50-95 and mAP50 of ``dets`` against ``gt`` over ``cat_ids`` (all when None).

    Returns NaN when the categories have no ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if cat_ids is not None:
        present = {a["category_id"] for a in gt["annotations"]}
        cat_ids = [c for c in cat_ids if c in present]
        if not cat_ids:
            return float("nan"), float("nan")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if not dets:
            return 0.0, 0.0
        res = coco.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
        ev = COCOeval(coco, res, "bbox")
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0)), float(max(ev.stats[1], 0.0))


def write_json(obj: dict | list, path: Path) -> Path:
    """Atomic JSON write."""
    return write_atomic(path, json.dumps(obj))
