"""Probe layout descriptors: re-score a probe record's candidates with masked means vs 2x2/3x3 grids (+ mirrored refs).

The candidates' crops are re-encoded from the original scene (make_crop, as references are), the instance protocol's
references from its support split; each rule is scored with the benchmark's pycocotools code (soft top-1, margin
0.02, cos^4 * obj^0.5). The measurements behind yolo_fewshot/nn/layout.py (docs/benchmark.md, "Layout descriptors"):

    python tools/probe_layout.py runs/probe/fold1-inst-lv.pt "{2: 10}"        # CenterNet's 10 boxes
    python tools/probe_layout.py runs/probe/fold1-inst-lv.pt "{0: 3, 2: 10}"  # the head's 3 + CenterNet's 10

Records: ``tools/probe_verify.py --instance --shots 1 --record R``; sources 0 = head, 1 = head by objectness, 2 =
CenterNet.
"""

import argparse
import ast
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from run_benchmark import Bench, score
from torchvision.ops import batched_nms

from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLite, weights_path
from yolo_fewshot.engine.coco import image_id
from yolo_fewshot.references.crops import make_crop

torch.set_num_threads(1)
r = torch.load(sys.argv[1], weights_only=True)
srcsel = ast.literal_eval(sys.argv[2]) if len(sys.argv) > 2 else {2: 10}
fold = int(r["args"]["fold"])
ns = argparse.Namespace(fold=fold, data=Path(r["args"]["data"]), out=Path("runs/probe"), shots="1,3,5", encoder="x")
b = Bench(ns)
net = EfficientNetLite(torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)).eval()
LV = {"P3": 2, "P4": 4, "P5": 6}


@torch.no_grad()
def enc(cs, ms):
    x = EfficientNetLite.normalize(torch.stack(cs))
    m = torch.stack(ms).float()
    x = F.relu6(net._bn0(net._conv_stem(x)))
    out = {}
    for i, blk in enumerate(net._blocks):
        x = blk(x)
        for n, s in LV.items():
            if i == net.stage_ends[s]:
                mk = F.interpolate(m, size=x.shape[-2:], mode="area")
                out[n + "mean"] = (x * mk).sum((2, 3)) / mk.sum((2, 3)).clamp_min(1e-6)
                for g in (2, 3):
                    out[n + f"g{g}"] = (
                        F.adaptive_avg_pool2d(x * mk, g) / F.adaptive_avg_pool2d(mk, g).clamp_min(1e-6)
                    ).flatten(1)
    return out


def encode(items, size, flip=False):
    res = []
    for i in range(0, len(items), 64):
        cs, ms = zip(*[make_crop(im, bx, size, 0.1) for im, bx in items[i : i + 64]])
        if flip:
            cs, ms = [c.flip(-1) for c in cs], [m.flip(-1) for m in ms]
        res.append(enc(cs, ms))
    return {k: torch.cat([o[k] for o in res]) for k in res[0]}


# references: the support split's instances per class (instance 1-shot: one each)
sup = []
supdir = Path(str(b.idata["val"]).replace("/test", "/support"))
for imf in sorted(supdir.glob("*.jpg")):
    lf = Path(str(imf).replace("/images/", "/labels/")).with_suffix(".txt")
    for line in lf.read_text().split("\n"):
        if line.strip():
            c, x, y, w, h = map(float, line.split())
            sup.append((str(imf), int(c), [(x - w / 2) * 320, (y - h / 2) * 320, (x + w / 2) * 320, (y + h / 2) * 320]))
rc = torch.tensor([c for _, c, _ in sup])
C = b.n_inst
R = encode([(i, bx) for i, _, bx in sup], 224)
RF = encode([(i, bx) for i, _, bx in sup], 224, True)


def proto(e):
    return F.normalize(torch.stack([F.normalize(e[rc == c], dim=-1).mean(0) for c in range(C)]), dim=-1)


# candidates
cands, owner = [], []
for j, (f, im, (gain, pw, ph)) in enumerate(zip(r["files"], r["images"], r["pads"])):
    bx = (im["boxes"] - torch.tensor([pw, ph, pw, ph])) / gain
    keep = torch.cat([(im["src"] == s).nonzero()[:, 0][:k] for s, k in srcsel.items()])
    for q in keep.tolist():
        bq = bx[q].clamp(0, 320)
        if im["obj"][q] <= 0 or (bq[2:] - bq[:2]).min() < 2:
            continue
        cands.append((f, bx[q].clamp(0, 320).tolist(), float(im["obj"][q])))
        owner.append(j)
print(len(cands), "candidates", flush=True)
Q = encode([(f, bx) for f, bx, _ in cands], 128)
obj = torch.tensor([o for _, _, o in cands])


def cos_of(keys, flip):
    tot = 0
    for k in keys:
        c = F.normalize(Q[k], dim=-1) @ proto(R[k]).T
        if flip:
            c = torch.maximum(c, F.normalize(Q[k], dim=-1) @ proto(RF[k]).T)
        tot = tot + c
    return tot / len(keys)


def dets(cos, margin=0.02):
    sc = cos.clamp_min(0).pow(4) * obj.pow(0.5)[:, None]
    top2 = cos.topk(2, 1).values
    other = torch.where(cos >= top2[:, :1], top2[:, 1:2], top2[:, :1])
    sc = sc * torch.sigmoid((cos - other) / margin)
    out = []
    own = torch.tensor(owner)
    for j in own.unique().tolist():
        m = (own == j).nonzero()[:, 0]
        bb = torch.tensor([cands[q][1] for q in m.tolist()])
        s = sc[m]
        ci, cl = (s > 1e-6).nonzero(as_tuple=True)
        k = batched_nms(bb[ci], s[ci, cl], cl, 0.7)[:300]
        iid = image_id(cands[m[0]][0])
        for t in k.tolist():
            x1, y1, x2, y2 = bb[ci[t]].tolist()
            out.append(
                {
                    "image_id": iid,
                    "category_id": int(cl[t]) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(s[ci[t], cl[t]]),
                }
            )
    return out


for name, keys, flip in [
    ("mean P3-5", ["P3mean", "P4mean", "P5mean"], False),
    ("mean P3-5 +flipref", ["P3mean", "P4mean", "P5mean"], True),
    ("g2 P3-5", ["P3g2", "P4g2", "P5g2"], False),
    ("g2 P3-5 +flipref", ["P3g2", "P4g2", "P5g2"], True),
    ("g3 P3-5 +flipref", ["P3g3", "P4g3", "P5g3"], True),
    ("g2 P4-5 +flipref", ["P4g2", "P5g2"], True),
    ("g3 P4 + g2 P3,P5 +flipref", ["P3g2", "P4g3", "P5g2"], True),
    ("mean+g2 P3-5 +flipref", ["P3mean", "P4mean", "P5mean", "P3g2", "P4g2", "P5g2"], True),
]:
    s = score(dets(cos_of(keys, flip)), b.igt, b.iobjects, [], list(range(C)))
    print(
        f"{name:32s} AP50 {s['novel_AP50']:.3f} AP50-95 {s['novel_AP50-95']:.3f} FP {s['fp_per_img']:.2f}", flush=True
    )
