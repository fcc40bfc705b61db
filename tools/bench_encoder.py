#!/usr/bin/env python
"""Support encoders on this CPU: ms per reference crop for each backend, and the time to build a 3-reference bank.

Backends: efficientnet-lite0/lite2 (real weights), DINOv2-S and DINOv3-ViT-S through transformers (random weights
with the real configurations, saved and loaded by path: same cost as the real ones, no download), QAViT-Tiny/Small
(random init, as they are used). Per crop: median of
``--iters`` calls with batch 1 and with batch 8 (divided by 8). Bank: ``build_bank`` on three scikit-image photos
(read from disk, cropped, encoded), median of ``--iters`` after one warm-up; target <= 0.3 s with efficientnet-lite0.

    python tools/bench_encoder.py [--json]
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

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


BACKENDS = ("efficientnet-lite0", "efficientnet-lite2", "dinov2-small", "dinov3-vits16", "qavit-tiny", "qavit-small")


def _dino(tmp: Path, kind: str) -> str:
    import transformers

    vit_small = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    config, model_cls, extra = {
        "dinov2-small": ("Dinov2Config", "Dinov2Model", dict(patch_size=14, image_size=518)),
        "dinov3-vits16": (
            "DINOv3ViTConfig",
            "DINOv3ViTModel",
            dict(patch_size=16, image_size=224, num_register_tokens=4),
        ),
    }[kind]
    model = getattr(transformers, model_cls)(getattr(transformers, config)(**vit_small, **extra))
    path = tmp / kind
    model.save_pretrained(path)
    return f"hf:{path}"


def _median_ms(fn, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    a = ap.parse_args(argv)

    import cv2
    from skimage import data

    from yolo_fewshot.encoders import build_encoder
    from yolo_fewshot.references.build import build_bank

    tmp = Path(tempfile.mkdtemp())
    out: dict = {"threads": torch.get_num_threads(), "per_crop_ms": {}, "per_crop_ms_batch8": {}}
    for name in a.backends.split(","):
        enc = build_encoder(_dino(tmp, name) if name.startswith("dino") else name)
        s = enc.spec.input_size - enc.spec.input_size % getattr(enc, "patch", 1)
        x1, x8 = torch.rand(1, 3, s, s), torch.rand(8, 3, s, s)
        out["per_crop_ms"][name] = round(_median_ms(lambda: enc.encode(x1), a.iters), 2)  # noqa: B023
        out["per_crop_ms_batch8"][name] = round(_median_ms(lambda: enc.encode(x8), a.iters) / 8, 2)  # noqa: B023
    enc = build_encoder("efficientnet-lite0")
    photos = []
    for i, img in enumerate((data.coffee(), data.chelsea(), data.astronaut())):
        photos.append(tmp / f"ref{i}.jpg")
        cv2.imwrite(str(photos[-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    refs = {"object": photos}
    out["bank_3refs_s"] = round(_median_ms(lambda: build_bank(enc, refs), a.iters) / 1e3, 3)
    out["bank_target_s"] = 0.3
    if a.json:
        print(json.dumps(out))
    else:
        print(f"support encoders, {out['threads']} torch threads, median of {a.iters}")
        print(f"{'backend':<22}{'ms/crop (batch 1)':>20}{'ms/crop (batch 8)':>20}")
        for n in out["per_crop_ms"]:
            print(f"{n:<22}{out['per_crop_ms'][n]:>20.2f}{out['per_crop_ms_batch8'][n]:>20.2f}")
        print(
            f"3-reference bank with efficientnet-lite0 (read, crop, encode): {out['bank_3refs_s']:.3f} s "
            f"(target <= {out['bank_target_s']} s)"
        )
    return out


if __name__ == "__main__":
    main()
