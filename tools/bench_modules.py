#!/usr/bin/env python
"""CHEAF vs PSALM: parameters, median CPU latency and peak memory, measured in one run on this machine.

Configuration (the seeds'): query channels [32, 64, 128, 256] at 160/80/40/20 (P2–P5 of a 640 image), prototype width
384, outputs [128, 256, 512, 512]; and the 3-level [64, 128, 256] at 80/40/20 -> [256, 512, 512]. Batch 1, one
reference class, eval mode, no grad. Latency: CHEAF and PSALM runs alternate in one process (so machine noise hits
both alike), median of ``--iters``. Peak memory: increase of the peak resident set over the loaded module during the
forward passes, each module in a fresh process.

    python tools/bench_modules.py            # table
    python tools/bench_modules.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from yolo_fewshot.nn.cheaf import CHEAF  # noqa: E402
from yolo_fewshot.nn.psalm import PSALM  # noqa: E402

CONFIGS = {
    "p2_p5": {"c_in": [32, 64, 128, 256], "sizes": [160, 80, 40, 20], "c_out": [128, 256, 512, 512], "proto_dim": 384},
    "p3_p5": {"c_in": [64, 128, 256], "sizes": [80, 40, 20], "c_out": [256, 512, 512], "proto_dim": 384},
}
MODULES = {"CHEAF": CHEAF, "PSALM": PSALM, "PSALM-repeat": PSALM}  # last: parameter-free input shortcut
OPTIONS = {"PSALM-repeat": {"residual": "repeat"}}
SEED_CLAIMS = {"CHEAF": (1.76e6, 40.15, 306), "PSALM": (0.78e6, 27.47, 385)}


def build(name: str, cfg: dict, attn: str, scale: float = 1.0):
    torch.manual_seed(0)
    m = MODULES[name](cfg["c_in"], cfg["c_out"], cfg["proto_dim"], attn=attn, **OPTIONS.get(name, {})).eval()
    m.prototypes = [torch.randn(1, 1, 1, cfg["proto_dim"]) for _ in cfg["c_in"]]
    x = [torch.randn(1, c, max(1, int(s * scale)), max(1, int(s * scale))) for c, s in zip(cfg["c_in"], cfg["sizes"])]
    return m, x


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def peak_memory_child(name: str, cfg_name: str, attn: str, scale: float, iters: int) -> float:
    """In this (fresh) process: peak resident memory above the loaded module during ``iters`` forwards, in MB.

    The kernel's peak-RSS mark (VmHWM) is reset after building, so the build's own transient peak does not count.
    """
    m, x = build(name, CONFIGS[cfg_name], attn, scale)
    base = _status_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak-RSS mark (Linux >= 4.0)
        f.write("5")
    with torch.inference_mode():
        for _ in range(iters):
            m(x)
    return max(0.0, _status_mb("VmHWM:") - base)


def peak_memory(name: str, cfg_name: str, attn: str, scale: float, iters: int) -> float:
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench_modules as b;"
        f"print(b.peak_memory_child({name!r}, {cfg_name!r}, {attn!r}, {scale}, {iters}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(cfg_name: str, attn: str, iters: int, scale: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = CONFIGS[cfg_name]
    mods = {n: build(n, cfg, attn, scale) for n in MODULES}
    times: dict[str, list[float]] = {n: [] for n in MODULES}
    with torch.inference_mode():
        for m, x in mods.values():  # warm-up
            for _ in range(3):
                m(x)
        for _ in range(iters):
            for n, (m, x) in mods.items():
                t = time.perf_counter()
                m(x)
                times[n].append((time.perf_counter() - t) * 1e3)
    res = {}
    for n, (m, _) in mods.items():
        res[n] = {
            "params": sum(p.numel() for p in m.parameters()),
            "latency_ms": round(statistics.median(times[n]), 3),
            "peak_mem_mb": round(peak_memory(n, cfg_name, attn, scale, max(2, iters // 4)), 1),
        }
    res["ratios"] = {
        k: round(res["PSALM"][k] / max(res["CHEAF"][k], 1e-9), 3) for k in ("params", "latency_ms", "peak_mem_mb")
    }
    res["ratios_repeat"] = {
        k: round(res["PSALM-repeat"][k] / max(res["CHEAF"][k], 1e-9), 3)
        for k in ("params", "latency_ms", "peak_mem_mb")
    }
    res["config"] = {
        **cfg,
        "sizes": [max(1, int(s * scale)) for s in cfg["sizes"]],
        "batch": 1,
        "classes": 1,
        "attn": attn,
        "threads": threads,
        "iters": iters,
    }
    return res


def table(name: str, r: dict) -> str:
    c = r["config"]
    lines = [
        f"\n{name}: in {c['c_in']} @ {c['sizes']} -> out {c['c_out']}, proto {c['proto_dim']}, attn={c['attn']}, "
        f"batch 1, 1 class, {c['threads']} threads, median of {c['iters']}",
        f"{'module':<13}{'params':>12}{'latency ms':>13}{'peak MB':>10}   seed claim (unknown hardware)",
    ]
    for n in MODULES:
        claim = ""
        if n in SEED_CLAIMS:
            p, lat, mem = SEED_CLAIMS[n]
            claim = f"   {p / 1e6:.2f} M / {lat} ms / {mem} MB"
        lines.append(f"{n:<13}{r[n]['params']:>12,}{r[n]['latency_ms']:>13.2f}{r[n]['peak_mem_mb']:>10.1f}{claim}")
    q = r["ratios"]
    lines.append(
        f"PSALM/CHEAF: params {q['params']:.2f}x (target <= 0.5), latency {q['latency_ms']:.2f}x "
        f"(target <= 0.7), peak memory {q['peak_mem_mb']:.2f}x"
    )
    q = r["ratios_repeat"]
    lines.append(
        f"PSALM-repeat/CHEAF: params {q['params']:.2f}x, latency {q['latency_ms']:.2f}x, "
        f"peak memory {q['peak_mem_mb']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--attn", default="linear")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--scale", type=float, default=1.0, help="spatial scale of the maps (tests use a small one)")
    a = ap.parse_args(argv)
    main_cfg = measure("p2_p5", a.attn, a.iters, a.scale, a.threads)
    out = {**main_cfg, "p3_p5": measure("p3_p5", a.attn, a.iters, a.scale, a.threads)}
    if a.json:
        print(json.dumps(out))
    else:
        print(table("P2–P5", main_cfg) + "\n" + table("P3–P5", out["p3_p5"]))
    return out


if __name__ == "__main__":
    main()
