"""FewShotValidator: Ultralytics' DetectionValidator where each class is given K references drawn by seed.

For every evaluated class, K reference instances are drawn (seeded) from the support pool, never from the image being
evaluated; the resulting per-image prototypes are bound to the model, and Ultralytics computes its usual metrics over
all classes. Reported on top: base and novel mAP50 / mAP50-95 for each K, mean ± std over seeds (``shots=1,3,5
seeds=5``) — few-shot splits are high-variance, a single draw is not a result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import LOGGER

from ..data.episodes import InstanceTable
from ..data.split import FewShotSplit
from ..nn.detector import FewShotDetectionModel
from .cfg import PLUGIN_DEFAULTS, check_settings, cpu_threads, parse_shots
from .coco import coco_evaluate, coco_ground_truth, write_json


def _as_dict(args: Any) -> dict:
    if args is None:
        return {}
    return dict(vars(args)) if not isinstance(args, dict) else dict(args)


class FewShotValidator(DetectionValidator):
    """Seeded K-shot validation with base / novel reporting (see module docstring).

    Args:
        dataloader, save_dir, args, _callbacks: As Ultralytics' DetectionValidator (``args`` may hold plugin keys).
        support: Callable returning the trainer's support :class:`InstanceTable` (built here when absent).
        split: The base/novel split (read from the data YAML when absent).
    """

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None, support=None, split=None) -> None:
        args = _as_dict(args)
        plugin = {k: args.pop(k, v) for k, v in PLUGIN_DEFAULTS.items()}
        check_settings(plugin)  # seeds=0, shots=0, ...: one line, before Ultralytics reads anything
        super().__init__(dataloader, save_dir, args, _callbacks)
        for k, v in plugin.items():
            setattr(self.args, k, v)
        self.shots, self.n_seeds = parse_shots(self.args.shots), int(self.args.seeds)
        self.k, self.seed = self.shots[-1], 0
        self._support, self.split = support, split
        self.table: InstanceTable | None = None
        self.fs_model: FewShotDetectionModel | None = None
        self.results: list[dict] = []
        self.coco_stats: dict[str, float] = {}
        self._saved_state: tuple | None = None

    # -- setup -----------------------------------------------------------------------------------------------------
    def init_metrics(self, model) -> None:
        fs = model if isinstance(model, FewShotDetectionModel) else getattr(model, "model", None)
        if not isinstance(fs, FewShotDetectionModel):
            raise TypeError(
                "this is not a few-shot model (a plain Ultralytics checkpoint?); validate it with "
                "`yolo val`, or train one with `yolo-fewshot train model=yolov8n-psalm-p2.yaml`"
            )
        if self.fs_model is not fs:  # remember the model's own references, restored when validation ends
            self._saved_state = (
                fs.prototypes,
                dict(fs.names),
                list(fs.__dict__.get("_negative_of") or []),
                list(fs.__dict__.get("keypoints") or []),
                fs.__dict__.get("layouts"),
                fs.__dict__.get("descriptors"),
                fs.__dict__.get("coco_prototypes"),
                fs.__dict__.get("colours"),
            )
            fs._negative_of = []  # validation binds its own per-image prototypes of every class, without negatives
        self.fs_model = fs
        if self.device.type == "cpu":  # Ultralytics' device selection leaves one core idle (1 thread on 2 cores)
            torch.set_num_threads(cpu_threads())
        if fs.can_verify:
            on = bool(self.args.verify)
            hub, col = (getattr(self.args, k, None) if on else None for k in ("hubness", "colour"))
            fs.set_verify(on, self.args.proposals if on else None, self.args.top1 if on else None, hub, col)
        self.split = self.split or FewShotSplit.from_data(self.data)
        names = dict(self.split.names)
        fs.names = model.names = names
        super().init_metrics(model)
        joint = getattr(fs, "support_encoder", None)
        if self.table is None or joint is not None:  # a trainable encoder changes: re-encode the support every time
            source = self._support() if self._support is not None else None
            if source is None:
                source = self._source = getattr(self, "_source", None) or self._build_table(joint)
            self.table = source.encoded(joint) if joint is not None else source
        self._prepare_draw()

    def get_dataloader(self, dataset_path: str, batch_size: int):
        """Ultralytics' dataloader, for every class of the data YAML. Standalone, Ultralytics drops the labels of
        classes beyond the model's own names — for a few-shot model those are its current references (often one),
        while validation evaluates every class of the data YAML with references drawn from the support split."""
        self.split = self.split or FewShotSplit.from_data(self.data)
        self.names = dict(self.split.names)
        return super().get_dataloader(dataset_path, batch_size)

    def _build_table(self, joint=None) -> InstanceTable:
        """The support split's instances: cached embeddings (frozen encoder) or crops (trainable encoder)."""
        from ultralytics.data import build_yolo_dataset

        from ..data.support import crop_table, instance_table
        from ..encoders import build_encoder
        from .train import cache_dir

        ds = build_yolo_dataset(
            self.args, self.split.support_source(self.data), self.args.batch, self.data, mode="val", stride=32
        )
        if joint is not None:
            return crop_table(ds.labels, list(self.split.names), joint.spec.input_size, 1)
        encoder = build_encoder(self.args.encoder or self.fs_model.yaml["encoder"])
        table = instance_table(
            ds.labels, list(self.split.names), encoder, cache_dir(self.args, self.data), self.args.views
        )
        self._layouts, self._descriptors, self._coco, self._colours = self._support_descriptors(
            ds.labels, encoder.spec.input_size
        )
        return table

    def _support_descriptors(
        self, labels: list[dict], size: int
    ) -> tuple[list[torch.Tensor] | None, list | None, torch.Tensor | None, torch.Tensor | None]:
        """Layout descriptors of every support instance (the table's order), per level ``[J, 2, D_l]``, and each
        instance's crop descriptors ``[P_j, 128]``, when this validation verifies instance search
        (:mod:`~yolo_fewshot.nn.layout`, :mod:`~yolo_fewshot.nn.keypoint_votes`), their COCO embeddings ``[J, D]``
        when it verifies category search (:mod:`~yolo_fewshot.nn.coco_embedding`) and their colour histograms
        ``[J, H]`` when it compares colours (:mod:`~yolo_fewshot.nn.colour`); None for what it does not use."""
        from ..data.support import _instances
        from ..nn.colour import colour_histograms
        from ..nn.keypoint_votes import reference_descriptors
        from ..references.crops import make_crop

        fs = self.fs_model
        verifier = fs.__dict__.get("verifier")
        if verifier is None:
            return None, None, None, None
        lay_on = bool(verifier.top1 if verifier.layout is None else verifier.layout)
        votes_on = bool(verifier.top1 if verifier.votes is None else verifier.votes)
        coco_on = verifier.coco_share > 0
        colour_on = bool(verifier.top1 if verifier.colour is None else verifier.colour)
        items = _instances(labels, list(self.split.names), 2.0)[0]  # instance_table's order
        lay, desc, coco, col = [], [], [], []
        for i in range(0, len(items), 32) if lay_on or votes_on or coco_on or colour_on else ():
            crops, masks = zip(*(make_crop(im, box, size, 0.1) for im, box in items[i : i + 32]))
            crops, masks = torch.stack(crops), torch.stack(masks)
            if lay_on:
                lay.append(fs.reference_layouts(crops, masks))
            if votes_on:
                desc += reference_descriptors(crops, masks)
            if coco_on:
                coco.append(fs.reference_coco(crops, masks))
            if colour_on:
                col.append(colour_histograms(crops, masks))
        lay = [torch.cat([o[lv] for o in lay]) for lv in range(len(lay[0]))] if lay else None
        return (
            lay,
            (desc if votes_on and items else None),
            (torch.cat(coco) if coco else None),
            (torch.cat(col) if col else None),
        )

    def _prepare_draw(self) -> None:
        """Seeded order of candidate references per class; the default K-shot prototype of each class."""
        self.order = {
            c: np.random.default_rng([self.seed, c]).permutation(self.table.by_class.get(c, []))
            for c in self.split.names
        }
        missing = [self.split.names[c] for c, o in self.order.items() if len(o) == 0]
        if missing:
            LOGGER.warning(
                f"few-shot val: classes {missing} have no reference instance in the '{self.split.support}' "
                "split; they cannot be detected"
            )
        self.k_used = {self.split.names[c]: min(self.k, len(o)) for c, o in self.order.items()}
        short = {n: k for n, k in self.k_used.items() if 0 < k < self.k}
        if short:
            LOGGER.warning(
                f"few-shot val: shots={self.k} but the '{self.split.support}' split has fewer instances of "
                f"{', '.join(f'{n} ({k})' for n, k in short.items())}; their prototypes use all of them (K used)"
            )
        self.default = {c: self._proto(c, None) for c in self.split.names}

    def _drawn(self, c: int, exclude: str | None) -> list[int]:
        """The table rows of class ``c``'s K references for an image (``exclude``: the image's own instances)."""
        return [j for j in self.order[c] if self.table.image[j] != exclude][: self.k]

    def _layout(self, c: int, exclude: str | None) -> list[torch.Tensor]:
        """Class ``c``'s layout descriptors for an image: per level ``[2, D_l]``, the mean over its references."""
        idx = self._drawn(c, exclude)
        return [
            torch.nn.functional.normalize(t[idx], dim=-1).mean(0) if idx else torch.zeros(t.shape[1:])
            for t in self._layouts
        ]

    def _proto(self, c: int, exclude: str | None) -> list[torch.Tensor]:
        idx = self._drawn(c, exclude)
        if not idx:
            return [torch.zeros(self.table.embeddings[0][lv].shape[1:]) for lv in range(self.table.levels)]
        return self.table.prototype(idx, None)

    # -- per batch -------------------------------------------------------------------------------------------------
    def preprocess(self, batch: dict) -> dict:
        """Ultralytics' preprocessing, then bind per-image prototypes of every class (query image excluded)."""
        batch = super().preprocess(batch)
        classes = list(self.split.names)
        per_image, used_per_image = [], []
        for im in batch["im_file"]:
            used = {c: any(self.table.image[j] == im for j in self.order[c][: self.k]) for c in classes}
            per_image.append([self._proto(c, im) if used[c] else self.default[c] for c in classes])
            used_per_image.append(used)
        p = next(self.fs_model.parameters())
        # the draw's classes have no reference keypoints (cached embeddings only): none of a user's earlier references
        # may stand in for them in keypoint proposals
        self.fs_model.keypoints = []
        self.fs_model._protos = [
            torch.stack([torch.stack([img[c][lv] for c in range(len(classes))]) for img in per_image]).to(
                p.device, p.dtype
            )
            for lv in range(self.table.levels - len(self.fs_model.proto_dims), self.table.levels)
        ]
        # layout descriptors, when this validation computed them for its support (standalone, instance search)
        lay = getattr(self, "_layouts", None) if self._support is None else None
        self.fs_model.layouts = None
        if lay is not None:
            rows = [[self._layout(c, im if used_im[c] else None) for c in classes] for im, used_im in zip(
                batch["im_file"], used_per_image)]  # fmt: skip
            self.fs_model.set_layouts(
                [torch.stack([torch.stack([r[c][lv] for c in range(len(classes))]) for r in rows]) for lv in
                 range(len(lay))]
            )  # fmt: skip
        # the COCO embeddings (category search) of each class's drawn references, averaged
        coco = getattr(self, "_coco", None) if self._support is None else None
        self.fs_model.coco_prototypes = None
        if coco is not None:
            self.fs_model.set_coco(torch.stack([
                torch.stack([coco[idx].mean(0) if (idx := self._drawn(c, im if used_im[c] else None)) else
                             coco.new_zeros(coco.shape[1]) for c in classes])
                for im, used_im in zip(batch["im_file"], used_per_image)
            ]))  # fmt: skip
        # the colour histograms (instance search) of each class's drawn references, averaged
        col = getattr(self, "_colours", None) if self._support is None else None
        self.fs_model.colours = None
        if col is not None:
            self.fs_model.set_colours(torch.stack([
                torch.stack([col[idx].mean(0) if (idx := self._drawn(c, im if used_im[c] else None)) else
                             col.new_full((col.shape[1],), 1 / col.shape[1]) for c in classes])
                for im, used_im in zip(batch["im_file"], used_per_image)
            ]))  # fmt: skip
        # and the crops' SIFT descriptors (keypoint votes) of each class's drawn references
        desc = getattr(self, "_descriptors", None) if self._support is None else None
        self.fs_model.descriptors = None
        if desc is not None:
            self.fs_model.set_descriptors([
                [torch.cat([desc[j] for j in self._drawn(c, im if used_im[c] else None)] or [torch.zeros(0, 128)])
                 for c in classes] for im, used_im in zip(batch["im_file"], used_per_image)
            ])  # fmt: skip
        return batch

    # -- COCO evaluation -------------------------------------------------------------------------------------------
    def eval_json(self, stats: dict) -> dict:
        """With ``save_json=True``: write COCO ground truth and predictions, score them with pycocotools (all, base,
        novel). Replaces Ultralytics' own JSON scoring, which handles COCO/LVIS only (and needs faster-coco-eval).
        With several draws (``shots=1,3,5`` or ``seeds>1``) each draw's predictions are also kept, as
        ``predictions_<K>shot_seed<S>.json``."""
        self.coco_stats = {}
        if not (self.args.save_json and self.dataloader is not None):
            return stats
        gt = coco_ground_truth(self.dataloader.dataset.labels, self.split.names, self.class_map)
        write_json(gt, self.save_dir / "annotations.json")
        write_json(self.jdict, self.save_dir / "predictions.json")
        if len(self.shots) * self.n_seeds > 1:  # one file per reference draw: predictions.json holds only the last
            write_json(self.jdict, self.save_dir / f"predictions_{self.k}shot_seed{self.seed}.json")
        cmap = self.class_map
        for part, ids in (("all", None), ("base", self.split.base), ("novel", self.split.novel)):
            ap, ap50 = coco_evaluate(gt, self.jdict, None if ids is None else [int(cmap[i]) for i in ids])
            self.coco_stats[f"coco_{part}_mAP50-95"], self.coco_stats[f"coco_{part}_mAP50"] = ap, ap50
        LOGGER.info("pycocotools: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in self.coco_stats.items()))
        return stats

    @staticmethod
    def empty_coco_stats() -> dict[str, float]:
        """pycocotools' scores of a draw without any prediction."""
        return {f"coco_{part}_{m}": 0.0 for part in ("all", "base", "novel") for m in ("mAP50-95", "mAP50")}

    # -- runs ------------------------------------------------------------------------------------------------------
    def split_metrics(self) -> dict[str, float]:
        """Base and novel mAP50 / mAP50-95 of the last run (over classes with labels in the split)."""
        box = self.metrics.box
        idx = list(box.ap_class_index)
        out = {}
        for part, ids in (("base", self.split.base), ("novel", self.split.novel)):
            rows = [idx.index(c) for c in ids if c in idx]
            out[f"{part}_mAP50"] = float(np.mean(box.all_ap[rows, 0])) if rows else float("nan")
            out[f"{part}_mAP50-95"] = float(np.mean(box.all_ap[rows].mean(1))) if rows else float("nan")
        return out

    def __call__(self, trainer=None, model=None):
        try:
            if trainer is not None:  # during training: one draw at the largest K
                return super().__call__(trainer, model)
            self.results = []
            stats = {}
            for k in self.shots:
                for seed in range(self.n_seeds):
                    self.k, self.seed = k, seed
                    if self.fs_model is not None:  # the support table is kept across runs; only the draw changes
                        self._prepare_draw()
                    # Ultralytics scores the JSON only when there is a prediction: a draw that finds nothing scores 0,
                    # never the previous draw's numbers
                    self.coco_stats = self.empty_coco_stats() if self.args.save_json else {}
                    stats = super().__call__(trainer, model)
                    self.results.append(
                        {
                            "shots": k,
                            "seed": seed,
                            "k_used": dict(self.k_used),
                            **self.split_metrics(),
                            **self.coco_stats,
                        }
                    )
            self.print_fewshot_summary()
            self.metrics.fewshot = list(self.results)  # per draw, for API users: FewShotYOLO.val(...).fewshot
            return stats
        finally:
            self.restore_model()

    def restore_model(self) -> None:
        """Give the model back its own references and names (validation binds per-image ones of every class)."""
        if self.fs_model is not None and getattr(self, "_saved_state", None) is not None:
            self.fs_model._protos, self.fs_model.names, self.fs_model._negative_of, kps, lay, desc, coco, col = (
                self._saved_state
            )
            self.fs_model.keypoints, self.fs_model.layouts, self.fs_model.descriptors = kps, lay, desc
            self.fs_model.coco_prototypes, self.fs_model.colours = coco, col
            self.fs_model = None

    def print_fewshot_summary(self) -> None:
        """mean ± std over seeds of base / novel mAP for each K."""
        LOGGER.info(
            f"\nfew-shot results ({self.n_seeds} seed{'s' * (self.n_seeds > 1)} per K; base "
            f"{len(self.split.base)} classes, novel {len(self.split.novel)})"
        )
        self._summary_keys = ["base_mAP50", "base_mAP50-95", "novel_mAP50", "novel_mAP50-95"]
        if any("coco_novel_mAP50" in r for r in self.results):
            self._summary_keys += ["coco_base_mAP50", "coco_novel_mAP50"]
        LOGGER.info(f"{'K':>3} " + " ".join(f"{k.replace('_', ' '):>16}" for k in self._summary_keys))
        for k in self.shots:
            rows = [r for r in self.results if r["shots"] == k]
            cells = []
            for key in self._summary_keys:
                v = np.array([r[key] for r in rows], float)
                cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if np.isfinite(v).any() else "-")
            LOGGER.info(f"{k:>3} " + " ".join(f"{c:>16}" for c in cells))
