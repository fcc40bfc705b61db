#!/usr/bin/env python
"""Training speed: seconds per iteration of a plain detector vs our episodic training on the same trunk, in one run.

Both train one epoch on the same generated dataset (``yolo_fewshot.data.toy``) at the same batch and imgsz through
Ultralytics' trainer; an iteration is the time between consecutive ``on_train_batch_end`` callbacks (data loading,
forward, loss, backward, optimizer step — what a user waits for), the first ``--warmup`` iterations dropped, median
reported. The few-shot run's embeddings are cached beforehand (as in any run after the first), so the ratio measures
the per-step cost: episodes plus the per-class part. Default pair: plain YOLOv8n on the frozen Lite0 trunk
(``yolov8n-lite0.yaml``) vs ours on it (``yolov8n-lite0-proto.yaml``); ``--model yolov8n-psalm-p2.yaml --baseline
yolov8n-p2.yaml`` measures the per-class PSALM neck. Target ratio <= 1.3 (issue 11).

    python tools/bench_train.py [--json] [--imgsz 320 --batch 8 --images 96 --n-way 4] [--model Y --baseline Y]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("YOLO_OFFLINE", "1")


def _timed_train(model, **kw) -> list[float]:
    stamps: list[float] = []
    model.add_callback("on_train_batch_end", lambda trainer: stamps.append(time.perf_counter()))
    model.train(**kw)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=96, help="training images (iterations = images / batch)")
    ap.add_argument("--n-way", type=int, default=4, help="classes per few-shot episode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="yolov8n-lite0-proto.yaml", help="few-shot model YAML")
    ap.add_argument("--baseline", default="yolov8n-lite0.yaml", help="plain Ultralytics model YAML")
    a = ap.parse_args(argv)

    from ultralytics import YOLO

    from yolo_fewshot import FewShotYOLO
    from yolo_fewshot.configs import resolve_model_yaml
    from yolo_fewshot.data.toy import make_dataset

    tmp = Path(tempfile.mkdtemp())
    data = make_dataset(tmp / "data", n_train=a.images, n_val=4, size=a.imgsz)
    common = dict(
        data=str(data),
        epochs=1,
        imgsz=a.imgsz,
        batch=a.batch,
        workers=a.workers,
        plots=False,
        device="cpu",
        val=False,
        project=str(tmp / "runs"),
        verbose=False,
        amp=False,
    )
    fs = FewShotYOLO(a.model, encoder="efficientnet-lite0")
    warm = dict(common, epochs=1, name="cache", exist_ok=True)
    FewShotYOLO(a.model, encoder="efficientnet-lite0").train(**{**warm, "n_way": a.n_way, "shots": "1"})  # the cache
    fs_its = _timed_train(fs, **common, name="fewshot", n_way=a.n_way, shots="1")
    try:  # a plugin YAML (the Lite0 trunk) by its shipped path; Ultralytics' own names as they are
        base = str(resolve_model_yaml(a.baseline)[0])
    except (FileNotFoundError, ValueError):
        base = a.baseline
    plain = YOLO(base)
    frozen = [i for i, m in enumerate(plain.model.model) if getattr(m, "frozen", False)]
    base_its = _timed_train(plain, **common, name="baseline", **({"freeze": frozen} if frozen else {}))
    med = lambda x: statistics.median(x[a.warmup :] or x)  # noqa: E731
    out = {
        "baseline_s_per_it": round(med(base_its), 4),
        "fewshot_s_per_it": round(med(fs_its), 4),
        "config": {
            "imgsz": a.imgsz,
            "batch": a.batch,
            "iterations": len(base_its) + 1,
            "n_way": a.n_way,
            "encoder": "efficientnet-lite0",
            "model": f"{a.model} vs {a.baseline}",
        },
    }
    out["ratio"] = round(out["fewshot_s_per_it"] / out["baseline_s_per_it"], 3)
    if a.json:
        print(json.dumps(out))
    else:
        c = out["config"]
        print(f"\ntraining speed, imgsz {c['imgsz']}, batch {c['batch']}, {c['iterations']} iterations, CPU")
        print(f"  plain {a.baseline}: {out['baseline_s_per_it']:.3f} s/it")
        print(f"  {a.model} episodic (n_way={a.n_way}): {out['fewshot_s_per_it']:.3f} s/it")
        print(f"  ratio: {out['ratio']:.2f} (target <= 1.3)")
    return out


if __name__ == "__main__":
    main()
