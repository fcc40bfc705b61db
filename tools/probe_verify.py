"""Probe crop verification: record every candidate of one validation pass, then score variants offline.

One pass of the real validator (same K-shot draw, same prototypes) records, per image, a wide candidate set — the
head's own candidates (best class score), the head's best boxes by objectness alone, CenterNet's boxes — with each
candidate's crop embedding, objectness and the per-reference prototypes. Scoring rules (candidate source, top-1 rule,
mean vs nearest reference, centring, score formula) are then compared with pycocotools on the same records, in
seconds instead of a validation pass each.

    python tools/probe_verify.py --fold 0 --shots 5 --record runs/probe/fold0-k5.pt  # one validation pass (~10 min)
    python tools/probe_verify.py --fold 0 --shots 1 --instance --record runs/probe/fold0-inst.pt
    python tools/probe_verify.py --record runs/probe/fold0-k5.pt   # re-score an existing record only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))


def record(a: argparse.Namespace) -> dict:
    from torchvision.ops import batched_nms

    import yolo_fewshot.nn.verify as V
    from yolo_fewshot import FewShotYOLO
    from yolo_fewshot.encoders.base import masked_mean
    from yolo_fewshot.engine.val import FewShotValidator

    rec: list[dict] = []
    pre, call = FewShotValidator.preprocess, V.CropVerifier.__call__

    def preprocess(self, batch):
        batch = pre(self, batch)
        # letterbox (gain, (pad_w, pad_h)) of each image: boxes go back to the image's own pixels offline
        rec.append({"files": list(batch["im_file"]), "pads": [[float(rp[0][0]), *map(float, rp[1])]
                                                              for rp in batch["ratio_pad"]]})  # fmt: skip
        # each class's K references one by one (last level, view 0), the query image's own excluded as validation does
        refs = []
        for im in batch["im_file"]:
            per = []
            for c in self.split.names:
                idx = [j for j in self.order[c] if self.table.image[j] != im][: self.k]
                lv = []
                for level in range(self.table.levels):  # every level: multi-level matching is scored offline
                    e = torch.stack([self.table.embeddings[j][level][0].reshape(
                        -1, self.table.embeddings[j][level].shape[-1])[0] for j in idx])  # fmt: skip
                    lv.append(torch.cat([e, e[:1].expand(self.k - len(e), -1)]) if len(e) < self.k else e)
                per.append(lv)
            refs.append([torch.stack([p[level] for p in per]).half() for level in range(self.table.levels)])
        rec[-1]["refs"] = [r[-1] for r in refs]  # [N, K, D] last level
        rec[-1]["refs_levels"] = refs  # per image: list over levels of [N, K, D_l]
        return batch

    @torch.no_grad()
    def verify(self, trunk, img, y, obj, protos, keypoints=None):
        # what is recorded uses the probe's crop size and CenterNet count (validation builds its own verifier)
        rv = dataclasses.replace(self, size=a.size, centernet_topk=a.centernet_topk)
        b, a_ = y.shape[0], y.shape[-1]
        boxes = V.xywh_to_xyxy(y[:, :4].transpose(1, 2))
        o = obj[:, 0].sigmoid()
        best = y[:, 4:].amax(1)
        cb, co = rv.centernet_boxes(img)
        per = []
        for i in range(b):
            sets = []
            for key, s in (("head", best[i]), ("obj", o[i])):
                top = s.topk(min(a_, 300)).indices
                keep = batched_nms(boxes[i, top], s[top], torch.zeros_like(top), self.iou)[: a.topk]
                sets.append((key, top[keep]))
            hb = torch.cat([boxes[i, t] for _, t in sets])
            ho = torch.cat([o[i, t] for _, t in sets])
            hs = torch.cat([y[i, 4:, t].T for _, t in sets])
            src = torch.cat([torch.full((len(t),), j) for j, (_, t) in enumerate(sets)])
            m = co[i] > 0
            allb = torch.cat([hb, cb[i, m]])
            allo = torch.cat([ho, co[i, m]])
            src = torch.cat([src, torch.full((int(m.sum()),), 2)])
            hs = torch.cat([hs, hs.new_zeros((int(m.sum()), hs.shape[1]))])
            crops, masks = rv.crops(img, torch.full((len(allb),), i), allb.to(img.dtype), rv.crop_size(False))
            feats = trunk(crops)
            emb = masked_mean(feats[-1], masks)
            per.append(dict(boxes=allb.cpu(), obj=allo.cpu(), head=hs.cpu(), src=src, emb=emb.half().cpu(),
                            emb_levels=[masked_mean(f, masks).half().cpu() for f in feats],
                            emb_levels_flip=[masked_mean(f, masks.flip(-1)).half().cpu()
                                             for f in trunk(crops.flip(-1))],
                            protos=protos[-1][min(i, len(protos[-1]) - 1)].half().cpu()))  # fmt: skip
        for j, d in enumerate(per):
            d["refs"] = rec[-1]["refs"][j]
            d["refs_levels"] = rec[-1]["refs_levels"][j]
        rec[-1]["images"] = per
        return call(self, trunk, img, y, obj, protos, keypoints)

    FewShotValidator.preprocess, V.CropVerifier.__call__ = preprocess, verify
    try:
        yaml = Path(a.data) / (f"fold{a.fold}-instance.yaml" if a.instance else f"fold{a.fold}.yaml")
        model = FewShotYOLO(a.model)
        model.val(
            data=str(yaml), shots=str(a.shots), seeds=1, imgsz=320, batch=16,
            save_json=False, plots=False, project="runs/probe", name="val", exist_ok=True, workers=0, verify=True,
        )  # fmt: skip
    finally:
        FewShotValidator.preprocess, V.CropVerifier.__call__ = pre, call
    out = {
        "files": [],
        "pads": [],
        "images": [],
        "args": {k: v if isinstance(v, (int, bool)) else str(v) for k, v in vars(a).items()},
    }
    for r in rec:
        out["files"] += r["files"]
        out["images"] += r["images"]
        out["pads"] += r["pads"]
    return out


def variants(r: dict, bench) -> None:
    from run_benchmark import score

    from yolo_fewshot.engine.coco import image_id

    imgs, files = r["images"], r["files"]
    pads = r.get("pads") or [[1.0, 16.0, 16.0]] * len(files)  # the first record had none: val pads 320 px to 352
    allemb = torch.cat([F.normalize(im["emb"].float(), dim=-1) for im in imgs])

    def dets_for(
        src=(0,),
        topk=10,
        top1=True,
        agg="mean",
        center=None,
        sim_power=4.0,
        obj_power=0.5,
        rule="pow",
        head_power=0.0,
        margin=None,
        topn=None,
        norm=None,
        zscore=None,
        knn=10,
        levels=None,
        flip=None,
    ):
        dets = []
        for f, im, (gain, pw, ph) in zip(files, imgs, pads):
            keep = torch.zeros(len(im["src"]), dtype=torch.bool)
            for s in src:
                idx = (im["src"] == s).nonzero()[:, 0][: topk[s] if isinstance(topk, dict) else topk]
                keep[idx] = True
            if not keep.any():
                continue
            emb = im["emb"][keep].float()
            p = (im["refs"] if agg != "mean" and "refs" in im else im["protos"]).float()  # [N, M|K, D]
            if center == "protos":
                c = p.mean((0, 1))
            elif center == "cands":
                c = im["emb"].float().mean(0)
            elif center == "data":
                c = cmean
            else:
                c = None
            if c is not None:
                emb, p = emb - c, p - c
            e = F.normalize(emb, dim=-1)
            if levels is not None:
                pass  # the per-level cosine below
            elif agg == "mean":
                q = F.normalize(p.mean(1), dim=-1)
                cos = e @ q.T  # [C, N]
            else:
                cos = torch.einsum("cd,nmd->cnm", e, F.normalize(p, dim=-1))
                cos = cos.amax(-1) if agg == "max" else cos.mean(-1)
            if levels is not None:  # multi-level: weighted mean of each level's cosine to its mean prototype

                def lvcos(key, im=im, keep=keep):
                    return sum(
                        w * (F.normalize(im[key][lv][keep].float(), dim=-1)
                             @ F.normalize(im["refs_levels"][lv].float().mean(1), dim=-1).T)
                        for lv, w in levels.items()
                    ) / sum(levels.values())  # fmt: skip

                cos = lvcos("emb_levels")
                if flip == "max":  # the crop or its mirror image, whichever matches the class better
                    cos = torch.maximum(cos, lvcos("emb_levels_flip"))
                elif flip == "mean":
                    cos = (cos + lvcos("emb_levels_flip")) / 2
            ob = im["obj"][keep]
            comp = cos  # what the classes compete on (top-1 / margin)
            if norm is not None:  # hubness: how close each prototype is to generic objects (a bank of crops)
                pb = F.normalize((p.mean(1) if p.dim() == 3 else p) - (c if c is not None else 0), dim=-1) @ bankn.T
                if norm == "z":
                    mu, sd = pb.mean(1), pb.std(1)
                    comp = (cos - mu) / sd
                elif norm == "csls":
                    comp = cos - pb.topk(knn, 1).values.mean(1)
            if rule == "pow":
                sc = cos.clamp_min(0).pow(sim_power) * ob.pow(obj_power)[:, None]
            elif rule == "z":
                sc = torch.sigmoid(comp - zscore) * ob.pow(obj_power)[:, None]
            elif rule == "softmax":
                sc = (cos * sim_power).softmax(1) * ob.pow(obj_power)[:, None]
            if head_power:
                sc = sc * im["head"][keep].float().clamp_min(1e-6).pow(head_power)
            if margin is not None:  # soft top-1: how far the class is above the best other class
                top2 = comp.topk(2, 1).values
                other = torch.where(comp >= top2[:, :1], top2[:, 1:2], top2[:, :1])
                sc = sc * torch.sigmoid((comp - other) / margin)
            if topn:
                sc = sc * torch.zeros_like(sc).scatter_(1, comp.topk(topn, 1).indices, 1.0)
            if top1:
                sc = sc * F.one_hot(comp.argmax(1), cos.shape[1])
            bx = (im["boxes"][keep] - torch.tensor([pw, ph, pw, ph])) / gain
            # per-class NMS as Ultralytics does, then up to 300 per image
            from torchvision.ops import batched_nms

            ci, cls = (sc > 1e-6).nonzero(as_tuple=True)
            s = sc[ci, cls]
            k = batched_nms(bx[ci], s, cls, 0.7)[:300]
            iid = image_id(f)
            for j in k.tolist():
                x1, y1, x2, y2 = bx[ci[j]].tolist()
                dets.append({"image_id": iid, "category_id": int(cls[j]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(s[j])})  # fmt: skip
        return dets

    cmean = allemb.mean(0)
    # a bank of generic object crops: the confident head candidates of every image (a transductive stand-in for a
    # shipped bank of base-class crops)
    bank = torch.cat([im["emb"][(im["src"] == 1) & (im["obj"] > 0.3)].float() for im in imgs])
    bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:2000]]
    bankn = F.normalize(bank, dim=-1)
    print(f"bank: {len(bank)} crops")
    base, novel = list(bench.split.base), list(bench.split.novel)
    inst = r["args"].get("instance")
    gt, objects = (bench.igt, bench.iobjects) if inst else (bench.gt, bench.objects)
    if inst:
        base, novel = [], list(range(bench.n_inst))
    for name, kw in ROWS:
        if ("levels" in kw and "refs_levels" not in imgs[0]) or ("flip" in kw and "emb_levels_flip" not in imgs[0]):
            continue  # a record made before every level (or the mirror crops) was recorded
        s = score(dets_for(**kw), gt, objects, base, novel)
        print(f"{name:40s} novel {s['novel_AP50']:.3f} / {s['novel_AP50-95']:.3f}  base {s['base_AP50']:.3f}  "
              f"FP/img {s['fp_per_img']:.2f}", flush=True)  # fmt: skip


NT = dict(src=(0,), top1=False)
SOFT = dict(src=(0,), top1=False, margin=0.02)
P345, P45 = {-3: 1.0, -2: 1.0, -1: 1.0}, {-2: 1.0, -1: 1.0}
ROWS = [
    # docs/benchmark.md's tables (instance: soft top-1; category: top1=False); src 0 = head, 1 = head by objectness, 2 =
    # CenterNet; levels = the trunk levels compared (-1 = P5); topk per source
    ("soft, head, P5 (previous default)", {**SOFT, "levels": {-1: 1.0}}),
    ("soft, head, P3-P5", {**SOFT, "levels": P345}),
    ("soft, CenterNet 10, P3-P5 (default)", {**SOFT, "levels": P345, "src": (2,)}),
    ("soft, CenterNet 20, P3-P5", {**SOFT, "levels": P345, "src": (2,), "topk": 20}),
    ("soft, CenterNet 30, P3-P5", {**SOFT, "levels": P345, "src": (2,), "topk": 30}),
    ("soft, head + CenterNet, P3-P5", {**SOFT, "levels": P345, "src": (0, 2)}),
    ("soft, head 3 + CenterNet 10, P3-P5", {**SOFT, "levels": P345, "src": (0, 2), "topk": {0: 3, 2: 10}}),
    ("soft, head, P2-P5", {**SOFT, "levels": {-4: 1.0, **P345}}),
    ("soft, CenterNet, P2-P5", {**SOFT, "levels": {-4: 1.0, **P345}, "src": (2,)}),
    ("soft, head, P3-P5, crop or mirror (max)", {**SOFT, "levels": P345, "flip": "max"}),
    ("nt, head, P5 (previous category)", {**NT, "levels": {-1: 1.0}}),
    ("nt, head, P3-P5", {**NT, "levels": P345}),
    ("nt, head, P4-P5", {**NT, "levels": P45}),
    ("nt, CenterNet, P5 (category default)", {**NT, "levels": {-1: 1.0}, "src": (2,)}),
    ("nt, CenterNet, P3-P5", {**NT, "levels": P345, "src": (2,)}),
    ("nt, head 3 + CenterNet 10, P5", {**NT, "levels": {-1: 1.0}, "src": (0, 2), "topk": {0: 3, 2: 10}}),
    # the earlier rule table (P5)
    ("as shipped: head top10, mean, top1", dict(src=(0,))),
    ("head top10, no top1", NT),
    ("no top1, obj_power 0", {**NT, "obj_power": 0.0}),
    ("no top1, obj_power 0.25", {**NT, "obj_power": 0.25}),
    ("no top1, obj_power 1", {**NT, "obj_power": 1.0}),
    ("no top1, obj_power 2", {**NT, "obj_power": 2.0}),
    ("no top1, head^0.5", {**NT, "head_power": 0.5}),
    ("no top1, head^1", {**NT, "head_power": 1.0}),
    ("no top1, head^1 obj 0", {**NT, "head_power": 1.0, "obj_power": 0.0}),
    ("margin 0.02", {**NT, "margin": 0.02}),
    ("margin 0.05", {**NT, "margin": 0.05}),
    ("margin 0.1", {**NT, "margin": 0.1}),
    ("top2", {**NT, "topn": 2}),
    ("top3", {**NT, "topn": 3}),
    ("sim_power 8", {**NT, "sim_power": 8.0}),
    ("sim_power 2", {**NT, "sim_power": 2.0}),
    ("head+obj+cn no top1", dict(src=(0, 1, 2), top1=False)),
    ("head+cn no top1", dict(src=(0, 2), top1=False)),
    ("z: top1", {**NT, "norm": "z", "top1": True}),
    ("z: margin 0.1", {**NT, "norm": "z", "margin": 0.1}),
    ("z: margin 0.3", {**NT, "norm": "z", "margin": 0.3}),
    ("z: margin 1", {**NT, "norm": "z", "margin": 1.0}),
    ("csls: top1", {**NT, "norm": "csls", "top1": True}),
    ("csls: margin 0.02", {**NT, "norm": "csls", "margin": 0.02}),
    ("csls: margin 0.05", {**NT, "norm": "csls", "margin": 0.05}),
    ("csls k50: margin 0.02", {**NT, "norm": "csls", "margin": 0.02, "knn": 50}),
    ("z rule z0=2", {**NT, "norm": "z", "rule": "z", "zscore": 2.0}),
    ("z rule z0=2, margin 0.3", {**NT, "norm": "z", "rule": "z", "zscore": 2.0, "margin": 0.3}),
    ("z rule z0=2, top1", {**NT, "norm": "z", "rule": "z", "zscore": 2.0, "top1": True}),
    ("no top1, max over refs", {**NT, "agg": "max"}),
    ("no top1, mean cos over refs", {**NT, "agg": "meancos"}),
    ("top1, max over refs", {**NT, "agg": "max", "top1": True}),
    ("no top1, max over refs, obj 1", {**NT, "agg": "max", "obj_power": 1.0}),
    ("no top1, max over refs, head^0.5", {**NT, "agg": "max", "head_power": 0.5}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="data/weights/yolofs-lite0-fold0.safetensors")
    p.add_argument("--data", default="data/stamps")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--instance", action="store_true")
    p.add_argument("--topk", type=int, default=30)
    p.add_argument("--centernet-topk", type=int, default=30)
    p.add_argument("--size", type=int, default=128, help="candidate crop side (CropVerifier.size)")
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--proj", type=Path, default=None, help="a MetricProjection state (tools/train_metric.py)")
    p.add_argument("--proto-of-proj", action="store_true", help="prototype = mean of projected refs (K-shot)")
    a = p.parse_args()
    if a.record.is_file():
        r = torch.load(a.record, weights_only=True)
    else:
        r = record(a)
        a.record.parent.mkdir(parents=True, exist_ok=True)
        torch.save(r, a.record)
    if a.proj is not None:
        from train_metric import MetricProjection

        sd = torch.load(a.proj, weights_only=True)
        proj = MetricProjection(sd["fc1.weight"].shape[1], sd["fc1.weight"].shape[0])
        proj.load_state_dict(sd)
        with torch.no_grad():
            for im in r["images"]:
                im["emb"] = proj(im["emb"].float())
                if "refs" in im:
                    im["refs"] = proj(im["refs"].float())
                im["protos"] = (
                    im["refs"].mean(1, keepdim=True) if a.proto_of_proj and "refs" in im else proj(im["protos"].float())
                )
    from run_benchmark import Bench

    ns = argparse.Namespace(fold=r["args"]["fold"], data=Path(r["args"]["data"]), out=Path("runs/probe"),
                            shots="1,3,5", encoder="efficientnet-lite0")  # fmt: skip
    variants(r, Bench(ns))


if __name__ == "__main__":
    main()
