"""The real-photo few-shot benchmark: Debian's photographic object stamps pasted on real photographs.

No COCO, VOC or LVIS can be had offline, so the benchmark is built from photographs that ship in Debian packages:

* objects: the photographic RGBA cut-outs of ``tuxpaint-stamps-default`` (GPL-2, Tux Paint contributors), listed in
  the committed manifest ``data/manifests/tuxpaint-stamps.tsv``; a class is a stamp folder (folders with fewer than
  :data:`MIN_PER_CLASS` stamps merge into their parent; what is left too small becomes unlabelled clutter);
* backgrounds: the photographic wallpapers of ``plasma-workspace-wallpapers`` (LGPL/CC-BY-SA) and
  ``mate-backgrounds`` (nature, GPL-2), and scikit-image's photos and textures (``data/manifests/backgrounds.tsv``,
  each assigned to train or test).

Everything is generated deterministically from a seed; only the generator, the manifests and the data YAMLs are
committed. Novel classes are held out by top-level category (:data:`FOLDS`): in a fold, no object of a novel category
appears in any training image. Two protocols:

* **category K-shot** (``foldN.yaml``): references are K *other* instances of a class (clean photos in the
  ``support`` split, never pasted in scenes); scenes hold the class's remaining instances;
* **instance 1-shot** (``foldN-instance.yaml``): every stamp of the fold's novel categories is its own class;
  the reference is one clean photo of that exact object, the scenes hold it among same-folder look-alikes.

Each split also has ``objects.json``: every pasted object (labelled or not) with its stamp, class and box, for the
false-positives-on-distractors metric.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_atomic
from .compose import clean_photo, compose, finish, jitter_cutout, random_crop
from .debian import fetch_debian

STAMPS = ("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps")
BACKGROUND_SOURCES = {
    "plasma": ("plasma-workspace-wallpapers", "usr/share/wallpapers"),
    "mate": ("mate-backgrounds", "usr/share/backgrounds/mate"),
}
FOLDS: dict[int, tuple[str, ...]] = {0: ("food",), 1: ("vehicles", "military"), 2: ("plants",)}
MIN_PER_CLASS = 7  # 5 reference instances for K=5 + at least 2 scene instances
SUPPORT_PER_CLASS = 5
# folders of drawings, signs and flags, not photographs (the manifest scan skips them)
EXCLUDED_FOLDERS = ("cartoon", "symbols", "town/flags", "town/roadsigns", "seasonal", "naturalforces")
STAMP_MANIFEST_HEADER = """\
Photographic object cut-outs of Debian tuxpaint-stamps-default 2022.06.04-1 (GPL-2; Tux Paint stamps contributors).
Written by tools/make_benchmark.py --write-manifests (heuristic: many colours, little flat area; drawings, signs,
flags and seasonal clip-art excluded), reviewed by eye. Columns: path under usr/share/tuxpaint/stamps, class
('' = unlabelled clutter: its folder had too few stamps), sha256[:16] of the file."""


def manifest_dir() -> Path:
    """Where the committed manifests are: the installed ``yolo_fewshot/assets`` (package data mapped from the
    repository's ``data/``), or ``data/`` itself in a source checkout."""
    pkg = Path(__file__).resolve().parents[1]
    for d in (pkg / "assets" / "manifests", pkg.parent / "data" / "manifests"):
        if d.is_dir():
            return d
    raise FileNotFoundError(f"benchmark manifests not found under {pkg}; reinstall the package")


# -- manifests ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stamp:
    """One object cut-out: its path under the stamps root, class ('' = unlabelled clutter) and content hash."""

    path: str
    cls: str
    sha: str

    @property
    def category(self) -> str:
        """Top-level folder (the unit novel classes are held out by)."""
        return self.path.split("/")[0]

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path[:-4].replace("/", "_")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def is_photographic(rgba: np.ndarray) -> bool:
    """Heuristic used once to write the manifest: photos have many colours and little flat area; drawings do not."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        return False
    opaque = rgba[..., 3] > 200
    if opaque.sum() < 100:
        return False
    q = (rgba[..., :3][opaque] // 8).astype(np.int32)
    colours = len(np.unique(q[:, 0] * 1024 + q[:, 1] * 32 + q[:, 2]))
    lap = np.abs(cv2.Laplacian(cv2.cvtColor(rgba[..., :3], cv2.COLOR_RGB2GRAY), cv2.CV_32F))
    inner = cv2.erode(opaque.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    flat = float((lap[inner] < 1).mean()) if inner.any() else 1.0
    return colours >= 40 and flat < 0.2


def assign_classes(paths: list[str]) -> dict[str, str]:
    """Class of every stamp path: its folder, merged into the parent while it has fewer than MIN_PER_CLASS stamps;
    a top-level remainder still too small becomes '' (unlabelled clutter). The class name is the folder's last part."""
    folder = {p: p.rsplit("/", 1)[0] for p in paths}
    changed = True
    while changed:
        changed = False
        count = Counter(folder.values())
        for p, f in folder.items():
            if count[f] < MIN_PER_CLASS and "/" in f:
                folder[p], changed = f.rsplit("/", 1)[0], True
    count = Counter(folder.values())
    return {p: (f.rsplit("/", 1)[-1] if count[f] >= MIN_PER_CLASS else "") for p, f in folder.items()}


def scan_stamps(root: Path, deny: tuple[str, ...] = ("clothes/button.png",)) -> list[Stamp]:
    """Build the stamp manifest from an extracted package (heuristic + exclusions; reviewed by eye once)."""
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.png")
        if "_mirror" not in p.name and not any(str(p.relative_to(root)).startswith(e) for e in EXCLUDED_FOLDERS)
    )
    files = [f for f in files if "/cartoon/" not in f and f not in deny]
    keep = [f for f in files if is_photographic(read_rgba(root / f))]
    cls = assign_classes(keep)
    return [Stamp(f, cls[f], _sha(root / f)) for f in keep]


def write_tsv(path: Path, header: str, rows: list[tuple[str, ...]]) -> None:
    """Atomic write of a tab-separated manifest with a ``#`` header."""
    write_atomic(path, "".join(f"# {h}\n" for h in header.splitlines()) + "".join("\t".join(r) + "\n" for r in rows))


def read_tsv(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def load_stamps(path: Path | None = None) -> list[Stamp]:
    """The committed stamp manifest."""
    return [Stamp(*r) for r in read_tsv(path or manifest_dir() / "tuxpaint-stamps.tsv")]


def load_backgrounds(path: Path | None = None) -> list[tuple[str, str, str]]:
    """The committed background manifest: ``(source, path, split)`` rows."""
    return [tuple(r) for r in read_tsv(path or manifest_dir() / "backgrounds.tsv")]


# -- reading sources ---------------------------------------------------------------------------------------------------
def read_rgba(path: Path) -> np.ndarray:
    """An RGBA PNG as ``[H, W, 4]`` uint8 in RGB(A) order (grey / no-alpha inputs get an opaque alpha)."""
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise FileNotFoundError(f"cannot read stamp {path}")
    if im.dtype != np.uint8:
        im = (im / 257).astype(np.uint8)
    if im.ndim == 2:
        im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGRA)
    elif im.shape[2] == 3:
        im = cv2.cvtColor(im, cv2.COLOR_BGR2BGRA)
    return cv2.cvtColor(im, cv2.COLOR_BGRA2RGBA)


def read_background(source: str, path: str, roots: dict[str, Path]) -> np.ndarray:
    """A background photo as ``[H, W, 3]`` uint8 RGB, at most 1024 px on its long side (they ship at up to 5K)."""
    if source == "skimage":
        from skimage import data

        im = getattr(data, path)()
        im = np.dstack([im] * 3) if im.ndim == 2 else im[..., :3]
    else:
        bgr = cv2.imread(str(roots[source] / path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"background {roots[source] / path} is missing; delete the cache and rerun")
        im = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    s = 1024 / max(im.shape[:2])
    if s < 1:
        im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(im)


# -- the generator -----------------------------------------------------------------------------------------------------
@dataclass
class Sources:
    """Everything the generator reads, loaded once."""

    stamps: list[Stamp]
    rgba: dict[str, np.ndarray]
    backgrounds: dict[str, list[np.ndarray]]  # split -> photos

    @property
    def classes(self) -> list[str]:
        """Labelled classes, sorted by (category, name) so ids are stable."""
        first = {}
        for s in self.stamps:
            if s.cls:
                first.setdefault(s.cls, s.category)
        return sorted(first, key=lambda c: (first[c], c))

    def category_of(self, cls: str) -> str:
        return next(s.category for s in self.stamps if s.cls == cls)


def load_sources(cache: Path, log: Callable[[str], None] = print) -> Sources:
    """Fetch the Debian packages into ``cache`` (once) and read the manifests' stamps and backgrounds.

    Raises:
        FileNotFoundError: A manifest entry is missing from the package, or its content changed.
    """
    log(f"benchmark: fetching Debian packages into {cache} (once; about 300 MB)")
    stamp_root = fetch_debian(STAMPS[0], cache) / STAMPS[1]
    roots = {k: fetch_debian(pkg, cache) / sub for k, (pkg, sub) in BACKGROUND_SOURCES.items()}
    stamps = load_stamps()
    rgba = {}
    for s in stamps:
        f = stamp_root / s.path
        if not f.is_file() or _sha(f) != s.sha:
            raise FileNotFoundError(
                f"stamp {s.path} is missing or changed in {STAMPS[0]} (manifest sha {s.sha}); the manifest was "
                "written for version 2022.06.04-1: rebuild it with tools/make_benchmark.py --write-manifests"
            )
        rgba[s.path] = read_rgba(f)
    backgrounds: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for source, path, split in load_backgrounds():
        backgrounds[split].append(read_background(source, path, roots))
    log(
        f"benchmark: {len(stamps)} stamps ({sum(bool(s.cls) for s in stamps)} labelled in "
        f"{len({s.cls for s in stamps if s.cls})} classes), backgrounds train {len(backgrounds['train'])} / test "
        f"{len(backgrounds['test'])}"
    )
    return Sources(stamps, rgba, backgrounds)


def split_instances(stamps: list[Stamp], seed: int = 0) -> tuple[dict[str, list[Stamp]], dict[str, list[Stamp]]]:
    """Per class: SUPPORT_PER_CLASS reference instances (never pasted in scenes) and the scene instances."""
    support, scene = {}, {}
    for c in sorted({s.cls for s in stamps if s.cls}):
        members = [s for s in stamps if s.cls == c]
        order = np.random.default_rng([seed, int(hashlib.md5(c.encode()).hexdigest()[:8], 16)]).permutation(
            len(members)
        )
        support[c] = [members[i] for i in order[:SUPPORT_PER_CLASS]]
        scene[c] = [members[i] for i in order[SUPPORT_PER_CLASS:]]
    return support, scene


class SplitWriter:
    """Writes one split: ``images/<split>/NNNNNN.jpg``, YOLO labels and ``objects.json``; JPEG quality varies."""

    def __init__(self, root: Path, split: str, rng: np.random.Generator) -> None:
        self.images, self.labels = root / "images" / split, root / "labels" / split
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels.mkdir(parents=True, exist_ok=True)
        self.objects_file = root / f"objects_{split}.json"
        self.rng, self.objects, self.n = rng, {}, 0

    def add(self, img: np.ndarray, objects: list[dict]) -> None:
        """``objects``: dicts with ``box`` (xyxy px), ``label`` (class id or None = unlabelled) and free metadata."""
        stem = f"{self.n:06d}"
        h, w = img.shape[:2]
        q = int(self.rng.integers(60, 96))
        cv2.imwrite(
            str(self.images / f"{stem}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q]
        )
        lines = [
            f"{o['label']} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for o in objects
            if o["label"] is not None
            for x1, y1, x2, y2 in [o["box"]]
        ]
        (self.labels / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
        self.objects[int(stem)] = objects
        self.n += 1

    def close(self) -> None:
        write_atomic(self.objects_file, json.dumps(self.objects))


def _scene(
    src: Sources,
    rng: np.random.Generator,
    size: int,
    split: str,
    targets: list[tuple[Stamp, int | None]],
    clutter: list[Stamp],
) -> tuple[np.ndarray, list[dict]]:
    """One scene: labelled targets (stamp, class id) and unlabelled clutter on a background of ``split``."""
    bgs = src.backgrounds[split]
    bg = random_crop(bgs[int(rng.integers(len(bgs)))], rng, size)
    items = list(targets) + [(s, None) for s in clutter]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    cuts = [jitter_cutout(src.rgba[s.path], rng, int(size * rng.uniform(0.12, 0.32))) for s, _ in items]
    img, placed = compose(bg, cuts, rng)
    objects = [
        {"box": list(p.box), "label": items[p.key][1], "stamp": items[p.key][0].path, "cls": items[p.key][0].cls}
        for p in placed
        if (p.box[2] - p.box[0]) >= 4 and (p.box[3] - p.box[1]) >= 4
    ]
    return finish(img, rng), objects


def _pick(rng: np.random.Generator, pool: list, n: int) -> list:
    return [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)] if pool and n > 0 else []


def build_fold(
    src: Sources,
    out: Path,
    fold: int,
    size: int = 320,
    n_train: int = 800,
    n_val: int = 200,
    n_novel_train: int = 300,
    n_instance: int = 150,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """Generate fold ``fold`` under ``out`` and write ``foldN.yaml`` / ``foldN-instance.yaml``; returns both."""
    novel_cats = FOLDS[fold]
    classes = src.classes
    cid = {c: i for i, c in enumerate(classes)}
    novel = [c for c in classes if src.category_of(c) in novel_cats]
    base = [c for c in classes if c not in novel]
    support, scene = split_instances(src.stamps, seed=0)  # fold-independent: the same references in every fold
    clutter = [s for s in src.stamps if not s.cls]
    clutter_train = [s for s in clutter if s.category not in novel_cats]  # novel categories never seen in training
    root = out / f"fold{fold}"
    rng = np.random.default_rng([seed, fold])

    def scenes(split: str, n: int, bg: str, label_classes: list[str], novel_share: float) -> None:
        w = SplitWriter(root, split, rng)
        pool = clutter if bg == "test" else clutter_train
        for _ in range(n):
            targets = []
            for _ in range(int(rng.integers(1, 4))):
                cs = novel if (novel and rng.random() < novel_share) else [c for c in label_classes if c not in novel]
                cs = cs or label_classes
                c = cs[int(rng.integers(len(cs)))]
                targets.append((scene[c][int(rng.integers(len(scene[c])))], cid[c]))
            img, objs = _scene(src, rng, size, bg, targets, _pick(rng, pool, int(rng.integers(2, 5))))
            w.add(img, objs)
        w.close()

    scenes("train", n_train, "train", base, 0.0)
    scenes("val", n_val, "test", classes, 0.5)
    scenes("novel_train", n_novel_train, "train", novel, 1.0)
    w = SplitWriter(root, "support", rng)
    for c in classes:
        for s in support[c]:
            img, box = clean_photo(src.rgba[s.path], rng, size)
            w.add(img, [{"box": list(box), "label": cid[c], "stamp": s.path, "cls": c}])
    w.close()
    yaml = _write_yaml(
        out / f"fold{fold}.yaml",
        f"Stamps benchmark fold {fold}, category K-shot: novel = the {'/'.join(novel_cats)} classes.",
        {"train": f"fold{fold}/images/train", "val": f"fold{fold}/images/val", "support": f"fold{fold}/images/support"},
        classes,
        novel,
        extra={"novel_train": f"fold{fold}/images/novel_train"},
    )

    # instance 1-shot: every novel-category stamp is a class; look-alikes = stamps of the same folder
    inst = [s for s in src.stamps if s.cls in novel]
    iid = {s.path: i for i, s in enumerate(inst)}
    by_folder: dict[str, list[Stamp]] = {}
    for s in inst:
        by_folder.setdefault(s.folder, []).append(s)
    iroot = out / f"fold{fold}-instance"
    w = SplitWriter(iroot, "test", rng)
    for _ in range(n_instance):
        t = inst[int(rng.integers(len(inst)))]
        alike = _pick(rng, [s for s in by_folder[t.folder] if s is not t], int(rng.integers(1, 4)))
        objs_t = [(t, iid[t.path])] + [(s, iid[s.path]) for s in alike]
        img, objs = _scene(src, rng, size, "test", objs_t, _pick(rng, clutter, int(rng.integers(1, 3))))
        w.add(img, objs)
    w.close()
    w = SplitWriter(iroot, "support", rng)
    for s in inst:
        img, box = clean_photo(src.rgba[s.path], rng, size)
        w.add(img, [{"box": list(box), "label": iid[s.path], "stamp": s.path, "cls": s.cls}])
    w.close()
    iyaml = _write_yaml(
        out / f"fold{fold}-instance.yaml",
        f"Stamps benchmark fold {fold}, instance 1-shot: every {'/'.join(novel_cats)} stamp is a class (all novel).",
        {  # train = the reference photos: Ultralytics requires the key; fine-tuning on them is the 1-shot fine-tune
            "train": f"fold{fold}-instance/images/support",
            "val": f"fold{fold}-instance/images/test",
            "support": f"fold{fold}-instance/images/support",
        },
        [s.name for s in inst],
        [s.name for s in inst],
    )
    log(
        f"benchmark fold {fold}: {len(base)} base + {len(novel)} novel classes {novel}; {n_train} train / {n_val} val "
        f"scenes, {sum(len(v) for v in support.values())} reference photos; instance protocol {len(inst)} objects"
    )
    return yaml, iyaml


def _write_yaml(
    path: Path, title: str, splits: dict[str, str], names: list[str], novel: list[str], extra: dict | None = None
) -> Path:
    """A data YAML with no ``path:`` key, so Ultralytics resolves the splits next to the YAML file."""
    lines = [
        f"# {title}",
        "# Generated by tools/make_benchmark.py (images are not in git; see README, 'Benchmark').",
        "# Photos: Debian tuxpaint-stamps-default (GPL-2), plasma-workspace-wallpapers, mate-backgrounds, skimage.",
        *(f"{k}: {v}" for k, v in {**splits, **(extra or {})}.items()),
        "names:",
        *(f"  {i}: {n}" for i, n in enumerate(names)),
        f"novel: [{', '.join(novel)}]",
    ]
    return write_atomic(path, "\n".join(lines) + "\n")


def build_benchmark(
    out: Path, cache: Path, folds: tuple[int, ...] = (0, 1, 2), log: Callable[[str], None] = print, **kw
) -> list[Path]:
    """Fetch the sources and generate every requested fold under ``out``; returns the data YAMLs."""
    out.mkdir(parents=True, exist_ok=True)
    src = load_sources(cache, log)
    return [y for f in folds for y in build_fold(src, out, f, log=log, **kw)]


# -- identities (a learned whitening's pairs) --------------------------------------------------------------------------
def identity_pairs(
    root: Path,
    split: str = "train",
    rgba: Mapping[str, np.ndarray] | None = None,
    photos: int = 2,
    scenes: int = 800,
    seed: int = 123,
) -> tuple[list[tuple[Path, list[list[float]], list[str]]], dict[str, list[tuple[np.ndarray, tuple]]]]:
    """A split's objects with their identities, and reference-style photos of each: what a learned whitening
    (:mod:`~yolo_fewshot.nn.whitening`) is fitted on.

    Args:
        root: A benchmark fold's folder (holds ``objects_<split>.json`` and ``images/<split>/``).
        split: The split whose scenes are read.
        rgba: The stamps' cut-outs by path (:attr:`Sources.rgba`); None: read from the Debian package cache
            (``$YOLO_FEWSHOT_CACHE/debian`` or ``~/.cache/yolo_fewshot/debian``), checked against the manifest.
        photos: Clean photos per stamp (:func:`~yolo_fewshot.data.compose.clean_photo`, 320 px), rendered as the
            benchmark renders its references.
        scenes: The first this many scenes of the split.
        seed: The photos' random generator.

    Returns:
        Per scene its image, its objects' xyxy boxes (both sides >= 8 px) and their stamps; per stamp its photos as
        ``(uint8 RGB [S, S, 3], xyxy box)``.

    Raises:
        FileNotFoundError: No ``objects_<split>.json`` under ``root`` (not a benchmark fold: no identities), or a stamp
            missing from the package.
    """
    from .debian import default_cache

    manifest = Path(root) / f"objects_{split}.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: the data carries no object identities (a benchmark fold does)")
    out, used = [], set()
    for stem, objects in list(json.loads(manifest.read_text()).items())[:scenes]:
        objects = [o for o in objects if o.get("stamp") and min(_sides(o["box"])) >= 8]
        if objects:
            image = Path(root) / "images" / split / f"{int(stem):06d}.jpg"
            out.append((image, [list(map(float, o["box"])) for o in objects], [o["stamp"] for o in objects]))
            used.update(o["stamp"] for o in objects)
    if rgba is None:
        stamp_root = fetch_debian(STAMPS[0], default_cache()) / STAMPS[1]
        shas = {s.path: s.sha for s in load_stamps()}
        rgba = {}
        for path in sorted(used):
            f = stamp_root / path
            if not f.is_file() or (path in shas and _sha(f) != shas[path]):
                raise FileNotFoundError(f"stamp {path} is missing or changed in {STAMPS[0]}: rebuild the benchmark")
            rgba[path] = read_rgba(f)
    missing = sorted(used - set(rgba))
    if missing:
        raise FileNotFoundError(f"no cut-out for stamps {missing[:3]} of {manifest}")
    rng = np.random.default_rng(seed)
    views = {path: [clean_photo(rgba[path], rng, 320) for _ in range(photos)] for path in sorted(used)}
    return out, views


def _sides(box: list) -> tuple[float, float]:
    """An xyxy box's width and height."""
    return box[2] - box[0], box[3] - box[1]
