"""ReferenceBank: per-class reference embeddings (positives and look-alike negatives) and their provenance.

The bank keeps every reference's embedding (``[K, M, D_l]`` per level), not only the prototype, so that the
aggregation can change and classes can be added or removed without re-encoding the others. One ``.safetensors`` file
holds it all: the tensors, and in the header's metadata a JSON document with the class names, K, the encoder spec, the
aggregation and each reference's file name, sha256 and box. No pickle; writes are atomic; a round trip is bit-exact.

Every value is checked (finite, within float16's range: prototypes follow the model's dtype, and a half-precision model
turns anything larger into Inf and then NaN scores), and a file edited by hand gets one line naming the file and what
is wrong with it, never a ``KeyError``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import replace_atomic
from ..encoders.base import EncoderSpec
from ..nn.keypoint_match import KeypointTemplate
from .aggregate import METHODS, aggregate

FORMAT = "yolo_fewshot.reference_bank/1"
MAX_ABS = float(torch.finfo(torch.float16).max)  # 65504: prototypes may run in a half-precision model


def check_values(t: Tensor, what: str) -> None:
    """Refuse embeddings or prototypes that are NaN/Inf or beyond :data:`MAX_ABS` (one line saying which)."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contain NaN or Inf")
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > MAX_ABS:
        raise ValueError(
            f"{what} are out of range (|value| up to {peak:.3g}, more than {MAX_ABS:g}, float16's largest, which a "
            "half-precision model turns into Inf); encoder embeddings never are: rebuild the references"
        )


@dataclass
class ClassReferences:
    """One class: per-level embeddings ``[K, M, D_l]`` of its references and of its negatives (may have K=0)."""

    embeddings: list[Tensor]
    sources: list[dict] = field(default_factory=list)
    negatives: list[Tensor] | None = None
    negative_sources: list[dict] = field(default_factory=list)
    thumbnail: Tensor | None = None  # [T, T, 3] uint8 RGB of the first reference, shown on saved predictions
    keypoints: list[KeypointTemplate] = field(default_factory=list)  # SIFT keypoints of each reference (may be none)
    # layout descriptors of each reference and its mirror image, per level (P3-P5) [K, 2, G*G*D_l] (may be none;
    # yolo_fewshot.nn.layout): instance search compares candidates with them
    layouts: list[Tensor] = field(default_factory=list)
    # SIFT descriptors of each reference's crop and its mirror image [P_k, 128] (may be none;
    # yolo_fewshot.nn.keypoint_votes): instance search counts the candidates' keypoints that vote for the class
    descriptors: list[Tensor] = field(default_factory=list)
    # COCO embedding of each reference [K, D] (may be none; yolo_fewshot.nn.coco_embedding): category search mixes its
    # cosine into the candidates' similarity
    coco: Tensor | None = None
    # colour histogram of each reference [K, H] (may be none; yolo_fewshot.nn.colour): instance search adds its
    # agreement with the candidates' to their similarity
    colours: Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.embeddings[0].shape[0])


class ReferenceBank:
    """Reference embeddings of N named classes made by one encoder.

    Args:
        spec: The encoder that made (and must make) the embeddings.
        method: Default aggregation, ``mean`` or ``robust``.
    """

    def __init__(self, spec: EncoderSpec, method: str = "mean") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown aggregation '{method}'; choose one of {', '.join(METHODS)}")
        self.spec, self.method = spec, method
        self.classes: dict[str, ClassReferences] = {}

    # -- content -------------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, name: str) -> bool:
        return name in self.classes

    def _check(self, name: str, emb: list[Tensor], what: str) -> list[Tensor]:
        if len(emb) != len(self.spec.dims):
            raise ValueError(
                f"{what} of class '{name}' have {len(emb)} levels, the encoder {self.spec.name} has "
                f"{len(self.spec.dims)}"
            )
        out = []
        for level, (e, d) in enumerate(zip(emb, self.spec.dims)):
            e = torch.as_tensor(e).float()
            if e.ndim != 3 or e.shape[1] != self.spec.tokens or e.shape[2] != d:
                raise ValueError(
                    f"{what} of class '{name}' level {level} have shape {tuple(e.shape)}; the encoder "
                    f"{self.spec.name} gives [K, {self.spec.tokens}, {d}]"
                )
            check_values(e, f"{what} of class '{name}'")
            out.append(e.contiguous())
        if len({e.shape[0] for e in out}) != 1:
            raise ValueError(f"{what} of class '{name}' disagree on K across levels")
        return out

    def add(
        self,
        name: str,
        embeddings: list[Tensor],
        sources: list[dict] | None = None,
        negatives: list[Tensor] | None = None,
        negative_sources: list[dict] | None = None,
        thumbnail: Tensor | None = None,
        keypoints: Sequence[KeypointTemplate] = (),
        layouts: Sequence[Tensor] = (),
        descriptors: Sequence[Tensor] = (),
        coco: Tensor | None = None,
        colours: Tensor | None = None,
    ) -> None:
        """Add a class (its per-level ``[K, M, D_l]`` embeddings, optional negatives, keypoints of its references
        for ``proposals=...+keypoints``, layout descriptors ``[K, 2, G * G * D_l]`` per level, each reference's
        crop descriptors ``[P_k, 128]`` for keypoint votes, their COCO embeddings ``[K, D]`` and colour histograms
        ``[K, H]``); other classes are untouched.

        Raises:
            ValueError: Empty or duplicate name, no reference, wrong shape, NaN.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name must be a non-empty string, got {name!r}")
        clash = [n for n in self.classes if n.strip().lower() == name.strip().lower()]
        if clash:
            raise ValueError(f"class '{name}' is already in the bank (as '{clash[0]}'); remove it first or rename")
        emb = self._check(name, embeddings, "references")
        if emb[0].shape[0] == 0:
            raise ValueError(f"class '{name}' has no reference image")
        neg = None if negatives is None else self._check(name, negatives, "negative references")
        lay = []
        for lv, t in enumerate(layouts):
            t = torch.as_tensor(t).float()
            if t.ndim != 3 or t.shape[0] != emb[0].shape[0] or t.shape[1] != 2:
                raise ValueError(
                    f"layouts of class '{name}' level {lv} have shape {tuple(t.shape)}; expected "
                    f"[{emb[0].shape[0]}, 2, D]"
                )
            check_values(t, f"layouts of class '{name}'")
            lay.append(t.contiguous())
        if descriptors and len(descriptors) != emb[0].shape[0]:
            raise ValueError(f"class '{name}' has {len(descriptors)} descriptor sets for {emb[0].shape[0]} references")
        desc = []
        for j, t in enumerate(descriptors):
            t = torch.as_tensor(t).float()
            if t.ndim != 2 or t.shape[1] != 128:
                raise ValueError(f"descriptors of class '{name}' reference {j} have shape {tuple(t.shape)}; "
                                 "expected [P, 128]")  # fmt: skip
            check_values(t, f"descriptors of class '{name}'")
            desc.append(t.contiguous())
        k = emb[0].shape[0]
        coco = None if coco is None else _per_reference(coco, k, f"COCO embeddings of class '{name}'", "D")
        colours = None if colours is None else _per_reference(colours, k, f"colour histograms of class '{name}'", "H")
        if colours is not None and (colours < 0).any():
            raise ValueError(f"colour histograms of class '{name}' have negative bins")
        self.classes[name] = ClassReferences(
            emb,
            list(sources or []),
            neg,
            list(negative_sources or []),
            thumbnail,
            list(keypoints),
            lay,
            desc,
            coco,
            colours,
        )

    def remove(self, name: str) -> None:
        """Remove a class."""
        if name not in self.classes:
            raise KeyError(f"class '{name}' is not in the bank (it has {self.names})")
        del self.classes[name]

    def prototypes(self, levels: int | None = None, method: str | None = None) -> list[Tensor]:
        """Per-level prototypes ``[N, M, D_l]`` (the last ``levels`` levels: a P3–P5 model takes the coarse three)."""
        if not self.classes:
            raise ValueError("the reference bank is empty: add at least one class")
        method = method or self.method
        levels = len(self.spec.dims) if levels is None else levels
        start = len(self.spec.dims) - levels
        out = [
            torch.stack([aggregate(c.embeddings[lv], method) for c in self.classes.values()])
            for lv in range(start, len(self.spec.dims))
        ]
        for p in out:
            check_values(p, f"prototypes ({method}) of classes {self.names}")
        return out

    def coco_prototypes(self) -> Tensor | None:
        """The classes' COCO embeddings ``[N, D]`` (each the mean of its references'), or None unless every class has
        them with one width."""
        coco = [c.coco for c in self.classes.values()]
        if not coco or any(t is None for t in coco) or len({t.shape[1] for t in coco}) > 1:
            return None
        return torch.stack([t.mean(0) for t in coco])

    def colour_prototypes(self) -> Tensor | None:
        """The classes' colour histograms ``[N, H]`` (each the mean of its references'), or None unless every class
        has them with one width."""
        hists = [c.colours for c in self.classes.values()]
        if not hists or any(t is None for t in hists) or len({t.shape[1] for t in hists}) > 1:
            return None
        return torch.stack([t.mean(0) for t in hists])

    def negative_prototypes(
        self, levels: int | None = None, method: str | None = None
    ) -> tuple[list[Tensor] | None, list[int]]:
        """One prototype per class that has negatives (look-alikes), and the index of the class it suppresses."""
        method = method or self.method
        levels = len(self.spec.dims) if levels is None else levels
        start = len(self.spec.dims) - levels
        owners = [i for i, c in enumerate(self.classes.values()) if c.negatives is not None and c.negatives[0].shape[0]]
        if not owners:
            return None, []
        cls = list(self.classes.values())
        return [
            torch.stack([aggregate(cls[i].negatives[lv], method) for i in owners])
            for lv in range(start, len(self.spec.dims))
        ], owners

    def check_encoder(self, spec: EncoderSpec) -> None:
        """Refuse a bank made by another encoder (or the same one with other dims/revision)."""
        if not self.spec.compatible(spec):
            raise ValueError(
                f"reference bank was made with encoder {self.spec.name} (dims {list(self.spec.dims)}) but "
                f"the model uses {spec.name} (dims {list(spec.dims)}); rebuild the bank with the model's "
                "encoder"
            )

    # -- file ----------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank atomically to ``path`` (``.safetensors``)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, classes = {}, []
        for i, (name, c) in enumerate(self.classes.items()):
            for lv, e in enumerate(c.embeddings):
                tensors[f"c{i}.pos.l{lv}"] = e
            if c.negatives is not None:
                for lv, e in enumerate(c.negatives):
                    tensors[f"c{i}.neg.l{lv}"] = e
            if c.thumbnail is not None:
                tensors[f"c{i}.thumb"] = c.thumbnail
            for j, t in enumerate(c.keypoints):
                tensors[f"c{i}.kp{j}.points"] = torch.from_numpy(t.points)
                tensors[f"c{i}.kp{j}.descriptors"] = torch.from_numpy(t.descriptors)
            for lv, t in enumerate(c.layouts):
                tensors[f"c{i}.layout.l{lv}"] = t
            for j, t in enumerate(c.descriptors):
                tensors[f"c{i}.desc{j}"] = t
            if c.coco is not None:
                tensors[f"c{i}.coco"] = c.coco
            if c.colours is not None:
                tensors[f"c{i}.colour"] = c.colours
            classes.append(
                {
                    "name": name,
                    "k": c.k,
                    "sources": c.sources,
                    "negatives": c.negatives is not None,
                    "negative_sources": c.negative_sources,
                    "keypoint_sizes": [list(t.size) for t in c.keypoints],
                    "layout_levels": len(c.layouts),
                    "descriptor_sets": len(c.descriptors),
                }
            )
        meta = {"format": FORMAT, "encoder": self.spec.to_dict(), "method": self.method, "classes": classes}
        # atomic: a crash never leaves a half-written bank, and a killed save's temporary file goes at the next save
        return replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"yolo_fewshot": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        """Read a bank written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference bank not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("yolo_fewshot")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read reference bank {path}: {e}") from None
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not a yolo_fewshot reference bank")
        try:
            return cls._from_file(raw, tensors)
        except ValueError as e:
            raise ValueError(
                f"reference bank {path}: {e} (edited by hand? rebuild it: set_references(photos), then "
                "references.save(path))"
            ) from None

    @classmethod
    def _from_file(cls, raw: str, tensors: dict[str, Tensor]) -> ReferenceBank:
        """A bank from a file's metadata JSON and tensors; every inconsistency is a one-line ValueError."""
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"its metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"its metadata must be a JSON object, not {type(meta).__name__}")
        if meta.get("format") != FORMAT:
            raise ValueError(f"it has bank format {meta.get('format')!r}; this version reads {FORMAT!r}")
        for key in ("encoder", "classes"):
            if key not in meta:
                raise ValueError(f"its metadata has no '{key}'")
        try:
            spec = EncoderSpec.from_dict(meta["encoder"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"its metadata 'encoder' is not an encoder spec: {meta['encoder']!r}") from None
        if not isinstance(meta["classes"], list):
            raise ValueError(f"its metadata 'classes' must be a list, not {type(meta['classes']).__name__}")
        bank = cls(spec, meta.get("method", "mean"))
        n_levels = len(bank.spec.dims)

        def level_tensors(i: int, kind: str, name: str, why: str = "") -> list[Tensor]:
            keys = [f"c{i}.{kind}.l{lv}" for lv in range(n_levels)]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"class '{name}'{why} has no tensor {missing[0]}")
            return [tensors[k] for k in keys]

        for i, c in enumerate(meta["classes"]):
            if not isinstance(c, dict) or "name" not in c:
                raise ValueError(f"its metadata 'classes' entry {i} is not an object with a 'name': {c!r}")
            name = c["name"]
            pos = level_tensors(i, "pos", name)
            neg = level_tensors(i, "neg", name, " says it has negatives but the file") if c.get("negatives") else None
            kps = [
                _keypoints(tensors, f"c{i}.kp{j}", name, size) for j, size in enumerate(c.get("keypoint_sizes") or [])
            ]
            n_lay = c.get("layout_levels") or 0
            if not isinstance(n_lay, int) or not 0 <= n_lay <= n_levels:
                raise ValueError(f"class '{name}' layout_levels {n_lay!r} must be an integer from 0 to {n_levels}")
            missing = [f"c{i}.layout.l{lv}" for lv in range(n_lay) if f"c{i}.layout.l{lv}" not in tensors]
            if missing:
                raise ValueError(f"class '{name}' lists layouts but the file has no tensor {missing[0]}")
            lay = [tensors[f"c{i}.layout.l{lv}"] for lv in range(n_lay)]
            n_desc = c.get("descriptor_sets") or 0
            if not isinstance(n_desc, int) or n_desc < 0:
                raise ValueError(f"class '{name}' descriptor_sets {n_desc!r} must be a non-negative integer")
            missing = [f"c{i}.desc{j}" for j in range(n_desc) if f"c{i}.desc{j}" not in tensors]
            if missing:
                raise ValueError(f"class '{name}' lists descriptors but the file has no tensor {missing[0]}")
            desc = [tensors[f"c{i}.desc{j}"] for j in range(n_desc)]
            thumb = tensors.get(f"c{i}.thumb")
            coco, colours = tensors.get(f"c{i}.coco"), tensors.get(f"c{i}.colour")
            bank.add(name, pos, c.get("sources"), neg, c.get("negative_sources"), thumb, kps, lay, desc, coco, colours)
        return bank

    def __repr__(self) -> str:
        return (
            f"ReferenceBank({len(self)} classes {self.names}, K={[c.k for c in self.classes.values()]}, "
            f"encoder={self.spec.name}, method={self.method})"
        )


def _per_reference(t: Tensor, k: int, what: str, width: str) -> Tensor:
    """One vector per reference ``[k, width]`` (float32, contiguous), checked; one-line ValueError otherwise."""
    t = torch.as_tensor(t).float()
    if t.ndim != 2 or t.shape[0] != k:
        raise ValueError(f"{what} have shape {tuple(t.shape)}; expected [{k}, {width}]")
    check_values(t, what)
    return t.contiguous()


def _keypoints(tensors: dict[str, Tensor], key: str, name: str, size) -> KeypointTemplate:
    """One reference's keypoints from a bank file (plain arrays; every inconsistency is a one-line ValueError)."""
    pts, desc = tensors.get(f"{key}.points"), tensors.get(f"{key}.descriptors")
    if pts is None or desc is None:
        raise ValueError(f"class '{name}' lists keypoints but the file has no tensor {key}.points/.descriptors")
    if pts.ndim != 2 or pts.shape[1] != 2 or desc.ndim != 2 or desc.shape != (len(pts), 128):
        raise ValueError(
            f"class '{name}' keypoints {key} have shapes {tuple(pts.shape)} and {tuple(desc.shape)}; expected [P, 2] "
            "and [P, 128]"
        )
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"class '{name}' keypoint size {size!r} must be [w, h]") from None
    return KeypointTemplate(pts.float().numpy(), desc.float().numpy(), (w, h))
