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

Each reference is cropped (:mod:`.crops`), all crops go through the encoder in batches, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..encoders.base import SupportEncoder
from .bank import ReferenceBank
from .crops import file_digest, make_crop

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(
                f"refs.yaml names {sorted(map(str, dup))} twice (line {node.start_mark.line + 1}); list each class once"
            )
        return super().construct_mapping(node, deep)


def _item(item: Any, base: Path | None, cls: str) -> tuple[Any, Any]:
    """Normalise one reference to ``(image, box or None)``."""
    if isinstance(item, Mapping):
        if "image" not in item:
            raise ValueError(f"reference {dict(item)} of class '{cls}' has no 'image' key")
        img, box = item["image"], item.get("box")
    elif isinstance(item, tuple) and len(item) == 2:
        img, box = item
    else:
        img, box = item, None
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
        doc = yaml.load(spec.read_text(), Loader=_UniqueKeyLoader) or {}
        unknown = set(doc) - {"classes", "negatives"}
        if unknown:
            raise ValueError(f"{spec}: unknown keys {sorted(unknown)}; use 'classes' and 'negatives'")
        for name, items in (doc.get("classes") or {}).items():
            refs.setdefault(str(name), []).extend(_item(i, root, str(name)) for i in items or [])
        negatives = {str(k): [_item(i, root, str(k)) for i in v or []] for k, v in (doc.get("negatives") or {}).items()}
    if not refs:
        raise ValueError(f"reference folder {root} is empty; put photos in {root}/<class name>/")
    return refs, negatives


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


def _encode(encoder: SupportEncoder, items: list[tuple[Any, Any]], context: float) -> tuple[list, list[dict], Any]:
    crops, masks, sources = [], [], []
    for img, box in items:
        c, m = make_crop(img, box, encoder.spec.input_size, context)
        crops.append(c)
        masks.append(m)
        sources.append(
            {
                "file": str(img) if isinstance(img, (str, Path)) else "<array>",
                "sha256": file_digest(img),
                "box": None if box is None else [float(v) for v in box],
            }
        )
    return encoder.encode(torch.stack(crops), torch.stack(masks)), sources, crops[0]


def build_bank(
    encoder: SupportEncoder,
    refs: Any,
    negatives: Mapping[str, Sequence] | None = None,
    method: str = "mean",
    context: float = 0.1,
) -> ReferenceBank:
    """Build (or load) a reference bank.

    Args:
        encoder: The support encoder (its spec is stored in the bank).
        refs: A ``{class: references}`` mapping, a reference folder, a bank file, or a :class:`ReferenceBank`.
        negatives: ``{class: look-alike references}`` (added to those of a folder's refs.yaml).
        method: Aggregation of K references into a prototype (``mean`` or ``robust``).
        context: Context around boxes, as a fraction of the box's longer side.

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
        emb, src, first = _encode(encoder, its, context)
        neg, nsrc, _ = _encode(encoder, neg_all[name], context) if neg_all.get(name) else (None, [], None)
        bank.add(name, emb, src, neg, nsrc, thumbnail(first))
    return bank
