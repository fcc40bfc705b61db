"""tools/bench_modules.py runs and reports what it measured (tiny maps; no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

from yolo_fewshot.nn.cheaf import CHEAF
from yolo_fewshot.nn.psalm import PSALM

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(name: str, *args: str) -> dict:
    """Run ``tools/<name>`` with ``--json`` and return the JSON object it prints last."""
    r = subprocess.run([sys.executable, str(TOOLS / name), "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_modules_json():
    out = run_tool("bench_modules.py", "--iters", "2", "--scale", "0.1")
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
    out = run_tool("bench_encoder.py", "--iters", "1", "--backends", "efficientnet-lite0")
    assert set(out["per_crop_ms"]) == {"efficientnet-lite0"} and out["per_crop_ms"]["efficientnet-lite0"] > 0
    assert out["bank_3refs_s"] > 0 and out["bank_target_s"] == 0.3


def test_bench_speed_json():
    out = run_tool("bench_speed.py", "--imgsz", "64", "--iters", "1")
    assert set(out["fewshot_ms"]) == {"1", "3", "8"} and out["baseline_ms"] > 0
    assert out["ratio_1ref"] == round(out["fewshot_ms"]["1"] / out["baseline_ms"], 3)
    # the default model verifies crops, timed with its default candidates and with the head's alone
    assert set(out["torch_ms"]) == {"baseline", "1", "3", "8", "1+verify", "1+verify:head"}
    ratio = out["torch_ms"]["1+verify"] / out["torch_ms"]["1+verify:head"]
    assert abs(out["proposal_ratios"]["head"] - ratio) < 1e-2
    assert out["config"]["model"] == "yolov8n-lite0-proto.yaml" and out["config"]["baseline"] == "yolov8n-lite0.yaml"
