"""FewShotDetectionModel: an Ultralytics ``DetectionModel`` whose classes are reference prototypes held as state.

``set_prototypes`` validates and stores per-level prototypes (see :mod:`yolo_fewshot.nn.prototypes`) and the class
names; every forward binds them to the model's :class:`PrototypeConsumer` layers (fusion necks, head) and unbinds them
afterwards, so callers — Ultralytics' trainer, validator, predictor, Exporter, stride probe, FLOPs count — call the
model with the image alone. Without prototypes the model runs in bypass mode: one class-agnostic score ("object").

Prototypes follow the model across ``.to()/.half()/.float()`` and are pickled with it (a checkpoint remembers the last
references it was given); they are not part of ``state_dict`` (they are inputs, not weights). A trainable support
encoder (QAViT) is the ``support_encoder`` submodule, learned and saved with the detector; frozen encoders never are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from ultralytics.nn.tasks import DetectionModel

from ..configs import load_model_yaml
from ..encoders import build_encoder, is_trainable
from .keypoint_match import KeypointTemplate
from .layout import layout_descriptors
from .loss import EpisodicDetectionLoss, PrototypeDetectionLoss
from .prototype_detect import PrototypeDetect
from .prototypes import PrototypeConsumer, as_prototypes
from .verify import CATEGORY_SIZE, CropVerifier, check_proposals, check_weight

BYPASS_NAMES = {0: "object"}


class FewShotDetectionModel(DetectionModel):
    """Detection model conditioned on reference prototypes.

    Args:
        cfg: Model YAML name/path (e.g. ``yolov8n-psalm-p2.yaml``) or an already loaded dict.
        ch: Input channels.
        nc: Ignored for the head (one score per reference class; the class count comes from the references).
        verbose: Print the layer table.
    """

    def __init__(
        self, cfg: str | dict = "yolov8n-psalm-p2.yaml", ch: int = 3, nc: int | None = None, verbose: bool = True
    ) -> None:
        self._protos: list[Tensor] | None = None
        cfg = cfg if isinstance(cfg, dict) else load_model_yaml(cfg)
        super().__init__(cfg, ch=ch, nc=1, verbose=verbose)
        consumers = [m for m in self.model if isinstance(m, PrototypeConsumer) and hasattr(m, "proto_dims")]
        if not consumers:
            raise ValueError(
                f"{cfg.get('yaml_file', 'model YAML')} has no layer that takes prototypes (a CHEAF/PSALM neck or a "
                "PrototypeDetect head)"
            )
        self.proto_dims: list[int] = consumers[0].proto_dims
        self.names = dict(BYPASS_NAMES)
        self.verifier = CropVerifier() if self.can_verify else None
        if is_trainable(self.yaml.get("encoder")):  # learned with the detector, so saved with it (no frozen weights)
            self.support_encoder = build_encoder(self.yaml["encoder"])

    # -- state ---------------------------------------------------------------------------------------------------------
    @property
    def prototypes(self) -> list[Tensor] | None:
        """Per-level prototypes ``[B|1, N, M, D_l]`` or None."""
        return self.__dict__.get("_protos")

    def set_prototypes(
        self,
        protos: Tensor | Sequence[Tensor] | None,
        names: Sequence[str] | dict | None = None,
        negatives: Sequence[Tensor] | None = None,
        negative_of: Sequence[int] = (),
    ) -> None:
        """Set (or clear, with None) the reference prototypes and their class names.

        Args:
            protos: Per-level prototypes, each ``[N, D_l]``, ``[N, M, D_l]`` or ``[B, N, M, D_l]`` (see
                :func:`~yolo_fewshot.nn.prototypes.as_prototypes`).
            names: N class names (list or ``{index: name}``); default ``ref0..refN-1``.
            negatives: Per-level prototypes of look-alikes, ``[N_neg, ...]`` like ``protos`` (shared by all images).
            negative_of: For each negative, the class it suppresses: wherever the negative scores at least as high as
                its class, the class's score is set to 0.
        """
        self._negative_of: list[int] = []
        if protos is None:
            self._protos, self.names = None, dict(BYPASS_NAMES)
            return
        protos = as_prototypes(protos, self.proto_dims)
        n = protos[0].shape[1]
        if negatives is not None:
            negatives = as_prototypes(negatives, self.proto_dims)
            if len(negative_of) != negatives[0].shape[1] or not all(0 <= c < n for c in negative_of):
                raise ValueError(f"negative_of {list(negative_of)} must name one of the {n} classes per negative")
            if protos[0].shape[0] != 1:
                raise ValueError("negative references need prototypes shared by the batch ([N, ...], not [B, N, ...])")
            protos = [torch.cat([p, q], 1) for p, q in zip(protos, negatives)]
            self._negative_of = [int(c) for c in negative_of]
        if names is None:
            names = [f"ref{i}" for i in range(n)]
        names = list(names.values()) if isinstance(names, dict) else list(names)
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for {n} prototype classes")
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        p = next(self.parameters())
        self._protos = [t.to(p.device, p.dtype) for t in protos]
        self.names = dict(enumerate(names))
        self.keypoints = []  # new classes: the references' keypoints, if any, are set with them (set_keypoints)
        self.layouts = None  # and their layout descriptors (set_layouts)
        self.descriptors = None  # and their crops' SIFT descriptors (set_descriptors)
        self.coco_prototypes = None  # and their COCO embeddings (set_coco)
        self.colours = None  # and their colour histograms (set_colours)

    def set_keypoints(self, keypoints: Sequence[Sequence[KeypointTemplate]]) -> None:
        """Per class (in the prototypes' order), the SIFT keypoints of its references, for ``keypoints`` proposals
        (:mod:`~yolo_fewshot.nn.keypoint_match`); set after :meth:`set_prototypes`, which clears them."""
        n = len(self.names)  # the classes (negatives are hidden extra prototypes, not named)
        if self.prototypes is None or len(keypoints) != n:
            raise ValueError(f"keypoints for {len(keypoints)} classes; the model has prototypes of {n}")
        self.keypoints = [list(k) for k in keypoints]

    def set_layouts(self, layouts: Sequence[Tensor] | None) -> None:
        """Per level (the trunk's last ones) the classes' layout descriptors ``[B|1, N, 2, G * G * D_l]`` or
        ``[N, 2, G * G * D_l]`` (:func:`~yolo_fewshot.nn.layout.class_layouts`), compared with candidate crops by
        instance verification; None clears them. Set after :meth:`set_prototypes`, which clears them."""
        if layouts is None:
            self.layouts = None
            return
        n = len(self.names)
        layouts = [t[None] if t.ndim == 3 else t for t in layouts]
        if self.prototypes is None or any(t.ndim != 4 or t.shape[1] != n or t.shape[2] != 2 for t in layouts):
            raise ValueError(
                f"layouts of shapes {[tuple(t.shape) for t in layouts]}; expected [B|1, {n}, 2, D] per level for the "
                f"model's {n} classes"
            )
        p = next(self.parameters())
        self.layouts = [t.to(p.device, torch.float32) for t in layouts]

    def set_descriptors(self, descriptors: Sequence[Tensor] | Sequence[Sequence[Tensor]] | None) -> None:
        """Per class the SIFT descriptors ``[P_n, 128]`` of its references' crops (and mirror images), for instance
        verification's keypoint votes (:mod:`~yolo_fewshot.nn.keypoint_votes`), or per image a list of those (one row
        per image of the batch, or one for all); None clears them. Set after :meth:`set_prototypes`, which clears
        them."""
        if descriptors is None:
            self.descriptors = None
            return
        rows = [descriptors] if not descriptors or torch.is_tensor(descriptors[0]) else list(descriptors)
        n = len(self.names)
        if self.prototypes is None or any(len(r) != n for r in rows):
            raise ValueError(f"descriptors for {[len(r) for r in rows][:3]} classes; the model has prototypes of {n}")
        bad = [tuple(t.shape) for r in rows for t in r if t.ndim != 2 or t.shape[1] != 128]
        if bad:
            raise ValueError(f"descriptors of shape {bad[0]}; expected [P, 128] (SIFT) per class")
        self.descriptors = [[t.float().cpu() for t in r] for r in rows]

    def set_coco(self, embeddings: Tensor | None) -> None:
        """The classes' COCO embeddings ``[B|1, N, D]`` or ``[N, D]`` (the mean of each class's references',
        :mod:`~yolo_fewshot.nn.coco_embedding`), mixed into category search's similarity; None clears them. Set after
        :meth:`set_prototypes`, which clears them."""
        self.coco_prototypes = self._per_class(embeddings, "COCO embeddings", "D")

    def set_colours(self, hists: Tensor | None) -> None:
        """The classes' colour histograms ``[B|1, N, H]`` or ``[N, H]`` (the mean of each class's references',
        :mod:`~yolo_fewshot.nn.colour`), compared with the candidates' by instance search; None clears them. Set after
        :meth:`set_prototypes`, which clears them."""
        self.colours = self._per_class(hists, "colour histograms", "H")

    def _per_class(self, t: Tensor | None, what: str, width: str) -> Tensor | None:
        """One vector per class, ``[N, W]`` or per image ``[B|1, N, W]``, as float32 ``[B|1, N, W]`` on the model's
        device (None stays None); one-line ValueError for another shape or before prototypes are set."""
        if t is None:
            return None
        out = t[None] if t.ndim == 2 else t
        if self.prototypes is None or out.ndim != 3 or out.shape[1] != len(self.names):
            raise ValueError(
                f"{what} of shape {tuple(t.shape)}; expected [B|1, {len(self.names)}, {width}] for the model's "
                f"{len(self.names)} classes"
            )
        return out.float().to(next(self.parameters()).device)

    @property
    def coco(self) -> tuple[Tensor, Tensor | None] | None:
        """What the verifier's COCO embedding needs: the classes' embeddings and the model's centre (``coco_center``,
        a statistic of its training classes' reference photos, :func:`~yolo_fewshot.nn.coco_embedding.coco_center`;
        None for a model trained before it existed: uncentred), or None without embeddings."""
        protos = self.__dict__.get("coco_prototypes")
        return None if protos is None else (protos, self.__dict__.get("coco_center"))

    @torch.no_grad()
    def reference_coco(self, crops: Tensor, masks: Tensor) -> Tensor:
        """COCO embeddings ``[K, D]`` of reference crops ``[K, 3, S, S]`` (masks ``[K, 1, S, S]``), at the verifier's
        crop size (the candidates' scale), CPU."""
        from .coco_embedding import coco_embed

        # category search's crop side: only category search compares COCO embeddings, and the references are set
        # before a run says which search it is
        verifier = self.__dict__.get("verifier")
        size = verifier.size if verifier is not None and verifier.size is not None else CATEGORY_SIZE
        crops = torch.nn.functional.interpolate(crops.float(), size=(size, size), mode="bilinear", antialias=True)
        masks = torch.nn.functional.interpolate(masks.float(), size=(size, size), mode="nearest")
        return coco_embed(crops, masks).cpu()

    @torch.no_grad()
    def reference_layouts(self, crops: Tensor, masks: Tensor) -> list[Tensor]:
        """Layout descriptors of reference crops ``[K, 3, S, S]`` (masks ``[K, 1, S, S]``) by this model's trunk, on
        the levels its prototypes use: per level ``[K, 2, G * G * D_l]`` (the crop and its mirror image), CPU."""
        p = next(self.parameters())
        lay = layout_descriptors(self.model[0], crops.to(p.device, p.dtype), masks.to(p.device, p.dtype),
                                 levels=len(self.proto_dims))  # fmt: skip
        return [t.float().cpu() for t in lay]

    @property
    def can_verify(self) -> bool:
        """Crop verification needs a class-agnostic head and a frozen trunk that is the prototypes' encoder."""
        return self.class_agnostic and bool(getattr(self.model[0], "frozen", False))

    def set_verify(
        self,
        on: bool | CropVerifier,
        proposals: str | None = None,
        top1: bool | None = None,
        hubness: float | None = None,
        colour: float | None = None,
    ) -> None:
        """Switch crop verification (:class:`~yolo_fewshot.nn.verify.CropVerifier`) on (default settings or the given
        ones) or off; refused for a model that cannot verify. ``proposals`` (``head``, ``centernet``, ``keypoints``,
        joined by ``+``; ``both`` = ``head+centernet``) picks the candidates' sources, ``top1`` whether classes compete
        for a box (instances: yes; categories: no), ``hubness`` the weight of instance search's hubness correction
        (:attr:`~yolo_fewshot.nn.verify.CropVerifier.hubness`; 0: off), ``colour`` the weight of its colour histograms
        (:attr:`~yolo_fewshot.nn.verify.CropVerifier.colour`; 0: off) (default: the verifier's own)."""
        if on and not self.can_verify:
            raise ValueError(
                "verify=True needs a prototype-head model on a frozen trunk (e.g. yolov8n-lite0-proto.yaml)"
            )
        self.verifier = (on if isinstance(on, CropVerifier) else CropVerifier()) if on else None
        if proposals is not None:
            self.set_proposals(proposals)
        if top1 is not None:
            if not isinstance(top1, bool):
                raise ValueError(f"top1={top1!r} must be True or False")
            if self.verifier is None:
                raise ValueError(f"top1={top1} needs crop verification on (verify=True)")
            self.verifier = dataclasses.replace(self.verifier, top1=top1)
        for key, value in (("hubness", hubness), ("colour", colour)):
            if value is not None:
                check_weight(key, value)
                if self.verifier is None:
                    raise ValueError(f"{key}={value} needs crop verification on (verify=True)")
                self.verifier = dataclasses.replace(self.verifier, **{key: float(value)})

    def set_proposals(self, proposals: str) -> None:
        """Where verification takes its candidates: ``head`` (the head's best boxes), ``centernet`` (the COCO
        CenterNet's class-agnostic boxes), ``keypoints`` (each class's reference box projected by a SIFT homography),
        or several joined by ``+`` (their union; ``both`` = ``head+centernet``); refused with verification off."""
        check_proposals(proposals)
        verifier = self.__dict__.get("verifier")
        if verifier is None:
            raise ValueError(f"proposals={proposals} needs crop verification on (verify=True)")
        self.verifier = dataclasses.replace(verifier, proposals=proposals)

    def _bind(self, protos: list[Tensor] | None) -> None:
        for m in self.model:
            if isinstance(m, PrototypeConsumer):
                m.prototypes = protos

    # -- torch plumbing ------------------------------------------------------------------------------------------------
    def predict(self, x: Tensor, *args: Any, **kwargs: Any):
        """Ultralytics' predict with the prototypes bound for this call (``[B, 4+N, A]`` outputs); negative
        references run as hidden extra classes and are folded away (:func:`suppress_negatives`). With crop
        verification on (eval, not export), the verifier re-scores the candidates; CenterNet proposals add
        and keypoint proposals add ``verifier.extra_columns(N)`` anchor columns (``[B, 4+N, A+E]``), which
        Ultralytics' NMS takes unchanged."""
        verifier = self.__dict__.get("verifier")
        # Verification is a post-step of eager inference: not under a TorchFunctionMode (Ultralytics' FLOPs count
        # runs thop's, which crashes torchvision's roi_align, and would count the crops and CenterNet as the model's)
        verifying = (
            verifier is not None
            and not self.training
            and self.prototypes is not None
            and not torch._C._is_torch_function_mode_enabled()
            and not torch.jit.is_tracing()
            and not getattr(self.model[-1], "export", False)  # an export's forward is never verified
        )
        # CenterNet's pass runs beside the forward (a spare core), not after it
        pending = verifier.prefetch(x) if verifying else None
        self._bind(self.prototypes)
        try:
            out = super().predict(x, *args, **kwargs)
        finally:
            self._bind(None)
        if verifying and isinstance(out, tuple):
            kps, lay, desc = (self.__dict__.get(k) for k in ("keypoints", "layouts", "descriptors"))
            hub = self.__dict__.get("hubness_bank")  # instance search's hubness bank (nn/hubness.py), training data
            y = verifier(self.model[0], x, out[0], out[1]["obj"], self.prototypes, kps, lay, desc, self.coco, hub,
                         self.__dict__.get("colours"), self.__dict__.get("whitening"), pending)  # fmt: skip
            out = y, out[1]
        neg = self.__dict__.get("_negative_of") or []
        if not neg or self.training:
            return out
        if isinstance(out, tuple):
            y, raw = out
            n = raw["scores"].shape[1] - len(neg)
            return suppress_negatives(y, neg), {**raw, "scores": raw["scores"][:, :n]}
        return suppress_negatives(out, neg)

    # -- training ------------------------------------------------------------------------------------------------------
    @property
    def class_agnostic(self) -> bool:
        """Whether boxes and objectness are class-agnostic (a :class:`PrototypeDetect` head): training then keeps the
        boxes of classes an episode does not ask about, as objects."""
        return isinstance(self.model[-1], PrototypeDetect)

    def init_criterion(self) -> EpisodicDetectionLoss | PrototypeDetectionLoss:
        return PrototypeDetectionLoss(self) if self.class_agnostic else EpisodicDetectionLoss(self)

    def loss(self, batch: dict, preds: Any = None):
        """Ultralytics' loss; a batch may carry per-image episode prototypes (``batch["protos"]``, ``[B, N, M, D]``),
        used for this call only. Labels' classes are prototype slots ``0..N-1``."""
        saved = self.prototypes
        if batch.get("protos") is not None:
            self._protos = list(batch["protos"])
        try:
            if getattr(self, "criterion", None) is None:
                self.criterion = self.init_criterion()
            if isinstance(self.criterion, EpisodicDetectionLoss):
                self.criterion.set_num_classes(1 if self._protos is None else int(self._protos[0].shape[1]))
            return super().loss(batch, preds)
        finally:
            self._protos = saved

    # -- many classes: bounded memory --------------------------------------------------------------------------------
    class_chunk: int = 16  # inference runs the per-class part (neck + head) on at most this many classes at a time

    def _predict_once(self, x: Tensor, profile: bool = False, embed: Any = None):
        """Ultralytics' layer loop, except that with more than ``class_chunk`` reference classes (inference) the layers
        from the first prototype consumer on run chunk by chunk, and the chunks' outputs are merged exactly (per-class
        necks only: a class-agnostic head costs one matrix product per class and needs no chunks)."""
        protos = self.prototypes
        n = None if protos is None else int(protos[0].shape[1])
        if self.training or profile or embed or n is None or n <= self.class_chunk or self.class_agnostic:
            return super()._predict_once(x, profile, embed)
        first = next(i for i, m in enumerate(self.model) if isinstance(m, PrototypeConsumer))
        shared_y: list = []
        for m in self.model[:first]:
            x = _run_layer(m, x, shared_y, self.save)
        outs = []
        try:
            for s in range(0, n, self.class_chunk):
                self._bind([p[:, s : s + self.class_chunk] for p in protos])
                y, xc = list(shared_y), x
                for m in self.model[first:]:
                    xc = _run_layer(m, xc, y, self.save)
                outs.append(xc)
        finally:
            self._bind(protos)
        return merge_chunks(outs)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any):
        """Move/cast the prototypes with the weights (``.to``, ``.half``, ``.float``, ``.cuda``)."""
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_protos") is not None:
            self._protos = [fn(t) for t in self._protos]
        return self


def _run_layer(m, x, y: list, save: list):
    """One step of the Sequential protocol Ultralytics' YAML models use (inputs from ``m.f``, keep if in ``save``)."""
    if m.f != -1:
        x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
    x = m(x)
    y.append(x if m.i in save else None)
    return x


def merge_chunks(outs: list) -> Any:
    """Merge head outputs of class chunks: scores concatenated, per anchor the box of the best-scoring class overall."""
    ys = [o[0] if isinstance(o, tuple) else o for o in outs]  # decoded [B, 4 + n_c, A]
    best = torch.stack([y[:, 4:].max(1).values for y in ys]).argmax(0)  # [B, A]: chunk holding each anchor's best class
    boxes = torch.stack([y[:, :4] for y in ys]).gather(0, best[None, :, None].expand(1, -1, 4, -1))[0]
    y = torch.cat([boxes, *[y[:, 4:] for y in ys]], 1)
    if not isinstance(outs[0], tuple):
        return y
    raws = [o[1] for o in outs]
    rb = torch.stack([r["boxes"] for r in raws]).gather(
        0, best[None, :, None].expand(1, -1, raws[0]["boxes"].shape[1], -1)
    )[0]
    return y, {**raws[0], "boxes": rb, "scores": torch.cat([r["scores"] for r in raws], 1)}


def suppress_negatives(y: Tensor, negative_of: list[int]) -> Tensor:
    """``[B, 4 + N + N_neg, A]`` -> ``[B, 4 + N, A]``; a class's score is zeroed where one of its negatives scores at
    least as high (look-alike suppression)."""
    n = y.shape[1] - 4 - len(negative_of)
    scores = y[:, 4 : 4 + n].clone()
    for j, c in enumerate(negative_of):
        beaten = y[:, 4 + n + j] >= scores[:, c]
        scores[:, c] = scores[:, c].masked_fill(beaten, 0.0)
    return torch.cat([y[:, :4], scores], 1)
