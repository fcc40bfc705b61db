"""Turn what a user gives — a dict of photos, a folder, a bank file — into a :class:`ReferenceBank`.

Accepted references:

* ``{"backpack": ["1.jpg", "2.jpg"], "person": [("frame.jpg", [x1, y1, x2, y2])]}`` — a photo is the whole object; a
  ``(photo, box)`` pair (or ``{"image": photo, "box": box}``) marks it; photos may be paths or arrays;
* a folder ``refs/<class name>/*.jpg`` of whole-object photos, with an optional ``refs/refs.yaml``::

      classes:            # more references, e.g. frames with boxes (paths relative to the folder)
        person:
          - {image: frame_0001.jpg, box: [412, 80, 470, 220]}
      negatives:          # look-alikes that are NOT the class
        backpack: [other_bag.jpg]

* a saved bank (``.safetensors``).

Each reference is cropped (:mod:`.crops`), all crops go through the encoder in batches, once. A mistake in
``refs.yaml`` (its syntax, its shape, a box) is one line naming the file; an encoder that outputs NaN or Inf is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..encoders.base import SupportEncoder
from ..nn.colour import colour_histograms
from ..nn.keypoint_match import KeypointTemplate
from ..nn.keypoint_votes import reference_descriptors
from .bank import ReferenceBank
from .crops import MIN_SIDE, box_numbers, file_digest, make_crop, read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(
                f"names {sorted(map(str, dup))} twice (line {node.start_mark.line + 1}); list each class once"
            )
        return super().construct_mapping(node, deep)


def _item(item: Any, base: Path | None, cls: str, where: str = "") -> tuple[Any, Any]:
    """Normalise one reference to ``(image, box or None)``; ``where`` names its origin in messages (a refs.yaml)."""
    if isinstance(item, Mapping):
        if "image" not in item:
            raise ValueError(f"reference {dict(item)}{where or f' of class {cls!r}'} has no 'image' key")
        img, box = item["image"], item.get("box")
    elif isinstance(item, tuple) and len(item) == 2:
        img, box = item
    else:
        img, box = item, None
    if box is not None and where:  # boxes from a file are checked where the file can be named
        box_numbers(box, where)
    if isinstance(img, (str, Path)) and base is not None and not Path(img).is_absolute():
        img = base / img
    return img, box


def read_refs_folder(root: Path) -> tuple[dict[str, list], dict[str, list]]:
    """References and negatives of a folder ``<class>/*.jpg`` (+ optional ``refs.yaml``): ``{class: [items]}`` x 2,
    with absolute paths (callers must not join them to the folder again)."""
    root = Path(root).resolve()
    refs: dict[str, list] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"reference folder {d} has no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        refs[d.name] = files
    negatives: dict[str, list] = {}
    spec = root / "refs.yaml"
    if spec.is_file():
        extra, negatives = read_refs_yaml(spec, root)
        for name, items in extra.items():
            refs.setdefault(name, []).extend(items)
    if not refs:
        raise ValueError(f"reference folder {root} is empty; put photos in {root}/<class name>/")
    return refs, negatives


def read_refs_yaml(spec: Path, root: Path) -> tuple[dict[str, list], dict[str, list]]:
    """``classes`` and ``negatives`` of a ``refs.yaml`` as ``{class: [(image, box)]}``; every mistake (syntax, a
    scalar or a list where a mapping belongs, a box that is not 4 finite numbers) is one line naming the file."""
    try:
        doc = yaml.load(spec.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{spec} is not valid YAML ({where}{problem}); fix its syntax") from None
    except ValueError as e:  # a class listed twice
        raise ValueError(f"{spec} {e}") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ValueError(f"{spec} must be a mapping with 'classes' and/or 'negatives', not {type(doc).__name__}")
    unknown = set(doc) - {"classes", "negatives"}
    if unknown:
        raise ValueError(f"{spec}: unknown keys {sorted(map(str, unknown))}; use 'classes' and 'negatives'")
    out = []
    for key in ("classes", "negatives"):
        section = doc.get(key) or {}
        if not isinstance(section, dict):
            raise ValueError(
                f"{spec}: '{key}' must map class names to lists of references, not {type(section).__name__}"
            )
        items: dict[str, list] = {}
        for name, refs in section.items():
            name = str(name)
            refs = [refs] if isinstance(refs, (str, dict)) else [] if refs is None else refs  # one, without a list
            if not isinstance(refs, list) or not all(isinstance(r, (str, dict)) for r in refs):
                raise ValueError(
                    f"{spec}: class '{name}' must list references (image paths or {{image: path, box: [x1, y1, x2, "
                    f"y2]}}), got {refs!r}"
                )
            items[name] = [_item(r, root, name, f" of class '{name}' in {spec}") for r in refs]
        out.append(items)
    return out[0], out[1]


def _normalise(refs: Mapping[str, Sequence], base: Path | None) -> dict[str, list[tuple[Any, Any]]]:
    out: dict[str, list] = {}
    lowered: dict[str, str] = {}
    for name, items in refs.items():
        name = str(name)
        key = name.strip().lower()
        if key in lowered:
            raise ValueError(f"class names '{lowered[key]}' and '{name}' are the same class; list each class once")
        lowered[key] = name
        if isinstance(items, (str, Path)) or (
            isinstance(items, tuple) and len(items) == 2 and not isinstance(items[0], tuple)
        ):
            items = [items]
        items = list(items or [])
        if not items:
            raise ValueError(f"class '{name}' has no reference image")
        out[name] = [_item(i, base, name) for i in items]
    return out


def thumbnail(crop: torch.Tensor, size: int = 64) -> torch.Tensor:
    """A small uint8 RGB picture ``[size, size, 3]`` of a reference crop ``[3, S, S]`` in [0, 1]."""
    small = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="area")[0]
    return (small.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def _encode(
    encoder: SupportEncoder, items: list[tuple[Any, Any]], context: float, name: str
) -> tuple[list, list[dict], tuple[Tensor, Tensor]]:
    """Per-level embeddings of ``items``, their sources, and their crops ``[K, 3, S, S]`` and masks ``[K, 1, S, S]``."""
    crops, masks, sources = [], [], []
    for img, box in items:
        c, m = make_crop(img, box, encoder.spec.input_size, context, MIN_SIDE)
        crops.append(c)
        masks.append(m)
        sources.append(
            {
                "file": str(img) if isinstance(img, (str, Path)) else "<array>",
                "sha256": file_digest(img),
                "box": None if box is None else [float(v) for v in box],
            }
        )
    emb = encoder.encode(torch.stack(crops), torch.stack(masks))
    if not all(torch.isfinite(e).all() for e in emb):
        files = ", ".join(s["file"] for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        raise ValueError(
            f"encoder {encoder.spec.name} produced NaN or Inf for class '{name}' ({files}); its weights are broken: "
            "reload the encoder (or, for an encoder trained with the model, the checkpoint)"
        )
    return emb, sources, (torch.stack(crops), torch.stack(masks))


def build_bank(
    encoder: SupportEncoder,
    refs: Any,
    negatives: Mapping[str, Sequence] | None = None,
    method: str = "mean",
    context: float = 0.1,
    keypoints: bool = False,
    layouts: Callable[[Tensor, Tensor], list[Tensor]] | None = None,
    descriptors: bool = False,
    coco: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> ReferenceBank:
    """Build (or load) a reference bank.

    Args:
        encoder: The support encoder (its spec is stored in the bank).
        refs: A ``{class: references}`` mapping, a reference folder, a bank file, or a :class:`ReferenceBank`.
        negatives: ``{class: look-alike references}`` (added to those of a folder's refs.yaml).
        method: Aggregation of K references into a prototype (``mean`` or ``robust``).
        context: Context around boxes, as a fraction of the box's longer side.
        keypoints: Also find each reference's SIFT keypoints (for ``keypoints`` proposals; they cost about as much as
            the encoding, so only when asked).
        layouts: Layout descriptors of reference crops ``[K, 3, S, S]`` and masks (per level ``[K, 2, D]``; the
            detector's :meth:`~yolo_fewshot.nn.detector.FewShotDetectionModel.reference_layouts`), kept per class.
        descriptors: Also keep the SIFT descriptors of each reference crop and its mirror image, for instance
            verification's keypoint votes (:mod:`~yolo_fewshot.nn.keypoint_votes`; ~5 ms a reference).
        coco: COCO embeddings ``[K, D]`` of reference crops and masks (the detector's
            :meth:`~yolo_fewshot.nn.detector.FewShotDetectionModel.reference_coco`), kept per class for category search.

    Returns:
        The bank, checked against ``encoder``.
    """
    if isinstance(refs, ReferenceBank):
        refs.check_encoder(encoder.spec)
        return refs
    base = None
    neg_all: dict[str, list] = {}
    if isinstance(refs, (str, Path)):
        p = Path(refs)
        if p.suffix == ".safetensors":
            bank = ReferenceBank.load(p)
            bank.check_encoder(encoder.spec)
            return bank
        if not p.exists():
            raise FileNotFoundError(
                f"references not found: {p} (give a folder of <class>/ photos or a .safetensors bank)"
            )
        if not p.is_dir():
            raise ValueError(f"references {p} must be a folder of <class>/ photos or a .safetensors bank")
        refs, neg_all = read_refs_folder(p)
        base = p
    if not isinstance(refs, Mapping) or not refs:
        raise ValueError("no references given: pass {class name: [photos]}, a folder or a .safetensors bank")
    items = _normalise(refs, base)
    for k, v in (negatives or {}).items():
        neg_all.setdefault(str(k), []).extend(_item(i, base, str(k)) for i in v)
    unknown = set(neg_all) - set(items)
    if unknown:
        raise ValueError(f"negatives given for {sorted(unknown)}, which are not reference classes {sorted(items)}")
    bank = ReferenceBank(encoder.spec, method)
    for name, its in items.items():
        emb, src, (crops, masks) = _encode(encoder, its, context, name)
        neg, nsrc, _ = _encode(encoder, neg_all[name], context, name) if neg_all.get(name) else (None, [], None)
        kps = [_keypoints(img, box) for img, box in its] if keypoints else []
        lay = layouts(crops, masks) if layouts is not None else []
        desc = reference_descriptors(crops, masks) if descriptors else []
        cemb = coco(crops, masks) if coco is not None else None
        bank.add(name, emb, src, neg, nsrc, thumbnail(crops[0]), kps, lay, desc, cemb, colour_histograms(crops, masks))
    return bank


def _keypoints(img: Any, box: Any) -> KeypointTemplate:
    """SIFT keypoints of one reference (inside its box and, for a cut-out, its alpha) for keypoint proposals."""
    rgb, alpha = read_image(img)
    return KeypointTemplate.from_image(rgb, box, alpha)
