"""FewShotYOLO: the user-facing model, an Ultralytics ``Model`` whose detection task builds a FewShotDetectionModel."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from ultralytics.engine.model import Model
from ultralytics.utils import DEFAULT_CFG_DICT

from .atomic import replace_atomic
from .checkpoint import unsafe_loading
from .configs import load_model_yaml
from .encoders import EncoderSpec, SupportEncoder, build_encoder, configure_model_yaml
from .engine.predict import FewShotPredictor
from .engine.train import FewShotTrainer
from .engine.val import FewShotValidator
from .nn.detector import FewShotDetectionModel
from .nn.layout import class_layouts
from .pretrained import DEFAULT_MODEL
from .references.bank import ReferenceBank
from .references.build import build_bank

# NMS IoU of verified predictions (Ultralytics' default is 0.7): CenterNet's and the head's candidates are two sources
# of boxes, and the same object's two boxes often overlap at 0.5-0.7, so at 0.7 one of them stays as a duplicate (a
# false positive at AP50). Validator, K=5 category search, folds 0 / 1 / 2: novel AP50 0.274 / 0.120 / 0.319 at 0.7,
# 0.281 / 0.125 / 0.335 at 0.5 (base AP50 up on every fold); instance 1-shot, fold 0: 0.868 / 0.867. An explicit
# ``iou=`` always wins.
VERIFIED_NMS_IOU = 0.5


class FewShotYOLO(Model):
    """Reference-image YOLO detector.

    Args:
        model: The shipped pretrained model (default, :data:`~yolo_fewshot.pretrained.DEFAULT_MODEL`: trained on the
            stamps benchmark's base classes, see the README's model card), a pretrained ``.safetensors``, a model
            YAML (``yolov8n-lite0-proto.yaml``; shipped names resolve without a path) or a ``.pt`` checkpoint.
        task: Only ``detect``.
        verbose: Print the layer table when building from YAML.
        encoder: The support encoder (default: the one the YAML or checkpoint names).
        unsafe_load: Load a ``.pt`` without the safe-loading allowlist (see :mod:`yolo_fewshot.checkpoint`): only for
            old or foreign files you trust, since their pickle can run code.

    Examples:
        >>> model = FewShotYOLO("yolov8n-psalm-p2.yaml")
        >>> model.info()
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        task: str | None = None,
        verbose: bool = False,
        encoder: str | None = None,
        unsafe_load: bool = False,
    ) -> None:
        if task not in (None, "detect"):
            raise ValueError(f"FewShotYOLO supports task='detect' only, got task='{task}'")
        # set before Model.__init__, which builds the detector: the encoder fixes the prototype widths
        self.__dict__.update(_encoder_request=encoder, _encoder=None, references=None)
        with unsafe_loading(unsafe_load):  # a .pt loads with weights_only=True + allowlist unless opted out
            super().__init__(model=model, task="detect", verbose=verbose)
        if encoder is not None and isinstance(self.model, FewShotDetectionModel) and encoder != self.encoder_name:
            raise ValueError(
                f"{model} was trained with encoder {self.encoder_name}; its prototype widths are fixed, so "
                f"encoder={encoder} cannot be used with it"
            )
        if isinstance(self.model, nn.Module) and not isinstance(self.model, FewShotDetectionModel):
            raise TypeError(
                f"{model} is a plain Ultralytics model, not a few-shot one; load it with ultralytics.YOLO or "
                "train a few-shot model with `yolo-fewshot train model=yolov8n-psalm-p2.yaml`"
            )
        if isinstance(self.model, (str, Path)) and str(self.model).endswith(".onnx"):
            from .runtime.onnx import onnx_metadata

            if not {"yolo_fewshot_references", "yolo_fewshot"} & set(onnx_metadata(self.model)):
                raise ValueError(
                    f"{model} is not a yolo_fewshot export (no yolo_fewshot metadata); export a few-shot model with "
                    "model.export(format='onnx') (references baked in) or export(format='onnx', dynamic_refs=True); "
                    "a plain Ultralytics ONNX loads with ultralytics.YOLO"
                )

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        """Detection only: the few-shot trainer, validator and predictor (Ultralytics' engine, subclassed)."""
        return {
            "detect": {
                "model": FewShotDetectionModel,
                "trainer": FewShotTrainer,
                "validator": FewShotValidator,
                "predictor": FewShotPredictor,
            }
        }

    def _load(self, weights: str, task: str | None = None) -> None:
        """Ultralytics' loading, plus pretrained ``.safetensors`` models (weights + model YAML, no pickle; a bare name
        such as ``yolofs-lite0-fold0.safetensors`` is a shipped one)."""
        if not str(weights).lower().endswith(".safetensors"):
            return super()._load(weights, task)
        from .pretrained import load_pretrained

        self.model = load_pretrained(weights)
        self.task = self.model.task = "detect"
        self.ckpt = {"pretrained": self.model.pt_path}  # truthy: training starts from these weights, not the YAML
        self.ckpt_path = self.model.pt_path
        self.overrides.update(model=self.model.pt_path, task="detect")
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}
        self.model_name = str(weights)

    def _new(self, cfg: str, task: str | None = None, model: Any = None, verbose: bool = False) -> None:
        """Build from one of our YAMLs (resolved by :func:`~yolo_fewshot.configs.load_model_yaml`)."""
        cfg_dict = load_model_yaml(cfg)
        if self.__dict__.get("_encoder_request"):
            self.__dict__["_encoder"] = configure_model_yaml(cfg_dict, self._encoder_request)
        self.cfg, self.task = str(cfg), "detect"
        self.model = (model or FewShotDetectionModel)(cfg_dict, verbose=verbose)
        self.overrides.update(model=self.cfg, task=self.task)
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}
        self.model.task = self.task
        self.model_name = self.cfg

    def train(self, trainer=None, **kwargs: Any):
        """Ultralytics' train; the model's encoder travels with the run (the trainer may rebuild from the YAML)."""
        kwargs.setdefault("encoder", self.encoder_name)
        return super().train(trainer, **kwargs)

    def predict(
        self, source=None, stream: bool = False, predictor=None, refs: Any = None, verify: bool | None = None,
        proposals: str | None = None, top1: bool | None = None, hubness: float | None = None,
        colour: float | None = None, **kwargs: Any,
    ):  # fmt: skip
        """Ultralytics' predict on the model's references, or on ``refs`` (photos, folder or bank) set first;
        ``verify`` switches crop verification of prototype-head models (default: on), ``proposals`` picks its
        candidates (``head``, ``centernet``: the COCO CenterNet's boxes, ``keypoints``: the references' SIFT matches, or
        several joined by ``+``; default ``both``: head and CenterNet), ``top1`` whether classes compete
        for a box (default on: the references are instances; ``top1=False`` for category search), ``hubness`` the
        weight of instance search's hubness correction (default 0.5; 0: off, for a model whose training scenes hold the
        objects searched for), ``colour`` the weight of its colour histograms (default 0.15; grey frames skip it by
        themselves; 0: off, e.g. where lighting changes colours)."""
        self._use_refs(refs, verify, proposals, top1, hubness, colour)
        with _fetch_errors(source):
            out = super().predict(source, stream, predictor, **self._nms_defaults(kwargs))
        return _fetched(out, source) if stream else out

    def track(
        self, source=None, stream: bool = False, persist: bool = False, refs: Any = None, verify: bool | None = None,
        proposals: str | None = None, top1: bool | None = None, hubness: float | None = None,
        colour: float | None = None, **kwargs: Any,
    ):  # fmt: skip
        """Ultralytics' track (its trackers give temporal consistency); references are encoded once, not per frame."""
        self._use_refs(refs, verify, proposals, top1, hubness, colour)
        with _fetch_errors(source):
            out = super().track(source, stream, persist, **self._nms_defaults(kwargs))
        return _fetched(out, source) if stream else out

    def val(self, validator=None, **kwargs: Any):
        """Ultralytics' val (the few-shot validator: K-shot reference draws, pycocotools), verified boxes merged at
        :data:`VERIFIED_NMS_IOU` unless ``iou=`` is given."""
        return super().val(validator, **self._nms_defaults(kwargs))

    def _nms_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the NMS IoU of verified predictions (:data:`VERIFIED_NMS_IOU`) unless the call or the
        model's overrides set one, or verification is off (``verify=False`` or a model that cannot verify)."""
        verifies = isinstance(self.model, FewShotDetectionModel) and self.model.__dict__.get("verifier") is not None
        if verifies and "iou" not in kwargs and "iou" not in self.overrides and kwargs.get("verify", True):
            return {**kwargs, "iou": VERIFIED_NMS_IOU}
        return kwargs

    def export(self, refs: Any = None, dynamic_refs: bool = False, **kwargs: Any) -> str:
        """Ultralytics' export with the references baked in as constants (a single-input graph, any format the
        Exporter supports); class names and the encoder spec go into the ONNX metadata. ``dynamic_refs=True`` instead
        writes ``detector.onnx`` (inputs images + prototypes) and ``encoder.onnx`` next to the model (ONNX only), for
        :class:`~yolo_fewshot.runtime.onnx.FewShotOnnx`; it returns the detector's path."""
        if dynamic_refs:
            from .engine.export import export_dynamic

            if kwargs.get("format", "onnx") != "onnx":
                raise ValueError("dynamic_refs=True exports ONNX only; use format=onnx (or bake references for others)")
            pt = getattr(self.model, "pt_path", None) or self.model.yaml.get("yaml_file", "model")
            out = Path(kwargs.get("project") or Path(pt).parent) / f"{Path(pt).stem}_dynamic"
            return str(export_dynamic(self, out, int(kwargs.get("imgsz", 640)))[0])
        self._use_refs(refs)
        f = super().export(**kwargs)  # (verification never enters a graph: FewShotDetectionModel.predict skips it)
        if str(f).endswith(".onnx"):
            add_onnx_metadata(
                f,
                {
                    "yolo_fewshot_encoder": json.dumps(
                        self.model.yaml.get("encoder_spec") or {"name": self.encoder_name}
                    ),
                    "yolo_fewshot_references": json.dumps(list(self.model.names.values())),
                },
            )
        return f

    def _use_refs(
        self,
        refs: Any,
        verify: bool | None = None,
        proposals: str | None = None,
        top1: bool | None = None,
        hubness: float | None = None,
        colour: float | None = None,
    ) -> None:
        if verify is not None and isinstance(self.model, FewShotDetectionModel):
            on = bool(verify)
            weights = (hubness, colour) if on else (None, None)
            self.model.set_verify(verify, proposals if on else None, top1 if on else None, *weights)
        elif isinstance(self.model, FewShotDetectionModel) and (
            proposals is not None or top1 is not None or hubness is not None or colour is not None
        ):
            if proposals is not None:
                self.model.set_proposals(proposals)
            if top1 is not None or hubness is not None or colour is not None:
                self.model.set_verify(self.model.verifier or False, top1=top1, hubness=hubness, colour=colour)
        if refs is not None:
            self.set_references(refs)
        elif isinstance(self.model, FewShotDetectionModel) and self.model.prototypes is None:
            raise ValueError(
                "this model has no references to look for; pass refs= (photos, a <class>/ folder or a "
                ".safetensors bank) or call set_references() first"
            )
        elif (
            self._wants_keypoints()
            and self.model.verifier.proposals is not None  # asked for (the default uses keypoints where there are any)
            and not any(self.model.__dict__.get("keypoints") or [])
        ):
            raise ValueError(
                f"proposals={self.model.verifier.proposals} needs the references' keypoints, which were not found "
                "when they were set: pass refs= with it, or set_references(..., keypoints=True) first"
            )

    def _wants_keypoints(self) -> bool:
        """Whether the model's verification takes candidates from the references' keypoints."""
        verifier = getattr(self.model, "verifier", None) if isinstance(self.model, FewShotDetectionModel) else None
        return verifier is not None and "keypoints" in verifier.sources

    # -- references ----------------------------------------------------------------------------------------------------
    @property
    def encoder_name(self) -> str:
        """The support encoder this model's prototypes come from (stored in the model YAML / checkpoint)."""
        return self.model.yaml.get("encoder", "")

    @property
    def encoder(self) -> SupportEncoder:
        """The support encoder: a trainable one is the model's own submodule; a frozen one is built on first use from
        :attr:`encoder_name` and never becomes part of the checkpoint."""
        enc = getattr(self.model, "support_encoder", None)  # trainable encoders are part of the model
        if enc is None:
            if self.__dict__.get("_encoder") is None:
                self.__dict__["_encoder"] = build_encoder(self.encoder_name)
            enc = self.__dict__["_encoder"]
        dims = list(enc.spec.dims[-len(self.model.proto_dims) :])
        if dims != list(self.model.proto_dims):
            raise ValueError(
                f"encoder {self.encoder_name} gives prototype widths {dims}, the model expects {self.model.proto_dims}"
            )
        stored = self.model.yaml.get("encoder_spec")
        if stored is not None and not EncoderSpec.from_dict(stored).compatible(enc.spec):
            raise ValueError(
                f"the model was built with encoder {stored}, but '{self.encoder_name}' now loads as "
                f"{enc.spec.to_dict()}; point encoder= at the original weights"
            )
        self.model.yaml["encoder_spec"] = enc.spec.to_dict()  # the checkpoint stores the spec, never the encoder
        return enc

    def set_references(
        self, refs: Any, negatives: dict | None = None, method: str = "mean", keypoints: bool | None = None
    ) -> ReferenceBank:
        """Encode reference photos (or load a bank) and make them the classes the model detects.

        Args:
            refs: ``{class: [photo | (photo, box)]}``, a folder ``<class>/*.jpg`` (+ ``refs.yaml``), a ``.safetensors``
                bank, or a :class:`~yolo_fewshot.references.bank.ReferenceBank`.
            negatives: ``{class: [look-alike photos]}`` stored with the class.
            method: Aggregation of the K references of a class: ``mean`` or ``robust``.
            keypoints: Find the references' SIFT keypoints for ``keypoints`` proposals (kept in a saved bank too);
                default: when the model's verification proposes from keypoints (``proposals=...+keypoints``).

        Returns:
            The bank, also kept as :attr:`references` (``model.references.save("bank.safetensors")``).
        """
        if not isinstance(self.model, FewShotDetectionModel):  # an exported file: its classes are fixed
            raise ValueError(
                f"{self.model} is an exported model: its references are baked in (or it has none); predict without "
                "refs=, or set references on the .pt checkpoint (or use a dynamic_refs export's detector.onnx)"
            )
        if keypoints is None:
            keypoints = self._wants_keypoints()
        # layout descriptors (instance verification) come from the detector's own trunk, which verification uses
        lay_fn = self.model.reference_layouts if self.model.can_verify else None
        # and so do the crops' SIFT descriptors (keypoint votes)
        # and the COCO embeddings (category search's second view) come from the verifier's CenterNet
        bank = build_bank(
            self.encoder, refs, negatives, method, keypoints=bool(keypoints), layouts=lay_fn,
            descriptors=self.model.can_verify, coco=self.model.reference_coco if self.model.can_verify else None,
        )  # fmt: skip
        levels = len(self.model.proto_dims)
        negatives, negative_of = bank.negative_prototypes(levels)
        self.model.set_prototypes(bank.prototypes(levels), bank.names, negatives, negative_of)
        self.model.set_keypoints([c.keypoints for c in bank.classes.values()])
        self.model.set_layouts(class_layouts([c.layouts for c in bank.classes.values()], levels))
        desc = [c.descriptors for c in bank.classes.values()]
        self.model.set_descriptors([torch.cat(d) for d in desc] if all(desc) else None)
        self.model.set_coco(bank.coco_prototypes())
        colours = bank.colour_prototypes()
        self.model.set_colours(colours)
        if self.model.can_verify and colours is None:
            from ultralytics.utils import LOGGER

            # a bank saved before colour histograms were kept: still usable, but without instance search's colour cue
            LOGGER.warning(
                f"reference bank of {bank.names} has no colour histograms (saved before 2026-12-06): instance search "
                "runs without its colour cue; rebuild it from the photos (set_references(photos), then save) to use it"
            )
        self.model.reference_thumbnails = {
            n: c.thumbnail.numpy() for n, c in bank.classes.items() if c.thumbnail is not None
        }
        self.__dict__["references"] = bank
        self.predictor = None  # a cached predictor holds the old class names
        return bank

    def set_prototypes(
        self, protos: Tensor | Sequence[Tensor] | None, names: Sequence[str] | dict | None = None
    ) -> FewShotYOLO:
        """Set the detector's reference prototypes (see :meth:`FewShotDetectionModel.set_prototypes`)."""
        self.model.set_prototypes(protos, names)
        self.model.reference_thumbnails = {}
        self.__dict__["references"] = None  # prototypes set by hand have no bank
        self.predictor = None  # a cached predictor holds the old class names
        return self


def add_onnx_metadata(path: str | Path, items: dict[str, str]) -> None:
    """Add metadata entries to an ONNX file in place (atomically)."""
    import onnx

    model = onnx.load(str(path))
    for k, v in items.items():
        entry = next((p for p in model.metadata_props if p.key == k), None) or model.metadata_props.add()
        entry.key, entry.value = k, v
    replace_atomic(path, lambda tmp: onnx.save(model, tmp))


@contextlib.contextmanager
def _fetch_errors(source: Any) -> Iterator[None]:
    """A URL source that cannot be downloaded (no network) becomes one line naming it and the fix."""
    try:
        yield
    except ConnectionError:
        if not str(source).lower().startswith(("http://", "https://", "rtsp://", "rtmp://", "tcp://")):
            raise
        raise ConnectionError(
            f"cannot fetch source {source} (no network, or the address is wrong); download it and pass the local "
            "file, or check the connection"
        ) from None


def _fetched(results: Iterator[Any], source: Any) -> Iterator[Any]:
    """``stream=True``'s generator, its source opened (and any download failing) on the first ``next``: under
    :func:`_fetch_errors` there too, not only while the generator is made."""
    with _fetch_errors(source):
        yield from results
