"""Crop embeddings of a fold's base-class objects, for learning the verification metric (probe, step 1).

Every object of the fold's ``train`` scenes (labelled base-class objects and unlabelled distractors alike, each with
its stamp's identity) and every ``support`` photo is cropped the way verification crops a candidate (square, 10 %
context, 128 px, box mask), with ``--views`` jittered boxes per object (the head's boxes are never exact), and
encoded by the frozen trunk (P5 masked mean). Objects of the fold's novel classes are skipped (the fold protocol
keeps them out of training scenes already).

    python tools/metric_features.py --fold 0 --out runs/metric/fold0.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/stamps"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--views", type=int, default=3, help="boxes per object: the exact one, then jittered ones")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    from yolo_fewshot.encoders.base import masked_mean
    from yolo_fewshot.nn.lite_backbone import LiteBackbone
    from yolo_fewshot.nn.verify import CropVerifier

    torch.set_num_threads(2)
    trunk = LiteBackbone("efficientnet-lite0", frozen=True).eval()
    ver = CropVerifier()
    root = a.data / f"fold{a.fold}"
    novel = set(yaml.safe_load((a.data / f"fold{a.fold}.yaml").read_text())["novel"])  # never learned from
    rng = np.random.default_rng(0)
    feats, stamps, labels, views = [], [], [], []
    for split in ("train", "support"):
        objects = json.loads((root / f"objects_{split}.json").read_text())
        for i, objs in objects.items():
            objs = [o for o in objs if o["cls"] not in novel]
            if not objs:
                continue
            img = cv2.imread(str(root / "images" / split / f"{int(i):06d}.jpg"))[..., ::-1]
            t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            boxes, meta = [], []
            for o in objs:
                b = np.asarray(o["box"], np.float32)
                wh = b[2:] - b[:2]
                for v in range(a.views if split == "train" else 1):
                    if v:
                        c = (b[:2] + b[2:]) / 2 + rng.uniform(-0.1, 0.1, 2) * wh
                        s = wh * rng.uniform(0.85, 1.15, 2)
                        jb = np.concatenate([c - s / 2, c + s / 2])
                    else:
                        jb = b
                    boxes.append(jb)
                    meta.append((o["stamp"], -1 if o["label"] is None else int(o["label"]), v))
            bt = torch.tensor(np.stack(boxes), dtype=torch.float32)
            with torch.no_grad():
                crops, masks = ver.crops(t, torch.zeros(len(bt), dtype=torch.long), bt, ver.crop_size(False))
                feats.append(masked_mean(trunk(crops)[-1], masks))
            for s, lab, v in meta:
                stamps.append(s), labels.append(lab), views.append(v if split == "train" else -1)
    names = sorted(set(stamps))
    out = {
        "emb": torch.cat(feats).half(),
        "stamp": torch.tensor([names.index(s) for s in stamps]),
        "folder": torch.tensor(
            [sorted({n.rsplit("/", 1)[0] for n in names}).index(s.rsplit("/", 1)[0]) for s in stamps]
        ),
        "label": torch.tensor(labels),
        "view": torch.tensor(views),  # -1: a support (clean) photo
        "names": names,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, a.out)
    print(f"{len(stamps)} crops of {len(names)} stamps -> {a.out}")


if __name__ == "__main__":
    main()
