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


def test_probe_found_counts_found_objects_misses_and_false_positives():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("probe_found", TOOLS / "probe_found.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    # one scene, three objects of classes a, b, c; candidates: a found (0.9), b's box given to c (0.6), a loose box
    # on c at 0.3 (false positive: part of an object), clutter at 0.1; nothing covers c
    scene = {
        "image": "s.jpg",
        "box": np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 46, 10], [80, 80, 90, 90]], np.float32),
        "obj": np.ones(4, np.float32),
        "score": np.array([[0.9, 0, 0], [0, 0.2, 0.6], [0, 0, 0.3], [0.1, 0, 0]], np.float32),
    }
    truth = {"s.jpg": [("a", [0, 0, 10, 10]), ("b", [20, 0, 30, 10]), ("c", [40, 0, 60, 20])]}
    out = probe.evaluate([scene], truth, {"a": 0, "b": 1, "c": 2}, agnostic=False, fp=1.0, conf=0.25)
    assert out["objects"] == 3 and out["found_at_conf0.25"] == round(1 / 3, 4)
    assert out["fp_per_scene_at_conf0.25"] == 2.0  # b's box as c, and the loose box on c
    assert out["found_at_fp1.0"] == round(1 / 3, 4) and out["threshold"] == 0.6  # the lowest within 1 FP per scene
    assert out["missed_at_conf"] == {
        "no candidate": 1,
        "best candidate goes to another reference": 1,
        "below the threshold": 0,
    }
    assert out["false_positives_at_conf"] == {
        "a look-alike or another labelled object": 1,
        "part or loose box of an object": 1,
        "clutter": 0,
    }


def test_probe_found_hubness_lowers_the_reference_near_everything():
    import importlib.util

    import numpy as np

    from yolo_fewshot.nn.verify import CropVerifier

    spec = importlib.util.spec_from_file_location("probe_found", TOOLS / "probe_found.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    # reference 0 is near every bank candidate (a hub), reference 1 near none
    bank = np.array([[0.8, 0.1], [0.7, 0.2], [0.6, 0.0]], np.float32)
    off = probe.hubness(bank, k=2, lam=1.0)
    np.testing.assert_allclose(off, [0.3, -0.3], atol=1e-6)  # top-2 means 0.75 / 0.15, centred
    # a candidate the hub wins by 0.1 goes to reference 1 once the offsets apply
    scene = {"image": "s.jpg", "box": np.zeros((1, 4), np.float32), "obj": np.ones(1, np.float32),
             "cos": np.array([[0.7, 0.6]], np.float32)}  # fmt: skip
    v = CropVerifier(top1=True)
    before = probe.rescore([scene], np.zeros(2, np.float32), v)[0]["score"]
    after = probe.rescore([scene], off, v)[0]["score"]
    assert before.argmax() == 0 and after.argmax() == 1
