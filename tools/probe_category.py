"""How well does the frozen trunk rank a category's members, given perfect boxes? (category search, issue 11)

    python tools/probe_category.py --fold 1            # K=5, levels P3-P5 of the ImageNet EfficientNet-Lite0 trunk

For each novel class of the fold: its prototype is the mean of the first K support objects' crop embeddings (masked
means, as references are encoded); every labelled object of the validation scenes, cropped at its ground-truth box,
is ranked by cosine to it; printed: the ranking AP (the class's members are the positives), the AP when an object
keeps its score only if the class is its nearest prototype (competition), and how often a member's nearest prototype
is its own class. Unlabelled clutter stamps are not in the ranking (they have no box): the gap between this and the
detector's AP is candidates, boxes and clutter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Non-interpolated AP of a ranking (mean precision at each positive)."""
    order = np.argsort(-score, kind="stable")
    y = positive[order].astype(np.float64)
    precision = np.cumsum(y) / np.arange(1, len(y) + 1)
    return float((precision * y).sum() / max(1.0, y.sum()))


def objects(root: Path, split: str) -> list[tuple[str, int, list[float]]]:
    """(image path, class, xyxy box in pixels) of every labelled object of a split, from the benchmark's
    ``objects_<split>.json`` (clutter, unlabelled, left out)."""
    table = json.loads((root / f"objects_{split}.json").read_text())
    return [
        (str(root / "images" / split / f"{int(i):06d}.jpg"), o["label"], o["box"])
        for i, objs in table.items()
        for o in objs
        if o["label"] is not None
    ]


@torch.no_grad()
def embed(net, items, size: int = 128, batch: int = 64) -> list[torch.Tensor]:
    """Masked-mean crop embeddings of each object on the trunk's last three levels (P3, P4, P5): ``[n, D_l]`` each."""
    from yolo_fewshot.encoders.base import masked_mean
    from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLite
    from yolo_fewshot.references.crops import make_crop

    levels = [[], [], []]
    for i in range(0, len(items), batch):
        crops, masks = zip(*[make_crop(im, box, size, 0.1) for im, _, box in items[i : i + batch]])
        feats = net.features(EfficientNetLite.normalize(torch.stack(crops)))  # P2..P5
        for lv, f in enumerate(feats[1:]):
            levels[lv].append(masked_mean(f, torch.stack(masks).float()))
    return [torch.cat(lv) for lv in levels]


def main(argv: list[str] | None = None) -> dict:
    from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLite, weights_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", default=str(ROOT / "data" / "stamps"))
    ap.add_argument("--k", type=int, default=5, help="support objects per class prototype")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = yaml.safe_load((Path(a.data) / f"fold{a.fold}.yaml").read_text())
    names = cfg["names"]
    novel = [c for c, n in names.items() if n in cfg["novel"]]
    root = Path(a.data) / f"fold{a.fold}"
    net = EfficientNetLite(torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)).eval()
    support, val = objects(root, "support"), objects(root, "val")
    s_emb, q_emb = embed(net, support), embed(net, val)
    s_cls, q_cls = np.array([c for _, c, _ in support]), np.array([c for _, c, _ in val])
    counts = ", ".join(f"{names[c]} {(q_cls == c).sum()}" for c in novel)
    print(f"fold {a.fold}: {len(val)} labelled validation objects ({counts}); K={a.k}")
    report = {}
    for lv, level in ((2, "P5"), (1, "P4"), (0, "P3")):
        q = F.normalize(q_emb[lv], dim=-1)
        protos = torch.stack(
            [
                F.normalize(F.normalize(s_emb[lv][np.flatnonzero(s_cls == c)[: a.k]], dim=-1).mean(0), dim=-1)
                if (s_cls == c).any()
                else torch.zeros(q.shape[1])
                for c in range(len(names))
            ]
        )
        cos = (q @ protos.T).numpy()  # [objects, classes]
        nearest = cos.argmax(1)
        rank = [average_precision(q_cls == c, cos[:, c]) for c in novel]
        gated = [average_precision(q_cls == c, np.where(nearest == c, cos[:, c], -1.0)) for c in novel]
        top1 = [float((nearest[q_cls == c] == c).mean()) for c in novel]
        report[level] = {"ranking_AP": rank, "competition_AP": gated, "own_class_nearest": top1}
        per = ", ".join(f"{names[c]} {r:.3f}" for c, r in zip(novel, rank))
        print(
            f"  {level}: ranking AP {np.mean(rank):.3f} ({per}); with competition {np.mean(gated):.3f}; "
            f"own class nearest {', '.join(f'{t:.2f}' for t in top1)}"
        )
    return report


if __name__ == "__main__":
    main()
