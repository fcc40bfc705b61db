"""tools/bench_modules.py runs and reports what it measured (tiny maps; no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

from yolo_fewshot.nn.cheaf import CHEAF
from yolo_fewshot.nn.psalm import PSALM

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_modules.py"


def test_bench_modules_json():
    r = subprocess.run(
        [sys.executable, str(TOOL), "--json", "--iters", "2", "--scale", "0.1"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expect = {
        "CHEAF": CHEAF([32, 64, 128, 256], [128, 256, 512, 512], 384),
        "PSALM": PSALM([32, 64, 128, 256], [128, 256, 512, 512], 384),
    }
    for name, module in expect.items():
        assert out[name]["params"] == sum(p.numel() for p in module.parameters())
        assert out[name]["latency_ms"] > 0 and out[name]["peak_mem_mb"] >= 0
    assert out["ratios"]["params"] == round(out["PSALM"]["params"] / out["CHEAF"]["params"], 3)
    assert out["PSALM-repeat"]["params"] < out["PSALM"]["params"]
    assert out["config"]["c_in"] == [32, 64, 128, 256] and out["p3_p5"]["config"]["c_in"] == [64, 128, 256]


def test_bench_encoder_json():
    tool = TOOL.parent / "bench_encoder.py"
    r = subprocess.run(
        [sys.executable, str(tool), "--json", "--iters", "1", "--backends", "efficientnet-lite0"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["per_crop_ms"]) == {"efficientnet-lite0"} and out["per_crop_ms"]["efficientnet-lite0"] > 0
    assert out["bank_3refs_s"] > 0 and out["bank_target_s"] == 0.3


def test_bench_speed_json():
    tool = TOOL.parent / "bench_speed.py"
    r = subprocess.run(
        [sys.executable, str(tool), "--json", "--imgsz", "64", "--iters", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["fewshot_ms"]) == {"1", "3", "8"} and out["baseline_ms"] > 0
    assert out["ratio_1ref"] == round(out["fewshot_ms"]["1"] / out["baseline_ms"], 3)
    assert set(out["torch_ms"]) == {"baseline", "1", "3", "8"}
