"""Few-shot split, episodes, and training/validation through Ultralytics' engine on a tiny generated dataset."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.data.episodes import EpisodeSampler, InstanceTable, remap_labels
from yolo_fewshot.data.split import FewShotSplit
from yolo_fewshot.data.toy import make_dataset

REPO = Path(__file__).resolve().parents[1]
SOURCE_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
VAL = dict(imgsz=64, batch=4, workers=0, device="cpu", plots=False)  # standalone validator runs
TRAIN = dict(epochs=1, imgsz=64, batch=4, workers=0, plots=False, device="cpu", n_way=3, shots="1,3", verbose=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fsd"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    model = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")
    project = tmp_path_factory.mktemp("runs")
    model.train(data=str(dataset), project=str(project), name="t", **TRAIN)
    return model, project / "t"


# -- split and episodes ----
def test_split_reads_names_and_ids():
    data = {"names": {0: "cup", 1: "cat", 2: "face", 3: "rocket"}}
    assert FewShotSplit.from_data({**data, "novel": ["rocket", 1]}).novel == (1, 3)
    assert FewShotSplit.from_data({**data, "novel": "rocket,cat"}).base == (0, 2)
    with pytest.raises(ValueError, match="novel class 'dog' is not in the data YAML's names"):
        FewShotSplit.from_data({**data, "novel": ["dog"]})
    with pytest.raises(ValueError, match="novel class id 7"):
        FewShotSplit.from_data({**data, "novel": [7]})
    assert FewShotSplit.from_data({**data, "novel": [0, 1, 2, 3]}).base == ()  # valid for evaluation


def _table(n_images=6, classes=(0, 1, 2)):
    """Every instance of image i embeds as the one-hot vector e_i, so a prototype shows which images it used."""
    image, cls, emb = [], [], []
    for i in range(n_images):
        for c in classes:
            image.append(f"im{i}.jpg")
            cls.append(c)
            onehot = torch.zeros(2, 1, n_images)
            onehot[..., i] = 1
            emb.append([onehot, onehot.clone()])
    return InstanceTable(image, cls, emb)


def test_episodes_never_use_the_query_image():
    table = _table()
    sampler = EpisodeSampler(table, [0, 1, 2], n_way=3, k_max=5, seed=0)
    rng = np.random.default_rng(1)
    used_other = 0
    for _ in range(50):
        idx = rng.choice(6, 3)
        protos, slots = sampler.sample([f"im{i}.jpg" for i in idx], [[0], [1, 2], []])
        assert [p.shape for p in protos] == [(3, 3, 1, 6)] * 2
        for b, own in enumerate(idx):
            assert all(c >= 0 for c in slots[b])
            assert torch.all(protos[0][b, :, 0, own] == 0)  # the query image never contributes
            used_other += int((protos[0][b].sum(-1) > 0.99).all())  # each prototype is a mean of other images
    assert used_other == 150
    assert slots[0][0] == 0 and set(slots[1][:2]) == {1, 2}  # the present classes come first


def test_episode_prototype_is_mean_of_other_images():
    table = _table(n_images=2, classes=(0,))
    protos, slots = EpisodeSampler(table, [0], n_way=1, k_max=1, seed=0).sample(["im0.jpg"], [[0]])
    assert slots == [[0]] and protos[0].flatten().tolist() == [0.0, 1.0]  # only im1's instance may serve


def test_hard_negatives_are_look_alikes():
    """Class 1 embeds close to class 0, class 2 far from it: hard negatives for an image of class 0 are class 1."""
    image, cls, emb = [], [], []
    centre = {0: torch.tensor([1.0, 0.0, 0.0]), 1: torch.tensor([0.9, 0.1, 0.0]), 2: torch.tensor([0.0, 0.0, 1.0])}
    for i in range(4):
        for c in (0, 1, 2):
            image.append(f"im{i}.jpg")
            cls.append(c)
            emb.append([centre[c].view(1, 1, 3).repeat(2, 1, 1)])
    table = InstanceTable(image, cls, emb)
    hard = EpisodeSampler(table, [0, 1, 2], n_way=2, hard_negatives=1.0, seed=0)
    assert hard.similar[0] == [1, 2]
    negatives = [hard.sample(["im0.jpg"], [[0]])[1][0][1] for _ in range(20)]
    assert set(negatives) == {1}
    easy = EpisodeSampler(table, [0, 1, 2], n_way=2, hard_negatives=0.0, seed=0)
    assert {easy.sample(["im0.jpg"], [[0]])[1][0][1] for _ in range(40)} == {1, 2}


def test_remap_labels():
    keep, cls = remap_labels(torch.tensor([0, 0, 1, 1]), torch.tensor([[2.0], [5.0], [5.0], [1.0]]), [[5, 2], [1, -1]])
    assert keep.tolist() == [True, True, False, True] and cls.view(-1).tolist() == [1.0, 0.0, 0.0]


# -- training through Ultralytics ----
def test_training_writes_ultralytics_artifacts_and_removes_novel_boxes(trained):
    model, run = trained
    assert (run / "weights" / "best.pt").is_file() and (run / "results.csv").is_file()
    labels = model.trainer.train_loader.dataset.labels
    novel = model.trainer.split.novel
    assert novel == (3,) and not any(np.isin(lb["cls"], novel).any() for lb in labels)
    assert any(len(lb["cls"]) for lb in labels)


def test_validation_reports_base_and_novel_per_k(trained):
    model, _ = trained
    results = model.trainer.validator.results
    assert [r["shots"] for r in results] == [1, 3]
    assert all({"base_mAP50", "base_mAP50-95", "novel_mAP50", "novel_mAP50-95"} <= set(r) for r in results)


def test_best_pt_reloads_in_fresh_process_and_predicts(trained, dataset):
    _, run = trained
    img = next((dataset.parent / "images" / "val").glob("*.jpg"))
    code = textwrap.dedent(f"""
        from skimage import data
        from yolo_fewshot import FewShotYOLO
        m = FewShotYOLO(r"{run / "weights" / "best.pt"}")
        assert m.encoder_name == "efficientnet-lite0", m.encoder_name
        m.set_references({{"cat": [data.chelsea()], "cup": [data.coffee()]}})
        r = m.model.eval()
        import torch
        y = r(torch.rand(1, 3, 64, 64))[0]
        assert y.shape[1] == 6, y.shape
        print("ok", m.names)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SOURCE_ENV, cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok {0: 'cat', 1: 'cup'}" in r.stdout
    assert img.is_file()


def test_resume_after_sigkill(dataset, tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from yolo_fewshot import FewShotYOLO
        m = FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0")
        m.add_callback("on_model_save", lambda trainer: os.kill(os.getpid(), signal.SIGKILL))
        m.train(data=r"{dataset}", project=r"{tmp_path}", name="r", epochs=3, imgsz=64, batch=4, workers=0,
                plots=False, device="cpu", n_way=3, shots="1", val=False)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SOURCE_ENV, cwd=tmp_path)
    assert r.returncode == -9, r.stderr[-2000:]  # killed right after the first checkpoint
    last = tmp_path / "r" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    resumed = FewShotYOLO(last)
    resumed.train(resume=True)
    assert resumed.trainer.start_epoch == 1 and resumed.trainer.epoch == 2
    assert resumed.trainer.split.novel == (3,) and resumed.model.yaml["encoder"] == "efficientnet-lite0"


def test_checkpoint_writes_are_atomic(trained, tmp_path):
    from yolo_fewshot.engine.train import AtomicPath

    model, run = trained
    tr = model.trainer
    assert all(isinstance(p, AtomicPath) for p in (tr.last, tr.best, tr.wdir / "epoch3.pt"))
    target = AtomicPath(tmp_path / "last.pt")
    target.write_bytes(b"old")
    inode = os.stat(target).st_ino
    target.write_bytes(b"new")  # a new file renamed over the old one: readers see old or new, never half
    assert target.read_bytes() == b"new" and os.stat(target).st_ino != inode
    assert not list(tmp_path.glob(".last.pt.*"))


def test_compile_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="compile=True is not supported"):
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
            data=str(dataset), project=str(tmp_path), compile=True, **{**TRAIN, "epochs": 1}
        )


def test_unknown_novel_class_is_a_clear_error(dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(dataset.read_text().replace("novel: [rocket]", "novel: [dragon]"))
    with pytest.raises(ValueError, match="novel class 'dragon'"):
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
            data=str(bad), project=str(tmp_path), **TRAIN
        )


def test_ddp_file_rebuilds_the_trainer_with_plugin_keys(dataset, tmp_path):
    """Ultralytics' DDP launcher writes a script that imports the trainer's class and rebuilds it from its own default
    config; run that very script (minus the final train()) in a fresh process."""
    from ultralytics.utils.dist import generate_ddp_file

    from yolo_fewshot.engine.train import FewShotTrainer

    trainer = FewShotTrainer(
        overrides=dict(
            model="yolov8n-psalm.yaml",
            data=str(dataset),
            encoder="efficientnet-lite0",
            n_way=3,
            k_max=2,
            project=str(tmp_path),
            name="ddp",
            device="cpu",
        )
    )
    path = Path(generate_ddp_file(trainer))
    try:
        code = path.read_text()
        assert "trainer.train()" in code
        code = code.replace(
            "trainer.train()",
            "print('rebuilt', type(trainer).__name__, trainer.args.n_way, "
            "trainer.args.k_max, trainer.args.encoder, trainer.split.novel)",
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SOURCE_ENV, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "rebuilt FewShotTrainer 3 2 efficientnet-lite0 (3,)" in r.stdout
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".pt").unlink(missing_ok=True)


# -- COCO evaluation ----
def test_pycocotools_scores_ground_truth_as_perfect():
    from yolo_fewshot.engine.coco import coco_evaluate, coco_ground_truth

    labels = [
        {
            "im_file": f"/d/{i:03d}.jpg",
            "shape": (100, 200),
            "cls": np.array([[i % 2], [2]]),
            "bboxes": np.array([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]]),
        }
        for i in range(4)
    ]
    gt = coco_ground_truth(labels, {0: "a", 1: "b", 2: "c"}, list(range(1000)))
    assert gt["annotations"][0]["bbox"] == [80.0, 35.0, 40.0, 30.0] and gt["images"][1]["id"] == 1
    perfect = [{**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 1.0} for a in gt["annotations"]]
    assert coco_evaluate(gt, perfect) == (1.0, 1.0)
    assert coco_evaluate(gt, perfect, [2]) == (1.0, 1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + 60, *d["bbox"][1:]]} for d in perfect]
    assert coco_evaluate(gt, shifted) == (0.0, 0.0)
    assert np.isnan(coco_evaluate(gt, perfect, [7])[0])  # no ground truth for that class


def test_val_save_json_writes_coco_files_and_scores_them(trained, dataset, tmp_path):
    from yolo_fewshot.engine.val import FewShotValidator

    model, _ = trained
    args = dict(
        data=str(dataset),
        **VAL,
        save_json=True,
        shots="2",
        seeds=2,
        project=str(tmp_path),
        name="v",
    )
    v = FewShotValidator(args=args)
    v(model=model.model)
    assert [(r["shots"], r["seed"]) for r in v.results] == [(2, 0), (2, 1)]
    for r in v.results:
        assert {"coco_all_mAP50", "coco_base_mAP50", "coco_novel_mAP50-95"} <= set(r)
        assert all(0 <= r[k] <= 1 for k in r if k.startswith("coco_") and not np.isnan(r[k]))
    assert model.model.prototypes is None and model.model.names == {0: "object"}  # validation left no state behind
    run = v.save_dir
    gt = json.loads((run / "annotations.json").read_text())
    preds = json.loads((run / "predictions.json").read_text())
    assert len(gt["images"]) == 8 and {c["name"] for c in gt["categories"]} == {"cup", "cat", "face", "rocket"}
    # every class's labels are evaluated, not only those of the model's own names (one: "object"), which is what
    # Ultralytics' standalone validator keeps unless told otherwise
    n_labels = sum(len(f.read_text().split()) // 5 for f in (dataset.parent / "labels" / "val").glob("*.txt"))
    assert len(gt["annotations"]) == n_labels == int(v.metrics.nt_per_class.sum())
    assert len({a["category_id"] for a in gt["annotations"]}) > 1
    for seed in (0, 1):  # one predictions file per reference draw
        assert (run / f"predictions_2shot_seed{seed}.json").is_file()
    assert all({"image_id", "category_id", "bbox", "score"} <= set(p) for p in preds)


# -- TFA-style fine-tuning ----
def test_finetune_on_k_shots_with_frozen_backbone(trained, dataset, tmp_path):
    from yolo_fewshot.data.kshot import kshot_images, list_images

    images = list_images(str(dataset.parent / "images" / "train"))
    pick = kshot_images(images, [0, 1, 2, 3], k=2, seed=0)
    assert pick == kshot_images(images, [0, 1, 2, 3], k=2, seed=0) and len(pick) <= 8
    _, run = trained
    ft = FewShotYOLO(run / "weights" / "best.pt")
    ft.train(data=str(dataset), project=str(tmp_path), name="ft", finetune=True, **{**TRAIN, "shots": "2"})
    tr = ft.trainer
    listed = (tmp_path / "ft" / "2shot_train.txt").read_text().split()
    assert 1 <= len(listed) <= 8 and tr.trained_classes == (0, 1, 2, 3)
    labels = tr.train_loader.dataset.labels
    assert any(np.isin(lb["cls"], [3]).any() for lb in labels)  # novel boxes are trained on when fine-tuning
    assert tr.args.freeze == 10
    assert not tr.model.model[0].conv.weight.requires_grad and tr.model.model[10].attn[0].q.weight.requires_grad
    with pytest.raises(ValueError, match="one shot count"):
        FewShotYOLO(run / "weights" / "best.pt").train(
            data=str(dataset), project=str(tmp_path), name="ft2", finetune=True, **TRAIN
        )


# -- bad data ----
def test_bad_data_gets_clear_messages_and_training_goes_on(tmp_path):
    root = tmp_path / "d"
    yaml = make_dataset(root, n_train=12, n_val=4)
    (root / "labels" / "train" / "000.txt").write_text("9 0.5 0.5 0.2 0.2\n")  # class id out of range
    (root / "labels" / "train" / "001.txt").write_text("")  # empty: a background image
    (root / "images" / "train" / "002.jpg").write_bytes(b"not a jpeg")  # corrupt image
    for f in (root / "labels" / "train").glob("*.txt"):  # the novel class has no instance to draw references from
        f.write_text("".join(ln + "\n" for ln in f.read_text().splitlines() if not ln.startswith("3 ")))
    code = textwrap.dedent(f"""
        from yolo_fewshot import FewShotYOLO
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
            data=r"{yaml}", project=r"{tmp_path}", name="bad", epochs=1, imgsz=64, batch=4, workers=0, plots=False,
            device="cpu", n_way=3, shots="1")
        print("TRAINED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SOURCE_ENV, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "TRAINED" in out, out[-3000:]
    assert "Label class 9 exceeds dataset class count 4" in out  # Ultralytics' own check, unchanged
    assert "002.jpg" in out and "corrupt" in out.lower()
    assert "classes ['rocket'] have no reference instance in the 'train' split" in out


# -- command line ----
def test_cli_train_and_val_with_plugin_keys(dataset, tmp_path, capsys):
    from yolo_fewshot.cli import entrypoint

    common = [f"data={dataset}", "imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False", f"project={tmp_path}"]
    argv = [
        "train",
        "model=yolov8n-psalm.yaml",
        "encoder=efficientnet-lite0",
        "epochs=1",
        "n_way=2",
        "k_max=2",
        "shots=1",
        "name=cli",
        *common,
    ]
    assert entrypoint(argv) == 0
    best = tmp_path / "cli" / "weights" / "best.pt"
    assert best.is_file()
    assert entrypoint(["val", f"model={best}", "shots=1,2", "seeds=1", "name=cliv", *common]) == 0
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").save(tmp_path / "plain.pt")
    capsys.readouterr()
    assert entrypoint(["val", f"model={tmp_path / 'plain.pt'}", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("yolo-fewshot: error:") and "plain Ultralytics model" in err and "\n" not in err


# -- trainable support encoder (QAViT, seed 004) ----
def test_qavit_trains_jointly_with_the_detector(dataset, tmp_path):
    model = FewShotYOLO("yolov8n-psalm.yaml", encoder="qavit-tiny")
    assert model.model.support_encoder.trainable and model.model.proto_dims == [256, 256, 256]
    start = {}
    model.add_callback(
        "on_train_start",
        lambda tr: start.setdefault("w", unwrap(tr.model).support_encoder.net.patch.weight.detach().clone()),
    )
    model.train(data=str(dataset), project=str(tmp_path), name="q", **{**TRAIN, "n_way": 1, "k_max": 1, "shots": "1"})
    ckpt = torch.load(tmp_path / "q" / "weights" / "last.pt", weights_only=False)
    trained_w = ckpt["model"].support_encoder.net.patch.weight.float()
    assert not torch.allclose(trained_w, start["w"].float())  # the prototypes' gradients reached the encoder
    reloaded = FewShotYOLO(tmp_path / "q" / "weights" / "last.pt")
    assert reloaded.encoder is reloaded.model.support_encoder  # its own, trained encoder builds the banks
    from skimage import data

    bank = reloaded.set_references({"cat": [data.chelsea()]})
    assert bank.spec.name == "qavit-tiny" and bank.spec.dims == (256,) * 4
    from yolo_fewshot.engine.val import FewShotValidator

    v = FewShotValidator(
        args=dict(
            data=str(dataset),
            **VAL,
            shots="1",
            project=str(tmp_path),
            name="qv",
        )
    )
    v(model=reloaded.model)  # standalone: the support crops are encoded by the checkpoint's own encoder
    assert v.results and v.table.crops is not None and v.table.embeddings[0][0].shape == (1, 2, 256)


def unwrap(m):
    from ultralytics.utils.torch_utils import unwrap_model

    return unwrap_model(m)


def test_training_finished_tells_ended_runs_from_interrupted_ones(trained, tmp_path):
    from yolo_fewshot.engine.train import training_finished

    _, run = trained
    assert training_finished(run / "weights" / "last.pt")
    ckpt = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    ckpt["epoch"] = 0  # what a checkpoint written mid-training holds
    torch.save(ckpt, tmp_path / "mid.pt")
    assert not training_finished(tmp_path / "mid.pt") and not training_finished(tmp_path / "missing.pt")


def test_support_split_is_a_split_key_or_a_folder(tmp_path):
    (tmp_path / "refs").mkdir()
    names = {0: "cup", 1: "cat"}
    by_key = FewShotSplit.from_data({"names": names, "support": "val"})
    assert by_key.support_source({"path": str(tmp_path), "val": "/data/val"}) == "/data/val"
    by_path = FewShotSplit.from_data({"names": names, "support": "refs"})
    assert by_path.support_source({"path": str(tmp_path)}) == str(tmp_path / "refs")
    with pytest.raises(FileNotFoundError, match="support: nope is neither a split of the data YAML nor an existing"):
        FewShotSplit.from_data({"names": names, "support": "nope"}).support_source({"path": str(tmp_path)})


def test_trainer_sets_proto_dims_from_the_encoder_even_when_the_yaml_names_it(dataset, tmp_path):
    """A YAML naming encoder X with another encoder's proto_dims is configured for X (it crashed at the first step)."""
    from yolo_fewshot.configs import load_model_yaml
    from yolo_fewshot.engine.train import FewShotTrainer
    from yolo_fewshot.nn.fusion_neck import FusionNeck

    text = (REPO / "cfg" / "models" / "yolov8-psalm-p2.yaml").read_text()
    text = text.replace("encoder: hf:facebook/dinov2-small", "encoder: efficientnet-lite0")
    assert "encoder: efficientnet-lite0" in text and "proto_dims: 384" in text
    y = tmp_path / "yolov8n-mine-p2.yaml"
    y.write_text(text)
    t = FewShotTrainer(overrides={"model": str(y), "data": str(dataset), "encoder": "efficientnet-lite0",
                                  "project": str(tmp_path)})  # fmt: skip
    model = t.get_model(cfg=load_model_yaml(str(y)), verbose=False)
    neck = next(m for m in model.model if isinstance(m, FusionNeck))
    assert neck.proto_dims == [24, 40, 112, 320]


# -- reliability: settings checked before any work, duplicate names, empty labels, more shots than instances ----
@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("n_way", 0, r"n_way=0 must be an integer >= 1"),
        ("k_max", 0, r"k_max=0 must be an integer >= 1"),
        ("k_max", -2, r"k_max=-2 must be an integer >= 1"),
        ("hard_negatives", 1.5, r"hard_negatives=1\.5 must be a number in \[0, 1\]"),
        ("views", 9, r"views=9 must be an integer in 1\.\.4"),
        ("seeds", 0, r"seeds=0 must be an integer >= 1"),
        ("shots", "0,3", r"shots='0,3' must be positive integers"),
    ],
)
def test_plugin_settings_are_checked_before_any_work(dataset, tmp_path, key, value, msg):
    from yolo_fewshot.engine.train import FewShotTrainer

    overrides = dict(model="yolov8n-psalm.yaml", data=str(dataset), project=str(tmp_path), name="x", **{key: value})
    with pytest.raises(ValueError, match=msg):
        FewShotTrainer(overrides=overrides)
    assert not (tmp_path / "x").exists()  # refused before Ultralytics made the run folder or read the data


@pytest.mark.parametrize("seeds", [0, -1])
def test_validation_refuses_seeds_below_one(dataset, tmp_path, capsys, seeds):
    from yolo_fewshot.cli import entrypoint
    from yolo_fewshot.engine.val import FewShotValidator

    with pytest.raises(ValueError, match=rf"seeds={seeds} must be an integer >= 1"):
        FewShotValidator(args=dict(data=str(dataset), **VAL, seeds=seeds, project=str(tmp_path)))
    argv = ["val", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"data={dataset}", f"seeds={seeds}"]
    assert entrypoint(argv) == 2
    assert f"seeds={seeds} must be an integer >= 1" in capsys.readouterr().err


def test_duplicate_class_names_in_the_data_yaml_are_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"names class 'cup' twice \(ids 0 and 1\)"):
        FewShotSplit.from_data({"names": {0: "cup", 1: "Cup ", 2: "cat"}})
    bad = tmp_path / "dup.yaml"
    bad.write_text(dataset.read_text().replace("1: cat", "1: cup"))
    with pytest.raises(ValueError, match=rf"{bad} names class 'cup' twice \(ids 0 and 1\)"):
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
            data=str(bad), project=str(tmp_path), **TRAIN
        )


def test_training_with_every_label_file_empty_is_one_line(tmp_path):
    root = tmp_path / "d"
    yaml = make_dataset(root, n_train=8, n_val=4)
    for f in (root / "labels" / "train").glob("*.txt"):
        f.write_text("")
    with pytest.raises(ValueError, match=r"no labelled box of the trained classes \[0, 1, 2\]") as e:
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
            data=str(yaml), project=str(tmp_path), **TRAIN
        )
    assert "\n" not in str(e.value) and "label" in str(e.value)


def test_val_with_more_shots_than_instances_warns_and_reports_the_k_used(trained, dataset, tmp_path):
    import logging

    from ultralytics.utils import LOGGER

    from yolo_fewshot.engine.val import FewShotValidator

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, keep = [], Keep(logging.WARNING)
    model, _ = trained
    v = FewShotValidator(args=dict(data=str(dataset), **VAL, shots="1000", project=str(tmp_path), name="v"))
    LOGGER.addHandler(keep)
    try:
        v(model=model.model)
    finally:
        LOGGER.removeHandler(keep)
    have = {v.split.names[c]: len(v.table.by_class.get(c, [])) for c in v.split.names}
    assert 0 < max(have.values()) < 1000
    assert v.results[0]["k_used"] == {n: min(1000, k) for n, k in have.items()}
    assert any("few-shot val: shots=1000 but the 'train' split has fewer instances of" in m for m in seen), seen
