"""Run the real-photo few-shot benchmark: ours and the baselines a user would pick instead, scored the same way.

    python tools/make_benchmark.py --folds 0                       # once: generate data/stamps/fold0*.yaml
    python tools/run_benchmark.py --fold 0                         # all methods -> runs/benchmark/fold0/
    python tools/run_benchmark.py --fold 0 --methods cosine psalm  # a subset; finished methods are kept (resumable)

Methods (every one scored with pycocotools on the same val images, novel and base AP50 / AP50-95 per K, mean ± std
over reference draws, and false positives per image on distractors):
  cosine      zero training: the support encoder's cosine similarity over sliding windows
  proto       ours, the default: yolov8n-lite0-proto (frozen Lite0 trunk = the encoder, class-agnostic boxes, one
              similarity per class), trained episodically on the base classes; novel classes train-free; the ported
              COCO CenterNet's boxes verified by the trunk (the model's default proposals=centernet)
  proto-head  the same weights, the verified candidates are the head's own boxes (proposals=head)
  proto-1pass the same weights without crop verification (one pass per image)
  proto-cat   the same weights, category search: classes do not compete for a box (top1=False; category protocol)
  psalm       ours, yolov8n-psalm-p2 trained episodically on the base classes, novel classes train-free
  cheaf       the same with the CHEAF neck
  psalm-ft    ours + fine-tune mode (finetune=True) on the K shots of every class
  yolo-ft     plain YOLOv8n on the same frozen Lite0 trunk (yolov8n-lite0.yaml, Ultralytics' Detect) trained on the
              base classes, then fine-tuned on the same K shots (what an Ultralytics user does with the best weights
              available offline)
  upper       the same plain detector trained on the novel classes with all their training scenes (upper bound)
The instance 1-shot protocol (foldN-instance.yaml) is run for cosine, proto, proto-1pass, psalm and cheaf.
Writes results.json (every draw) and results.md (the tables) after each method, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "yolov8n-lite0.yaml"  # the plain baseline: Ultralytics' Detect on the same frozen ImageNet trunk as ours
METHODS = (
    "cosine", "proto", "proto-cat", "proto-head", "proto-1pass", "psalm", "yolo-ft", "upper", "psalm-ft", "cheaf",
)  # fmt: skip
CONF = 0.25  # score threshold of the false-positive count (Ultralytics' predict default)


# -- scoring -------------------------------------------------------------------------------------------------------
def read_split(images: str | Path) -> tuple[list[dict], dict]:
    """Ultralytics-style labels (``im_file``, ``shape``, ``cls``, ``bboxes``) of a generated split folder, and its
    ``objects.json`` (every pasted object, labelled or not)."""
    from PIL import Image

    images = Path(images)
    labels = []
    for f in sorted(images.glob("*.jpg")):
        rows = np.loadtxt(images.parents[1] / "labels" / images.name / f"{f.stem}.txt", ndmin=2).reshape(-1, 5)
        w, h = Image.open(f).size
        labels.append({"im_file": str(f), "shape": (h, w), "cls": rows[:, :1], "bboxes": rows[:, 1:]})
    objects = json.loads((images.parents[1] / f"objects_{images.name}.json").read_text())
    return labels, {int(k): v for k, v in objects.items()}


def fp_on_distractors(dets: list[dict], objects: dict, conf: float = CONF, iou: float = 0.5) -> float:
    """Detections (score >= conf) that cover (IoU >= iou) some other object — an unlabelled distractor or an object
    of another class — and no object of their own class; per image."""
    import torch
    from ultralytics.utils.metrics import box_iou

    by_image: dict = {}
    for x in dets:
        if x["score"] >= conf:
            by_image.setdefault(x["image_id"], []).append(x)
    n = 0
    for iid, objs in objects.items():
        d = by_image.get(iid, [])
        if not d or not objs:
            continue
        db = torch.tensor(
            [[x["bbox"][0], x["bbox"][1], x["bbox"][0] + x["bbox"][2], x["bbox"][1] + x["bbox"][3]] for x in d]
        )
        ob = torch.tensor([o["box"] for o in objs], dtype=torch.float32)
        m = (box_iou(db, ob) >= iou).numpy()
        for i, x in enumerate(d):
            own = [j for j, o in enumerate(objs) if o["label"] is not None and o["label"] + 1 == x["category_id"]]
            if m[i].any() and not m[i, own].any():
                n += 1
    return n / max(1, len(objects))


def score(dets: list[dict], gt: dict, objects: dict, base: list[int], novel: list[int]) -> dict:
    """pycocotools AP of the base and novel classes (category ids = class index + 1) and FP/img on distractors."""
    from yolo_fewshot.engine.coco import coco_evaluate

    out = {}
    for part, ids in (("base", base), ("novel", novel)):
        ap, ap50 = coco_evaluate(gt, dets, [c + 1 for c in ids]) if ids else (float("nan"),) * 2
        out[f"{part}_AP50"], out[f"{part}_AP50-95"] = ap50, ap
    out["fp_per_img"] = fp_on_distractors(dets, objects)
    return out


def load_dets(path: Path) -> list[dict]:
    """A validator's COCO predictions; Ultralytics writes no file when there is no detection at all."""
    return json.loads(path.read_text()) if path.is_file() else []


class Bench:
    """One fold's run: data, results file, shared settings."""

    def __init__(self, a: argparse.Namespace) -> None:
        from ultralytics.data.utils import check_det_dataset

        from yolo_fewshot.data.split import FewShotSplit
        from yolo_fewshot.engine.coco import coco_ground_truth

        self.a = a
        self.out = (a.out / f"fold{a.fold}").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.yaml = (a.data / f"fold{a.fold}.yaml").resolve()
        self.iyaml = (a.data / f"fold{a.fold}-instance.yaml").resolve()
        for y in (self.yaml, self.iyaml):
            if not y.is_file():
                raise FileNotFoundError(
                    f"{y} not found; generate it first: python tools/make_benchmark.py --folds {a.fold}"
                )
        self.data = check_det_dataset(str(self.yaml))
        self.idata = check_det_dataset(str(self.iyaml))
        if not Path(self.data["val"]).is_dir():
            raise FileNotFoundError(
                f"{self.data['val']} is missing; run python tools/make_benchmark.py --folds {a.fold}"
            )
        self.split = FewShotSplit.from_data(self.data)
        self.names = self.split.names
        cmap = list(range(1, len(self.names) + 1))
        labels, self.objects = read_split(self.data["val"])
        self.gt = coco_ground_truth(labels, self.names, cmap)
        ilabels, self.iobjects = read_split(self.idata["val"])
        inames = FewShotSplit.from_data(self.idata).names
        self.igt = coco_ground_truth(ilabels, inames, list(range(1, len(inames) + 1)))
        self.n_inst = len(inames)
        self.shots = [int(k) for k in a.shots.split(",")]
        self.file = self.out / "results.json"
        self.results = json.loads(self.file.read_text()) if self.file.is_file() else {"runs": {}}
        self.results["settings"] = {**{k: str(v) for k, v in vars(a).items()}, "hardware": hardware()}

    def save(self) -> None:
        from yolo_fewshot.atomic import write_atomic

        write_atomic(self.file, json.dumps(self.results, indent=1))
        write_atomic(self.out / "results.md", markdown(self.results, self.shots))

    def record(self, method: str, rows: list[dict], train_s: float) -> None:
        # each method keeps the settings it ran with (a resumed run may add methods with other settings); methods
        # another process recorded meanwhile (runs of other methods in parallel) are kept
        if self.file.is_file():
            self.results["runs"] = {**json.loads(self.file.read_text())["runs"], **self.results["runs"]}
        self.results["runs"][method] = {
            "rows": rows,
            "train_s": round(train_s, 1),
            "settings": self.results["settings"],
        }
        self.save()
        print(markdown(self.results, self.shots))

    def category(self, dets, k, seed) -> dict:
        return {
            "protocol": "category",
            "shots": k,
            "seed": seed,
            **score(dets, self.gt, self.objects, list(self.split.base), list(self.split.novel)),
        }

    def instance(self, dets, seed) -> dict:
        return {
            "protocol": "instance",
            "shots": 1,
            "seed": seed,
            **score(dets, self.igt, self.iobjects, [], list(range(self.n_inst))),
        }


def hardware() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


# -- methods -------------------------------------------------------------------------------------------------------
def run_cosine(b: Bench) -> None:
    """Zero training: windows vs K-shot prototypes (mean of the K reference embeddings, normalised)."""
    import torch

    from yolo_fewshot.baselines.window_matching import WindowMatcher, sliding_windows
    from yolo_fewshot.data.split import FewShotSplit
    from yolo_fewshot.encoders import build_encoder
    from yolo_fewshot.references.crops import read_image

    matcher = WindowMatcher(build_encoder(b.a.encoder), size=b.a.window_size)

    def refs(data) -> dict[int, list[torch.Tensor]]:
        labels, _ = read_split(FewShotSplit.from_data(data).support_source(data))
        by_class: dict[int, list] = {}
        for lb in labels:
            img, _ = read_image(lb["im_file"])
            h, w = lb["shape"]
            for c, (x, y, bw, bh) in zip(lb["cls"][:, 0].astype(int), lb["bboxes"]):
                box = np.array([[(x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h]])
                by_class.setdefault(int(c), []).append(matcher.embed(img, box, context=0.1)[0])
        return by_class

    def windows(labels) -> dict:
        out = {}
        for i, lb in enumerate(labels):
            img, _ = read_image(lb["im_file"])
            win = sliding_windows(img.shape[1], img.shape[0])
            out[int(Path(lb["im_file"]).stem)] = (win, matcher.embed(img, win))
            if i % 25 == 0:
                print(f"cosine: embedded windows of {i}/{len(labels)} images", flush=True)
        return out

    def run(win, ref, k, seed) -> list[dict]:
        classes = sorted(ref)
        protos = []
        for c in classes:
            order = np.random.default_rng([seed, c]).permutation(len(ref[c]))[:k]
            protos.append(torch.nn.functional.normalize(torch.stack([ref[c][j] for j in order]).mean(0), dim=0))
        protos = torch.stack(protos)
        dets = []
        for iid, (w, e) in win.items():
            for box, s, ci in matcher.detect(w, e, protos):
                dets.append(
                    {
                        "image_id": iid,
                        "category_id": classes[ci] + 1,
                        "score": s,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    }
                )
        return dets

    t0 = time.perf_counter()
    rows = []
    win, ref = windows(read_split(b.data["val"])[0]), refs(b.data)
    for k in b.shots:
        for seed in range(b.a.seeds):
            rows.append(b.category(run(win, ref, k, seed), k, seed))
    win, ref = windows(read_split(b.idata["val"])[0]), refs(b.idata)
    for seed in range(b.a.seeds):
        rows.append(b.instance(run(win, ref, 1, seed), seed))
    b.record("cosine", rows, 0.0)
    print(f"cosine: {time.perf_counter() - t0:.0f} s")


def _fewshot_val(
    b: Bench,
    weights: Path,
    data: Path,
    shots: str,
    seeds: int,
    name: str,
    verify: bool = True,
    proposals: str | None = None,
    top1: bool = True,
) -> dict[tuple, list]:
    """Our validator with seeded K-shot draws; returns each draw's COCO predictions by ``(K, seed)``."""
    from yolo_fewshot import FewShotYOLO

    shutil.rmtree(b.out / name, ignore_errors=True)  # no stale predictions files from an earlier run
    FewShotYOLO(str(weights)).val(
        data=str(data), shots=shots, seeds=seeds, imgsz=b.a.imgsz, batch=b.a.batch, save_json=True, plots=False,
        project=str(b.out), name=name, exist_ok=True, encoder=b.a.encoder, workers=0, verify=verify,
        **({"top1": top1, **({"proposals": proposals} if proposals else {})} if verify else {}),
    )  # fmt: skip
    ks = [int(s) for s in shots.split(",")]
    many = len(ks) * seeds > 1  # the validator keeps one file per draw only when there are several
    return {
        (k, seed): load_dets(b.out / name / (f"predictions_{k}shot_seed{seed}.json" if many else "predictions.json"))
        for k in ks
        for seed in range(seeds)
    }


def _fewshot_eval(
    b: Bench, weights: Path, tag: str, verify: bool = True, proposals: str | None = None, top1: bool = True,
    instance: bool = True,
) -> list[dict]:  # fmt: skip
    """Both protocols (``instance=False``: the category one only) for a trained few-shot model, every draw scored by
    :func:`score`."""
    cat = _fewshot_val(b, weights, b.yaml, b.a.shots, b.a.seeds, f"{tag}-val-category", verify, proposals, top1)
    inst = (
        _fewshot_val(b, weights, b.iyaml, "1", b.a.seeds, f"{tag}-val-instance", verify, proposals, top1)
        if instance
        else {}
    )
    return [b.category(d, k, seed) for (k, seed), d in cat.items()] + [
        b.instance(d, seed) for (_, seed), d in inst.items()
    ]


def training_finished(last: Path) -> bool:
    from yolo_fewshot.engine.train import training_finished as finished

    return finished(last)


def _run_args(b: Bench, tag: str) -> dict:
    """Training settings every method shares (the run lands in ``<out>/<tag>``)."""
    return dict(imgsz=b.a.imgsz, batch=b.a.batch, project=str(b.out), name=tag, exist_ok=True, plots=False,
                workers=b.a.workers)  # fmt: skip


def _train_fewshot(b: Bench, cfg: str, tag: str, **kw) -> tuple[Path, float]:
    from yolo_fewshot import FewShotYOLO

    best = b.out / tag / "weights" / "last.pt"
    t0 = time.perf_counter()
    if best.is_file() and not training_finished(best):
        FewShotYOLO(str(best)).train(resume=True)
    elif not best.is_file():
        FewShotYOLO(cfg, encoder=b.a.encoder).train(
            data=str(b.yaml), epochs=b.a.epochs, seed=0, shots=str(max(b.shots)), seeds=1,
            val=False, **{"n_way": b.a.n_way, **_run_args(b, tag), **kw},
        )  # fmt: skip
    return best, train_time(best, time.perf_counter() - t0)


def train_time(last: Path, fallback: float) -> float:
    """A run's training time: the ``time`` column (seconds since the start) of its results.csv's last row, so a run
    trained earlier reports its training, not this call's; else ``fallback``."""
    csv = last.parents[1] / "results.csv"
    rows = csv.read_text().splitlines()[1:] if csv.is_file() else []
    try:
        return float(rows[-1].split(",")[1]) if rows else fallback
    except (IndexError, ValueError):
        return fallback


# The prototype model's training settings, chosen on purpose (Ultralytics' optimizer=auto picks a tiny AdamW rate for
# short runs): SGD at 0.01 as Ultralytics trains YOLOv8, one warm-up epoch, mosaic off for the last quarter.
PROTO_TRAIN = dict(optimizer="SGD", lr0=0.01, momentum=0.937, warmup_epochs=1)


def run_proto(
    b: Bench,
    tag: str = "proto",
    verify: bool = True,
    proposals: str | None = None,
    top1: bool = True,
    instance: bool = True,
) -> None:
    """The prototype model (trained once, under ``proto``), evaluated with the given verification settings."""
    weights, t = _train_fewshot(
        b, "yolov8n-lite0-proto.yaml", "proto", n_way=b.a.proto_n_way, close_mosaic=max(1, b.a.epochs // 4),
        **PROTO_TRAIN,
    )  # fmt: skip
    b.record(tag, _fewshot_eval(b, weights, tag, verify, proposals, top1, instance), t if tag == "proto" else 0.0)


def run_ours(b: Bench, neck: str) -> None:
    weights, t = _train_fewshot(b, f"yolov8n-{neck}-p2.yaml", neck)
    b.record(neck, _fewshot_eval(b, weights, neck), t)


def _kshot_yaml(b: Bench, k: int, seed: int) -> Path:
    """A data YAML whose train split is K shots of every class drawn (seeded) from the reference photos."""
    from yolo_fewshot.data.kshot import kshot_images, list_images, write_kshot_list

    images = kshot_images(list_images(b.split.support_source(b.data)), list(b.names), k, seed)
    lst = write_kshot_list(images, b.out / "kshot" / f"{k}shot_seed{seed}.txt")
    y = b.out / "kshot" / f"{k}shot_seed{seed}.yaml"
    y.write_text(
        f"path: {b.data['path']}\ntrain: {lst}\nval: {b.data['val']}\nsupport: {b.split.support}\n"
        + "names:\n"
        + "".join(f"  {i}: {n}\n" for i, n in b.names.items())
        + f"novel: [{', '.join(b.names[i] for i in b.split.novel)}]\n"
    )
    return y


def run_psalm_ft(b: Bench) -> None:
    from yolo_fewshot import FewShotYOLO

    base, _ = _train_fewshot(b, "yolov8n-psalm-p2.yaml", "psalm")
    rows, t_total = [], 0.0
    for k in [int(s) for s in b.a.ft_shots.split(",")]:
        for seed in range(b.a.seeds):
            tag = f"psalm-ft-{k}shot-seed{seed}"
            t0 = time.perf_counter()
            w = b.out / tag / "weights" / "last.pt"
            if w.is_file() and not training_finished(w):
                FewShotYOLO(str(w)).train(resume=True)
            elif not w.is_file():
                FewShotYOLO(str(base), encoder=b.a.encoder).train(
                    data=str(_kshot_yaml(b, k, seed)), finetune=True, shots=str(k), seeds=1, epochs=b.a.ft_epochs,
                    n_way=b.a.n_way, seed=seed, val=False, **_run_args(b, tag),
                )  # fmt: skip
            t_total += time.perf_counter() - t0
            dets = _fewshot_val(b, w, b.yaml, str(k), 1, f"{tag}-val")[(k, 0)]
            rows.append(b.category(dets, k, seed))
    b.record("psalm-ft", rows, t_total)


def _plain_train(b: Bench, data: str | Path, tag: str, epochs: int, weights: str = PLAIN, **kw) -> float:
    from ultralytics import YOLO

    from yolo_fewshot.configs import resolve_model_yaml

    t0 = time.perf_counter()
    last = b.out / tag / "weights" / "last.pt"
    if last.is_file() and not training_finished(last):
        YOLO(str(last)).train(resume=True)
    elif not last.is_file():
        if weights.endswith(".yaml"):  # a plugin YAML (the Lite0 trunk) by its shipped path, the scale letter kept
            path, scale = resolve_model_yaml(weights)
            weights = str(path.with_name(weights)) if scale else str(path)
        model = YOLO(weights)
        # the ImageNet trunk stays frozen, as in ours (Ultralytics' trainer unfreezes every layer not in freeze=)
        frozen = [i for i, m in enumerate(model.model.model) if getattr(m, "frozen", False)]
        model.train(data=str(data), epochs=epochs, seed=0, val=False, freeze=frozen or None, **_run_args(b, tag), **kw)
    return time.perf_counter() - t0


def _plain_val(b: Bench, tag: str) -> list[dict]:
    from ultralytics import YOLO

    name = f"{tag}-val"
    shutil.rmtree(b.out / name, ignore_errors=True)
    YOLO(str(b.out / tag / "weights" / "last.pt")).val(
        data=str(b.yaml),
        imgsz=b.a.imgsz,
        batch=b.a.batch,
        save_json=True,
        plots=False,
        project=str(b.out),
        name=name,
        exist_ok=True,
        workers=0,
    )
    return load_dets(b.out / name / "predictions.json")


# The plain detector's settings: its base and upper-bound training as ours (PROTO_TRAIN, same epochs); its fine-tune
# on the K shots at a fifth of that rate with no warm-up (a few dozen steps on a few dozen images: a full rate undoes
# the base training, and Ultralytics' optimizer=auto would pick AdamW at a rate that barely moves in that many steps).
PLAIN_FT = dict(optimizer="SGD", lr0=0.002, momentum=0.937, warmup_epochs=0)


def run_yolo_ft(b: Bench) -> None:
    t = _plain_train(b, b.yaml, "yolo-base", b.a.epochs, **PROTO_TRAIN)
    rows = []
    for k in [int(s) for s in b.a.ft_shots.split(",")]:
        for seed in range(b.a.seeds):
            tag = f"yolo-ft-{k}shot-seed{seed}"
            t += _plain_train(
                b, _kshot_yaml(b, k, seed), tag, b.a.ft_epochs, str(b.out / "yolo-base/weights/last.pt"), **PLAIN_FT
            )
            rows.append(b.category(_plain_val(b, tag), k, seed))
    b.record("yolo-ft", rows, t)


def run_upper(b: Bench) -> None:
    y = b.out / "upper.yaml"
    y.write_text(
        f"path: {b.data['path']}\ntrain: {Path(b.data['path']) / b.data['novel_train']}\nval: {b.data['val']}\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in b.names.items())
    )
    t = _plain_train(b, y, "upper", b.a.epochs, **PROTO_TRAIN)
    b.record("upper", [b.category(_plain_val(b, "upper"), 0, 0)], t)


# -- report --------------------------------------------------------------------------------------------------------
LABELS = {
    "cosine": "zero training: encoder cosine, sliding windows",
    "proto": "ours: Lite0-proto, novel classes train-free, crop verification of COCO CenterNet's boxes (default)",
    "proto-head": "ours: Lite0-proto, crop verification of the head's own boxes (proposals=head)",
    "proto-1pass": "ours: Lite0-proto, novel classes train-free, one pass (no verification)",
    "proto-cat": "ours: Lite0-proto, category search (top1=False: classes do not compete for a box)",
    "psalm": "ours: PSALM, novel classes train-free",
    "cheaf": "ours: CHEAF, novel classes train-free",
    "psalm-ft": "ours: PSALM + fine-tune on the K shots",
    "yolo-ft": "plain YOLOv8n on the Lite0 trunk, base-trained, fine-tuned on the K shots",
    "upper": "upper bound: plain YOLOv8n on the Lite0 trunk, all novel data",
}


def _cell(rows: list[dict], key: str) -> str:
    v = np.array([r[key] for r in rows], float)
    if not len(v) or not np.isfinite(v).any():
        return "–"
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def markdown(results: dict, shots: list[int]) -> str:
    runs = results["runs"]
    s = results.get("settings", {})
    out = [
        f"Fold {s.get('fold')} — category K-shot (novel classes: AP50 per K; mean ± std over {s.get('seeds')} draws)",
        "",
        "| method | "
        + " | ".join(f"novel AP50 K={k}" for k in shots)
        + " | novel AP50-95 K="
        + str(max(shots))
        + " | base AP50 K="
        + str(max(shots))
        + f" | FP/img (conf {CONF}) | train time |",
        "|---" * (len(shots) + 5) + "|",
    ]
    for m in METHODS:
        if m not in runs:
            continue
        rows = [r for r in runs[m]["rows"] if r["protocol"] == "category"]
        by_k = {k: [r for r in rows if r["shots"] == k] for k in shots}
        last = by_k[max(shots)] or rows
        cells = [
            _cell(by_k[k], "novel_AP50") if by_k[k] else ("–" if m != "upper" else _cell(rows, "novel_AP50"))
            for k in shots
        ]
        t = runs[m]["train_s"]
        out.append(
            f"| {LABELS[m]} | "
            + " | ".join(cells)
            + f" | {_cell(last, 'novel_AP50-95')} | {_cell(last, 'base_AP50')} | {_cell(last, 'fp_per_img')} | "
            + (f"{t / 60:.0f} min |" if t else "0 |")
        )
    inst = [(m, [r for r in runs[m]["rows"] if r["protocol"] == "instance"]) for m in METHODS if m in runs]
    inst = [(m, r) for m, r in inst if r]
    if inst:
        out += [
            "",
            "Instance 1-shot (every novel-category stamp is a class; look-alikes from its folder)",
            "",
            "| method | AP50 | AP50-95 | FP/img |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {LABELS[m]} | {_cell(r, 'novel_AP50')} | {_cell(r, 'novel_AP50-95')} | {_cell(r, 'fp_per_img')} |"
            for m, r in inst
        ]
    out += [
        "",
        f"Settings: {json.dumps({k: v for k, v in s.items() if k != 'hardware'})}",
        f"Hardware: {s.get('hardware')}",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "stamps", help="folder of the foldN*.yaml files")
    ap.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-way", type=int, default=2)
    ap.add_argument("--proto-n-way", type=int, default=8, help="episode size of the proto model (cheap per class)")
    ap.add_argument("--shots", default="1,3,5")
    ap.add_argument("--ft-shots", default="5", help="K values of the fine-tune methods (each is a training run)")
    ap.add_argument("--seeds", type=int, default=2, help="reference draws per K")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window-size", type=int, default=128, help="crop side of the cosine baseline's windows")
    a = ap.parse_args(argv)
    import yolo_fewshot  # noqa: F401  (offline defaults, layer registration)

    try:
        b = Bench(a)
    except FileNotFoundError as e:
        print(f"run_benchmark: error: {e}", file=sys.stderr)
        return 2
    run = {
        "cosine": run_cosine,
        "proto": run_proto,
        "proto-head": lambda b: run_proto(b, "proto-head", proposals="head"),
        "proto-1pass": lambda b: run_proto(b, "proto-1pass", verify=False),
        "proto-cat": lambda b: run_proto(b, "proto-cat", top1=False, instance=False),
        "psalm": lambda b: run_ours(b, "psalm"),
        "cheaf": lambda b: run_ours(b, "cheaf"),
        "psalm-ft": run_psalm_ft,
        "yolo-ft": run_yolo_ft,
        "upper": run_upper,
    }
    for m in METHODS:
        if m in a.methods:
            t0 = time.perf_counter()
            run[m](b)
            print(f"run_benchmark: {m} done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    print(f"results: {b.out / 'results.md'} and {b.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
