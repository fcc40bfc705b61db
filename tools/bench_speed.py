#!/usr/bin/env python
"""Inference speed: onnxruntime CPU latency of plain YOLOv8n-P2 vs our PSALM-P2 with 1, 3 and 8 reference classes.

All graphs are exported in this run through Ultralytics' Exporter (ours with the references baked in as constants),
batch 1, at ``--imgsz`` (default 640); each latency is the median of ``--iters`` runs after warm-up, the sessions
alternating so machine noise hits all alike; torch eager latencies are measured the same way. Targets (export issue):
``ratio_1ref`` <= 1.15 and each extra class <= +0.25 of the baseline.

    python tools/bench_speed.py [--json] [--imgsz 640] [--iters 20]
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

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("YOLO_OFFLINE", "1")
CLASSES = (1, 3, 8)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)

    import onnxruntime as ort
    from ultralytics import YOLO

    from yolo_fewshot import FewShotYOLO

    tmp = Path(tempfile.mkdtemp())
    cwd = os.getcwd()
    os.chdir(tmp)  # models built from YAMLs export next to the working directory
    try:
        torch.manual_seed(0)
        models = {"baseline": YOLO("yolov8n-p2.yaml").model}
        files = {
            "baseline": str(
                Path(YOLO("yolov8n-p2.yaml").export(format="onnx", imgsz=a.imgsz, simplify=False)).resolve()
            )
        }
        for n in CLASSES:
            fs = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")
            dims = fs.model.proto_dims
            fs.set_prototypes([torch.randn(n, d) for d in dims])
            f = Path(fs.export(format="onnx", imgsz=a.imgsz, simplify=False)).resolve()
            files[str(n)] = str(f.rename(tmp / f"psalm_{n}.onnx"))
            models[str(n)] = fs.model
    finally:
        os.chdir(cwd)
    opts = ort.SessionOptions()
    sessions = {k: ort.InferenceSession(v, opts, providers=["CPUExecutionProvider"]) for k, v in files.items()}
    x = np.random.default_rng(0).random((1, 3, a.imgsz, a.imgsz), dtype=np.float32)
    xt = torch.from_numpy(x)
    for s in sessions.values():
        s.run(None, {"images": x})
    ort_ms: dict[str, list[float]] = {k: [] for k in sessions}
    torch_ms: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for m in models.values():
            m(xt)
        for _ in range(a.iters):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"images": x})
                ort_ms[k].append((time.perf_counter() - t) * 1e3)
            for k, m in models.items():
                t = time.perf_counter()
                m(xt)
                torch_ms[k].append((time.perf_counter() - t) * 1e3)
    med = {k: round(statistics.median(v), 2) for k, v in ort_ms.items()}
    base = med.pop("baseline")
    per_extra = (med["8"] - med["1"]) / (8 - 1) / base
    out = {
        "baseline_ms": base,
        "fewshot_ms": med,
        "ratio_1ref": round(med["1"] / base, 3),
        "per_extra_class_ratio": round(per_extra, 3),
        "torch_ms": {k: round(statistics.median(v), 2) for k, v in torch_ms.items()},
        "config": {
            "imgsz": a.imgsz,
            "batch": 1,
            "iters": a.iters,
            "threads": torch.get_num_threads(),
            "runtime": f"onnxruntime {ort.__version__} CPU",
        },
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"\nonnxruntime CPU, {a.imgsz}x{a.imgsz}, batch 1, median of {a.iters}")
        print(f"  plain YOLOv8n-P2            {base:8.1f} ms   (torch {out['torch_ms']['baseline']:.1f} ms)")
        for n in CLASSES:
            print(f"  PSALM-P2, {n} reference(s)   {med[str(n)]:8.1f} ms   (torch {out['torch_ms'][str(n)]:.1f} ms)")
        print(
            f"  ratio_1ref {out['ratio_1ref']:.2f} (target <= 1.15); each extra class +{per_extra:.2f} of the "
            "baseline (target <= 0.25)"
        )
    return out


if __name__ == "__main__":
    main()
