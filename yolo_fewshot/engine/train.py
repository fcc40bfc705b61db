"""FewShotTrainer: Ultralytics' DetectionTrainer with episodic batches (subclassed, not copied).

What changes: the model is a FewShotDetectionModel; novel-class boxes are removed from the training labels; before
training, every base-class instance is embedded once through the on-disk cache; each batch becomes an episode
(:mod:`yolo_fewshot.data.episodes`) — per-image prototypes in ``batch["protos"]`` and labels remapped to prototype
slots — so Ultralytics' loss, EMA, schedulers, checkpoints, ``resume`` and callbacks run unchanged.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from copy import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..checkpoint import read_checkpoint
from ..configs import load_model_yaml
from ..data.episodes import EpisodeSampler, remap_labels
from ..data.kshot import kshot_images, list_images, write_kshot_list
from ..data.split import FewShotSplit
from ..data.support import crop_table, instance_table
from ..encoders import build_encoder, configure_model_yaml
from ..nn.detector import FewShotDetectionModel
from .cfg import FEWSHOT_CFG, PLUGIN_DEFAULTS, check_settings, cpu_threads, parse_shots
from .val import FewShotValidator


class AtomicPath(type(Path())):
    """A path whose ``write_bytes`` writes a temporary file and renames it over the target: Ultralytics writes
    checkpoints with ``last.write_bytes(...)``, and a kill mid-write must not leave a truncated ``last.pt``."""

    def write_bytes(self, data) -> int:
        tmp = self.with_name(f".{self.name}.{os.getpid()}.tmp")
        n = Path(tmp).write_bytes(data)
        os.replace(tmp, self)
        return n


def training_finished(last: str | Path) -> bool:
    """Whether ``last.pt`` is from a run that ended (Ultralytics strips the optimizer and sets ``epoch=-1`` then);
    False for a missing file or an interrupted run, which ``resume=True`` continues."""
    if not Path(last).is_file():
        return False
    return read_checkpoint(last).get("epoch") == -1  # a safe load (yolo_fewshot/checkpoint.py)


def _drawn_instances(data: dict, source: str, classes: Sequence[int], limit: int, seed: int) -> list:
    """``(image, box xyxy px)`` of at most ``limit`` labelled objects of ``classes`` in split ``source`` (images or a
    list), drawn by ``seed`` and kept in the split's order; ``ValueError`` when there is none."""
    import numpy as np
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    from ..data.support import _instances

    ds = build_yolo_dataset(get_cfg(overrides={"imgsz": 320}), source, 1, data, mode="val")
    items = _instances(ds.labels, classes, 2.0)[0]
    if not items:
        raise ValueError(f"no instance of the training classes {list(classes)} in '{source}'")
    return [items[j] for j in sorted(np.random.default_rng(seed).permutation(len(items))[:limit].tolist())]


@torch.no_grad()
def training_coco_center(
    model: FewShotDetectionModel, data: dict, classes: Sequence[int] | None = None, limit: int = 256, seed: int = 0
) -> torch.Tensor:
    """The centre of a model's COCO embeddings (:mod:`~yolo_fewshot.nn.coco_embedding`): the mean embedding of the
    reference instances of its training classes — the data's support split (``support:``, default ``train``), at
    most ``limit`` instances drawn by ``seed`` — cropped as references are.

    Args:
        model: The detector (its :meth:`~yolo_fewshot.nn.detector.FewShotDetectionModel.reference_coco`).
        data: The Ultralytics data dict (``check_det_dataset``'s).
        classes: The training classes (default: the split's base classes).
        limit: Instances at most.
        seed: Which ones, when there are more.

    Returns:
        ``[D]``.
    """
    from ..nn.coco_embedding import coco_center
    from ..references.crops import make_crop

    split = FewShotSplit.from_data(data)
    classes = list(split.base if classes is None else classes)
    items = _drawn_instances(data, split.support_source(data), classes, limit, seed)
    out = []
    for i in range(0, len(items), 32):
        crops, masks = zip(*(make_crop(*item, 224, 0.1) for item in items[i : i + 32]))
        out.append(model.reference_coco(torch.stack(crops), torch.stack(masks)))
    return coco_center(torch.cat(out))


@torch.no_grad()
def training_hubness_bank(
    model: FewShotDetectionModel, data: dict, classes: Sequence[int] | None = None, limit: int = 1024, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Instance search's hubness bank (:mod:`~yolo_fewshot.nn.hubness`): the labelled objects of the training classes
    in the training scenes (``train:``), at most ``limit`` drawn by ``seed``, cut from their scenes as verification
    cuts candidates and embedded by the model's trunk — generic objects of the kind a search meets, none of them a
    novel class's.

    Args:
        model: The detector (its trunk, the first layer, and its verifier's crop settings).
        data: The Ultralytics data dict (``check_det_dataset``'s).
        classes: The training classes (default: the split's base classes).
        limit: Objects at most (1 024: 4.8 MB in fp16 for Lite0's P3-P5; 384-1 582 of fold 0's measured alike).
        seed: Which ones, when there are more.

    Returns:
        :func:`~yolo_fewshot.nn.hubness.bank_embeddings`' tensors, ``[K, D]`` each, fp16.
    """
    import numpy as np
    from PIL import Image

    from ..nn.hubness import bank_embeddings, merge_banks
    from ..nn.verify import CropVerifier

    split = FewShotSplit.from_data(data)
    classes = list(split.base if classes is None else classes)
    by_image: dict[str, list] = {}  # each scene read once
    for im_file, box in _drawn_instances(data, data["train"], classes, limit, seed):
        by_image.setdefault(im_file, []).append(box)
    verifier = model.__dict__.get("verifier") or CropVerifier()
    size = verifier.crop_size(verifier.whitened(getattr(model, "whitening", None)))  # as the candidates are cut
    p = next(model.parameters())
    trunk, levels = model.model[0], len(model.proto_dims)
    parts, crops, masks = [], [], []
    for i, (im_file, boxes) in enumerate(by_image.items()):
        with Image.open(im_file) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        c, m = verifier.crops(img, torch.zeros(len(boxes), dtype=torch.long), torch.tensor(boxes, dtype=torch.float32),
                              size)  # fmt: skip
        crops.append(c), masks.append(m)
        if sum(len(x) for x in crops) >= 64 or i == len(by_image) - 1:
            parts.append(bank_embeddings(trunk, torch.cat(crops).to(p.device, p.dtype), torch.cat(masks).to(p), levels))
            crops, masks = [], []
    return {k: v.half() for k, v in merge_banks(parts).items()}


@torch.no_grad()
def training_whitening(
    model: FewShotDetectionModel, data: dict, scenes: int = 800, rgba: dict | None = None
) -> dict[str, torch.Tensor]:
    """Instance search's learned whitening (:mod:`~yolo_fewshot.nn.whitening`), fitted on the training scenes'
    objects paired with reference photos of the same objects — for data that says which object each box is (a
    benchmark fold's ``objects_train.json``, :func:`~yolo_fewshot.data.benchmark.identity_pairs`).

    Each scene object is cut and embedded as verification cuts candidates, each photo as references are encoded
    (:func:`~yolo_fewshot.references.crops.make_crop`, the model's encoder); every object pairs with the mean of its
    stamp's photos (as a class's references are averaged; each photo paired separately: the demo's scenes 73.2 against
    74.8 % found). Fold 0 (800 scenes): 3 750 objects of 172 stamps, ~1.5 min on 2 CPU cores.

    Args:
        model: The detector (its trunk, encoder spec and verifier's crop settings).
        data: The Ultralytics data dict (``check_det_dataset``'s).
        scenes: Training scenes read at most.
        rgba: The stamps' cut-outs by path (default: read from the Debian package cache).

    Returns:
        ``{"mean.<l>": [D_l], "matrix.<l>": [D_l, D_l]}`` for the trunk's last levels (P3-P5 for Lite0), float32.

    Raises:
        FileNotFoundError: The data carries no identities (not a benchmark fold) or its stamps are not in the cache.
    """
    import numpy as np
    from PIL import Image

    from ..data.benchmark import identity_pairs
    from ..encoders.base import masked_mean
    from ..nn.verify import CropVerifier
    from ..nn.whitening import fit_whitening
    from ..references.crops import MIN_SIDE, make_crop

    root = Path(data["train"] if isinstance(data["train"], str) else data["train"][0]).parents[1]
    objects, views = identity_pairs(root, "train", rgba, scenes=scenes)
    levels = len(model.proto_dims)
    verifier = model.__dict__.get("verifier") or CropVerifier()
    size = verifier.crop_size(True)  # the side whitened search cuts its candidates at
    p = next(model.parameters())
    trunk = model.model[0]
    scene_parts, stamps = [[] for _ in range(levels)], []
    for image, boxes, ids in objects:
        with Image.open(image) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        crops, masks = verifier.crops(img, torch.zeros(len(boxes), dtype=torch.long), torch.tensor(boxes), size)
        feats = trunk(crops.to(p.device, p.dtype))[-levels:]
        for lv, f in enumerate(feats):
            scene_parts[lv].append(masked_mean(f.float(), masks.to(f.device).float()).cpu())
        stamps += ids
    encoder = build_encoder(model.yaml["encoder"])
    names = sorted(views)
    size = encoder.spec.input_size
    with warnings.catch_warnings():  # thin stamps (a 12 x 200 px pencil) warn as small references do: not the user's
        warnings.simplefilter("ignore")
        photo_items = [make_crop(im, box, size, 0.1, MIN_SIDE) for n in names for im, box in views[n]]
    crops, masks = (torch.stack(t) for t in zip(*photo_items))
    photo = [e.mean(1) if e.ndim == 3 else e for e in encoder.encode(crops, masks)[-levels:]]  # per level [S * V, D]
    per = len(views[names[0]])
    row = {n: i for i, n in enumerate(names)}
    which = torch.tensor([row[s] for s in stamps])
    out = {}
    for lv in range(levels):
        x = torch.cat(scene_parts[lv])
        r = photo[lv].reshape(len(names), per, -1)
        scene, ref = x, F.normalize(F.normalize(r, dim=-1).mean(1), dim=-1)[which]
        out[f"mean.{lv}"], out[f"matrix.{lv}"] = fit_whitening(scene, ref)
    return out


def cache_dir(args: Any, data: dict) -> Path:
    """Embedding cache location: ``fewshot_cache=`` or ``<dataset root>/.yolo_fewshot_cache``."""
    return Path(args.fewshot_cache or Path(data.get("path") or Path(data["train"]).parent) / ".yolo_fewshot_cache")


class FewShotTrainer(DetectionTrainer):
    """Episodic few-shot training on Ultralytics' detection trainer (see module docstring)."""

    def __init__(self, cfg=FEWSHOT_CFG, overrides: dict | None = None, _callbacks=None) -> None:
        if overrides and overrides.get("compile"):
            raise ValueError(
                "compile=True is not supported for few-shot training (torch.compile drops the per-batch "
                "prototypes); train without it"
            )
        # Ultralytics' DDP launcher rebuilds the trainer with its plain default config as `cfg`: add our keys back
        cfg = {**PLUGIN_DEFAULTS, **cfg2dict(cfg)}
        check_settings({**cfg, **(overrides or {})})  # n_way=0, seeds=-1, ...: one line before any work
        super().__init__(cfg, overrides, _callbacks)
        self.wdir, self.last, self.best = (AtomicPath(p) for p in (self.wdir, self.last, self.best))
        self.split = FewShotSplit.from_data(self.data)
        if not self.split.base and not self.args.finetune:
            raise ValueError("every class is listed as novel; leave at least one base class to train on")
        if self.args.finetune:
            self._setup_finetune()
        if self.device.type == "cpu":  # Ultralytics leaves one core idle (cpu_count - 1 threads); training uses all
            torch.set_num_threads(cpu_threads())
        self.sampler: EpisodeSampler | None = None
        self.support = None  # InstanceTable of the support split (all classes), shared with the validator
        self._encoder = None

    def _setup_finetune(self) -> None:
        """TFA-style fine-tuning: K shots of every class (novel too); backbone frozen unless ``freeze`` is set."""
        shots = parse_shots(self.args.shots)
        if len(shots) != 1:
            raise ValueError(f"finetune=True takes one shot count (e.g. shots=5), got shots={self.args.shots}")
        images = kshot_images(list_images(self.data["train"]), list(self.split.names), shots[0], self.args.seed)
        self.data["train"] = str(write_kshot_list(images, Path(self.save_dir) / f"{shots[0]}shot_train.txt"))
        if self.args.freeze is None:
            self.args.freeze = 10  # the YOLOv8 backbone: layers 0-9
        LOGGER.info(
            f"few-shot fine-tune: {len(images)} images ({shots[0]} shots of {len(self.split.names)} classes), "
            f"frozen layers 0-{self.args.freeze - 1}"
        )

    # -- model -----------------------------------------------------------------------------------------------------
    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> FewShotDetectionModel:
        cfg = load_model_yaml(cfg) if not isinstance(cfg, dict) else cfg
        # configure unless the YAML already is (a checkpoint's YAML has its encoder_spec): a plain YAML naming this same
        # encoder may still carry another encoder's proto_dims
        if self.args.encoder and (self.args.encoder != cfg.get("encoder") or "encoder_spec" not in cfg):
            self._encoder = configure_model_yaml(cfg, self.args.encoder)
        model = FewShotDetectionModel(cfg, ch=self.data["channels"], verbose=verbose and RANK == -1)
        if weights:
            model.load(weights)
        frozen = [i for i, m in enumerate(model.model) if getattr(m, "frozen", False)]
        if frozen and self.args.freeze is None:  # else Ultralytics would switch the frozen trunk's gradients back on
            self.args.freeze = frozen
        return model

    def set_model_attributes(self) -> None:
        """Hyper-parameters and the class split travel with the model (its names stay the references')."""
        self.model.args = self.args
        self.model.yaml["fewshot"] = {"names": dict(self.split.names), "novel": list(self.split.novel)}
        model = unwrap_model(self.model)
        if model.can_verify and getattr(model, "coco_center", None) is None:  # category search's COCO embedding
            try:
                model.coco_center = training_coco_center(model, self.data, self.trained_classes, seed=self.args.seed)
            except ValueError as e:  # no usable reference instance: category search stays uncentred, training goes on
                LOGGER.warning(f"few-shot: no COCO centre ({e}); category search compares uncentred COCO embeddings")
        if model.can_verify and getattr(model, "whitening", None) is None:  # first: the bank is cut as candidates are
            try:
                model.whitening = training_whitening(model, self.data)
            except FileNotFoundError as e:  # a user's data without identities: raw cosines, as before
                LOGGER.info(f"few-shot: no learned whitening ({e})")
        if model.can_verify and getattr(model, "hubness_bank", None) is None:  # instance search's hubness correction
            try:
                model.hubness_bank = training_hubness_bank(model, self.data, self.trained_classes, seed=self.args.seed)
            except ValueError as e:
                LOGGER.warning(f"few-shot: no hubness bank ({e}); instance search is not corrected for hubness")

    @property
    def trained_classes(self) -> tuple[int, ...]:
        """Base classes in base training; every class when fine-tuning."""
        return tuple(self.split.names) if self.args.finetune else self.split.base

    @property
    def encoder(self):
        """The model's trainable encoder, or the frozen one its YAML names (built once, outside the model)."""
        joint = getattr(unwrap_model(self.model), "support_encoder", None)
        if joint is not None:
            return joint
        if self._encoder is None:
            self._encoder = build_encoder(self.args.encoder or unwrap_model(self.model).yaml["encoder"])
        return self._encoder

    # -- data ------------------------------------------------------------------------------------------------------
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        ds = super().build_dataset(img_path, mode, batch)
        if mode == "train":
            if self.support is None and self.split.support == "train":
                self.support = self._table(ds.labels, list(self.split.names))  # before novel boxes are removed
            ds.update_labels(include_class=list(self.trained_classes))  # base training: novel boxes become background
        return ds

    def _table(self, labels, classes):
        n = sum(len(lb["cls"]) for lb in labels)
        if self.encoder.trainable:  # encoded every step with the current weights: keep crops, not embeddings
            LOGGER.info(f"few-shot: cropping {n} boxes for the trainable encoder {self.encoder.spec.name}")
            return crop_table(labels, classes, self.encoder.spec.input_size, self.args.views)
        LOGGER.info(
            f"few-shot: embedding {n} boxes with {self.encoder.spec.name} (cached in {cache_dir(self.args, self.data)})"
        )
        return instance_table(labels, classes, self.encoder, cache_dir(self.args, self.data), self.args.views)

    def _sampler(self) -> EpisodeSampler:
        if self.sampler is None:
            if self.support is None:  # support split other than train
                from ultralytics.data import build_yolo_dataset

                ds = build_yolo_dataset(
                    self.args, self.split.support_source(self.data), self.args.batch, self.data, mode="val", stride=32
                )
                self.support = self._table(ds.labels, list(self.split.names))
            table = self.support.subset([i for i, c in enumerate(self.support.cls) if c in set(self.trained_classes)])
            missing = [self.split.names[c] for c in self.trained_classes if not table.by_class.get(c)]
            if missing:
                LOGGER.warning(f"few-shot: base classes {missing} have no usable instance; they are never asked about")
            self.sampler = EpisodeSampler(
                table, self.trained_classes, self.args.n_way, self.args.k_max, self.args.hard_negatives, self.args.seed
            )
        return self.sampler

    def preprocess_batch(self, batch: dict) -> dict:
        """Ultralytics' preprocessing, then the episode: prototypes per image and labels as prototype slots."""
        batch = super().preprocess_batch(batch)
        sampler = self._sampler()
        b = batch["img"].shape[0]
        present = [batch["cls"][batch["batch_idx"] == i].view(-1).long().tolist() for i in range(b)]
        if self.encoder.trainable:
            refs, slots = sampler.sample_refs(list(batch["im_file"]), present)
            protos = self._encode_refs(sampler.table, refs)
        else:
            protos, slots = sampler.sample(list(batch["im_file"]), present)
        keep_unasked = unwrap_model(self.model).class_agnostic  # their boxes still teach objectness (slot -1)
        keep, new_cls = remap_labels(batch["batch_idx"], batch["cls"], slots, keep_unasked)
        batch["cls"], batch["bboxes"], batch["batch_idx"] = new_cls, batch["bboxes"][keep], batch["batch_idx"][keep]
        levels = len(unwrap_model(self.model).proto_dims)  # a P3–P5 model fuses the encoder's last three levels
        batch["protos"] = [p.to(self.device, batch["img"].dtype) for p in protos[-levels:]]
        return batch

    def _encode_refs(self, table, refs) -> list:
        """Prototypes from the trainable encoder, with gradients: each distinct (instance, view) of the batch's
        episodes is encoded once, then averaged per slot exactly as ``aggregate(mean)`` does at inference."""
        pairs = list(dict.fromkeys((j, v) for img in refs for r in img if r is not None for j, v in zip(*r)))
        crops, masks = table.crop_batch(pairs)
        levels = self.encoder(crops.to(self.device), masks.to(self.device))  # per level [U, M, D]
        row = {p: i for i, p in enumerate(pairs)}
        out = []
        for lv in levels:
            zero = lv.new_zeros(lv.shape[1:])
            out.append(
                torch.stack(
                    [
                        torch.stack([lv[[row[p] for p in zip(*r)]].mean(0) if r is not None else zero for r in img])
                        for img in refs
                    ]
                )
            )
        return out

    # -- validation ------------------------------------------------------------------------------------------------
    def get_validator(self) -> FewShotValidator:
        model = unwrap_model(self.model)
        self.loss_names = ("box_loss", "cls_loss", "dfl_loss") + (("sim_loss",) if model.class_agnostic else ())
        return FewShotValidator(
            self.test_loader,
            save_dir=self.save_dir,
            args=copy(self.args),
            _callbacks=self.callbacks,
            support=lambda: self.support,
            split=self.split,
        )

    def plot_training_labels(self) -> None:
        """Ultralytics plots label statistics with the data's class count; ours are the same classes."""
        try:
            super().plot_training_labels()
        except (IndexError, ValueError) as e:  # plotting must never stop a training run
            LOGGER.warning(f"few-shot: label plot skipped ({e})")
