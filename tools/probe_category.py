"""How well does the frozen trunk rank a category's members, given perfect boxes? (category search, issue 11)

    python tools/probe_category.py --fold 1            # K=5, levels P3-P5 of the ImageNet EfficientNet-Lite0 trunk
    python tools/probe_category.py --fold 1 --clutter  # the scenes' unlabelled distractors ranked too (negatives)
    python tools/probe_category.py --fold 1 --clutter --trunk centernet --center   # the COCO CenterNet's trunk
    python tools/probe_category.py --fold 1 --clutter --coco-share 0.25   # Lite0 mixed with CenterNet's c4 (centred)

For each novel class of the fold: its prototype is the mean of the first K support objects' crop embeddings (masked
means, as references are encoded); every labelled object of the validation scenes, cropped at its ground-truth box,
is ranked by cosine to it; printed: the ranking AP (the class's members are the positives), the AP when an object
keeps its score only if the class is its nearest prototype (competition), and how often a member's nearest prototype
is its own class. Without ``--clutter`` the scenes' unlabelled distractors are not in the ranking, with it they are
(negatives at their ground-truth boxes, as a detector meets them): the gap between that and the detector's AP is
candidates and boxes. ``--trunk centernet`` embeds with the ported COCO CenterNet's MobileNetV3 (levels c3-c5, crops
in 0..255); ``--center`` subtracts the mean embedding of the training scenes' objects before the cosine;
``--metric-steps N`` first learns a category metric on the training scenes' objects (:func:`learn_metric`: base
classes, their clutter as background) and ranks in it.

Measured (K=5, ``--clutter``; Lite0 P5 / centred / CenterNet c4 centred / learned metric P5 at 400 steps): fold 1
(vehicles, military) 0.223 / 0.192 / 0.293 / 0.305; fold 0 0.349 / 0.385 / 0.313 / 0.351; fold 2 0.534 / 0.540 /
0.161 / 0.550. Folds 0 / 1 / 2: trunk's last two stages fine-tuned (``--tune-steps 400``) 0.287 / 0.224 / 0.470;
nearest of the K references (``--combine max``) 0.366 / 0.243 / 0.523 (docs/benchmark.md, "Why fold 1's categories
stay low").
Lite0 P5 mixed with CenterNet's c4 cosine, a quarter of it (``--coco-share 0.25``, category search's default in the
detector): 0.418 / 0.260 / 0.502.
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


def objects(root: Path, split: str, clutter: bool = False) -> list[tuple[str, int, list[float]]]:
    """(image path, class, xyxy box in pixels) of every labelled object of a split, from the benchmark's
    ``objects_<split>.json``; unlabelled clutter left out, or with ``clutter`` kept as class -1."""
    table = json.loads((root / f"objects_{split}.json").read_text())
    return [
        (str(root / "images" / split / f"{int(i):06d}.jpg"), -1 if o["label"] is None else o["label"], o["box"])
        for i, objs in table.items()
        for o in objs
        if clutter or o["label"] is not None
    ]


def trunk_levels(name: str):
    """``crops [B, 3, S, S]`` in [0, 1] -> the last three levels' maps of the named frozen trunk (``lite0``: the
    ImageNet EfficientNet-Lite0, P3-P5; ``centernet``: the COCO CenterNet's MobileNetV3, c3-c5)."""
    if name == "centernet":
        from yolo_fewshot.nn.centernet import CenterNet

        cn = CenterNet.from_file()
        return lambda x: [cn.trunk(x * 255)[k] for k in ("c3", "c4", "c5")]
    from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLite, weights_path

    net = EfficientNetLite(torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)).eval()
    return lambda x: net.features(EfficientNetLite.normalize(x))[1:]  # P3..P5


@torch.no_grad()
def embed(levels_of, items, size: int = 128, batch: int = 64) -> list[torch.Tensor]:
    """Masked-mean crop embeddings of each object on a trunk's last three levels (``levels_of``, e.g.
    :func:`trunk_levels`): ``[n, D_l]`` each."""
    from yolo_fewshot.encoders.base import masked_mean
    from yolo_fewshot.references.crops import make_crop

    levels = [[], [], []]
    for i in range(0, len(items), batch):
        crops, masks = zip(*[make_crop(im, box, size, 0.1) for im, _, box in items[i : i + batch]])
        for lv, f in enumerate(levels_of(torch.stack(crops))):
            levels[lv].append(masked_mean(f, torch.stack(masks).float()))
    return [torch.cat(lv) for lv in levels]


def train_episodes(embed, params, cls: torch.Tensor, steps: int, lr: float, log: bool = False) -> None:
    """Train ``params`` on category episodes: 8 base classes, a prototype from 5 of each class's objects, 5 more as
    queries and 40 clutter objects as background (a learned threshold logit), cross-entropy over the classes and the
    background; AdamW, weight decay 0.05.

    Args:
        embed: Object indices ``[n]`` -> unit embeddings ``[n, D]`` (through what is trained).
        params: The trained parameters.
        cls: ``[N]`` classes of the objects (-1: clutter).
        steps: Optimiser steps.
        lr: Learning rate.
        log: Print the loss every 100 steps.
    """
    scale, background = 10.0, torch.nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.AdamW([*params, background], lr=lr, weight_decay=0.05)
    classes = [c for c in cls.unique().tolist() if c >= 0 and (cls == c).sum() >= 10]
    clutter = (cls < 0).nonzero()[:, 0]
    for step in range(steps):
        picked = torch.tensor(classes)[torch.randperm(len(classes))[:8]].tolist()
        proto_idx, query_idx, target = [], [], []
        for i, c in enumerate(picked):
            members = (cls == c).nonzero()[:, 0]
            members = members[torch.randperm(len(members))]
            proto_idx.append(members[:5])
            query_idx.append(members[5:10])
            target += [i] * len(members[5:10])
        query_idx.append(clutter[torch.randperm(len(clutter))[:40]])
        target += [len(picked)] * len(query_idx[-1])
        emb = embed(torch.cat(proto_idx + query_idx))
        n_p = 5 * len(picked)
        protos = F.normalize(emb[:n_p].view(len(picked), 5, -1).mean(1), dim=-1)
        logits = torch.cat([scale * emb[n_p:] @ protos.T, (scale * background).expand(len(emb) - n_p, 1)], 1)
        loss = F.cross_entropy(logits, torch.tensor(target))
        opt.zero_grad(), loss.backward(), opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)


def learn_metric(emb: torch.Tensor, cls: torch.Tensor, steps: int, lr: float, seed: int = 0):
    """A category metric learned on base-class objects: ``normalize(x̂ + MLP(x̂))``, ``x̂ = normalize(x)``, the MLP's
    output layer zero-initialised (step 0 is the plain cosine), trained episodically: 8 base classes, a prototype from
    5 of each class's objects, 5 more as queries and 40 clutter objects as background (a learned threshold logit),
    cross-entropy over the classes and the background.

    Args:
        emb: ``[n, D]`` embeddings of training-scene objects.
        cls: ``[n]`` their classes (-1: clutter).
        steps: Optimiser steps (AdamW, weight decay 0.05).
        lr: Learning rate.
        seed: Episode sampling seed.

    Returns:
        ``[m, D] -> [m, D]`` (unit vectors), without gradients.
    """
    torch.manual_seed(seed)
    d = emb.shape[1]
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 512), torch.nn.ReLU(), torch.nn.Linear(512, d))
    torch.nn.init.zeros_(mlp[2].weight), torch.nn.init.zeros_(mlp[2].bias)

    def project(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        return F.normalize(x + mlp(x), dim=-1)

    train_episodes(lambda idx: project(emb[idx]), mlp.parameters(), cls, steps, lr)
    return lambda x: project(x).detach()


def tune_trunk(items, steps: int, lr: float, first: int = 11, size: int = 128, seed: int = 0):
    """The unfrozen-trunk ablation at the embedding level: EfficientNet-Lite0's blocks ``first``.. (11: its last two
    stages, stride 32) fine-tuned on base-class objects with :func:`learn_metric`'s episodes and loss (8 base classes,
    5-shot prototypes, 5 queries each, 40 clutter objects against a learned background logit), BatchNorm kept at its
    ImageNet statistics; the earlier blocks stay frozen, so their output is computed once.

    Args:
        items: Training-scene objects ``(image, class, box)`` (class -1: clutter).
        steps: Optimiser steps (AdamW, weight decay 0.05).
        lr: Learning rate.
        first: First block trained (blocks before it stay frozen).
        size: Crop side.
        seed: Episode sampling seed.

    Returns:
        A :func:`trunk_levels`-style ``crops -> [P3, P4, P5]`` whose P5 comes from the tuned blocks (P3 / P4 unchanged
        when ``first`` > 10).
    """
    from yolo_fewshot.encoders.base import masked_mean
    from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLite, weights_path
    from yolo_fewshot.references.crops import make_crop

    torch.manual_seed(seed)
    net = EfficientNetLite(torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)).eval()
    head, tail = net._blocks[:first], net._blocks[first:]
    net.requires_grad_(False)
    tail.requires_grad_(True)

    def stem(x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(net._bn0(net._conv_stem(EfficientNetLite.normalize(x))))
        for blk in head:
            x = blk(x)
        return x

    with torch.no_grad():
        feats, masks = [], []
        for i in range(0, len(items), 64):
            crops, ms = zip(*[make_crop(im, box, size, 0.1) for im, _, box in items[i : i + 64]])
            feats.append(stem(torch.stack(crops)))
            masks.append(torch.stack(ms).float())
        feats, masks = torch.cat(feats), torch.cat(masks)
    cls = torch.tensor([c for _, c, _ in items])

    def p5(idx: torch.Tensor) -> torch.Tensor:
        x = feats[idx]
        for blk in tail:
            x = blk(x)
        return F.normalize(masked_mean(x, masks[idx]), dim=-1)

    train_episodes(p5, tail.parameters(), cls, steps, lr, log=True)
    net.requires_grad_(False)
    return lambda x: net.features(EfficientNetLite.normalize(x))[1:]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", default=str(ROOT / "data" / "stamps"))
    ap.add_argument("--k", type=int, default=5, help="support objects per class prototype")
    ap.add_argument("--clutter", action="store_true", help="rank the scenes' unlabelled distractors too")
    ap.add_argument("--trunk", choices=("lite0", "centernet"), default="lite0")
    ap.add_argument("--center", action="store_true", help="subtract the training objects' mean embedding")
    ap.add_argument("--combine", choices=("mean", "max"), default="mean", help="K references: mean or nearest")
    ap.add_argument("--metric-steps", type=int, default=0, help="learn a category metric first (0: none)")
    ap.add_argument("--metric-lr", type=float, default=1e-4)
    ap.add_argument("--tune-steps", type=int, default=0, help="fine-tune the trunk's last blocks first (0: frozen)")
    ap.add_argument("--tune-lr", type=float, default=1e-4)
    ap.add_argument("--tune-from", type=int, default=11, help="first Lite0 block fine-tuned (11: the last 2 stages)")
    ap.add_argument("--coco-share", type=float, default=0.0,
                    help="also rank by the mean of each level's cosine and the COCO CenterNet's c4 cosine (centred on "
                         "the training objects), this share of it (0: not)")  # fmt: skip
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = yaml.safe_load((Path(a.data) / f"fold{a.fold}.yaml").read_text())
    names = cfg["names"]
    novel = [c for c, n in names.items() if n in cfg["novel"]]
    root = Path(a.data) / f"fold{a.fold}"
    levels_of = trunk_levels(a.trunk)
    if a.tune_steps:  # on the same 2500 training-scene objects as the learned metric
        if a.trunk != "lite0":
            ap.error("--tune-steps needs --trunk lite0")
        levels_of = tune_trunk(objects(root, "train", True)[:2500], a.tune_steps, a.tune_lr, a.tune_from)
    support, val = objects(root, "support"), objects(root, "val", a.clutter)
    s_emb, q_emb = embed(levels_of, support), embed(levels_of, val)
    if a.center:  # the mean of 1000 training-scene objects (base classes and clutter), per level
        mean = [F.normalize(t, dim=-1).mean(0) for t in embed(levels_of, objects(root, "train", True)[:1000])]
        s_emb = [F.normalize(e, dim=-1) - m for e, m in zip(s_emb, mean)]
        q_emb = [F.normalize(e, dim=-1) - m for e, m in zip(q_emb, mean)]
    if a.metric_steps:  # learned on 2500 training-scene objects (base classes and clutter), per level
        train = objects(root, "train", True)[:2500]
        t_emb, t_cls = embed(levels_of, train), torch.tensor([c for _, c, _ in train])
        for lv in range(3):
            metric = learn_metric(t_emb[lv], t_cls, a.metric_steps, a.metric_lr)
            s_emb[lv], q_emb[lv] = metric(s_emb[lv]), metric(q_emb[lv])
    if a.coco_share:  # the second view of category search (yolo_fewshot.nn.coco_embedding), centred as --center does
        coco_of = trunk_levels("centernet")
        centre = F.normalize(embed(coco_of, objects(root, "train", True)[:1000])[1], dim=-1).mean(0)
        s_coco, q_coco = (F.normalize(embed(coco_of, x)[1], dim=-1) - centre for x in (support, val))
    s_cls, q_cls = np.array([c for _, c, _ in support]), np.array([c for _, c, _ in val])
    counts = ", ".join(f"{names[c]} {(q_cls == c).sum()}" for c in novel)
    n_clutter = int((q_cls < 0).sum())
    print(f"fold {a.fold}: {len(val) - n_clutter} labelled validation objects ({counts}), {n_clutter} clutter; K={a.k}")
    report = {}
    for lv, level in ((2, "P5"), (1, "P4"), (0, "P3")):  # (c5, c4, c3 for the CenterNet trunk)
        q = F.normalize(q_emb[lv], dim=-1)
        refs = [F.normalize(s_emb[lv][np.flatnonzero(s_cls == c)[: a.k]], dim=-1) for c in range(len(names))]
        if a.combine == "mean":  # one prototype per class: the mean of its K references
            protos = torch.stack([F.normalize(r.mean(0), dim=-1) if len(r) else torch.zeros(q.shape[1]) for r in refs])
            cos = (q @ protos.T).numpy()  # [objects, classes]
            if a.coco_share:
                cq = F.normalize(q_coco, dim=-1)
                cp = torch.stack([F.normalize(s_coco[np.flatnonzero(s_cls == c)[: a.k]].mean(0), dim=-1)
                                  for c in range(len(names))])  # fmt: skip
                cos = (1 - a.coco_share) * cos + a.coco_share * (cq @ cp.T).numpy()
        else:  # nearest reference: each object scored by its most similar of the class's K references
            cos = torch.stack([(q @ r.T).amax(1) if len(r) else torch.full((len(q),), -1.0) for r in refs], 1).numpy()
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
