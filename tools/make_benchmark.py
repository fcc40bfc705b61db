"""Generate the real-photo few-shot benchmark (see yolo_fewshot/data/benchmark.py for what it is).

    python tools/make_benchmark.py                       # all 3 folds into data/stamps/ (about 1 min per fold)
    python tools/make_benchmark.py --folds 0 --n-train 400 --size 256
    python tools/make_benchmark.py --write-manifests     # re-derive data/manifests/ from the Debian packages

Photos come from Debian packages fetched with `apt-get download` + `dpkg -x` into --cache (nothing is installed).
Output is deterministic for a given seed; the images stay out of git (only the YAMLs under data/stamps/ are tracked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "stamps")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the Debian packages are extracted (default: "
        "$YOLO_FEWSHOT_CACHE/debian or ~/.cache/yolo_fewshot/debian)",
    )
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=320, help="scene side in pixels")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-novel-train", type=int, default=300, help="scenes for the all-data upper bound")
    ap.add_argument("--n-instance", type=int, default=150, help="scenes of the instance 1-shot protocol")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-manifests", action="store_true", help="rescan the packages and rewrite data/manifests")
    a = ap.parse_args(argv)

    from yolo_fewshot.data.benchmark import (
        FOLDS,
        STAMP_MANIFEST_HEADER,
        STAMPS,
        build_benchmark,
        scan_stamps,
        write_tsv,
    )
    from yolo_fewshot.data.debian import FetchError, default_cache, fetch_debian

    a.cache = a.cache or default_cache()

    bad = [f for f in a.folds if f not in FOLDS]
    if bad:
        print(f"make_benchmark: error: unknown fold {bad}; folds are {sorted(FOLDS)}", file=sys.stderr)
        return 2
    try:
        if a.write_manifests:
            stamps = scan_stamps(fetch_debian(STAMPS[0], a.cache) / STAMPS[1])
            path = ROOT / "data" / "manifests" / "tuxpaint-stamps.tsv"
            write_tsv(path, STAMP_MANIFEST_HEADER, [(s.path, s.cls, s.sha) for s in stamps])
            print(f"wrote {path} ({len(stamps)} stamps); review it by eye before committing")
            return 0
        t0 = time.perf_counter()
        yamls = build_benchmark(
            a.out,
            a.cache,
            tuple(a.folds),
            size=a.size,
            n_train=a.n_train,
            n_val=a.n_val,
            n_novel_train=a.n_novel_train,
            n_instance=a.n_instance,
            seed=a.seed,
        )
    except (FetchError, FileNotFoundError) as e:
        print(f"make_benchmark: error: {e}", file=sys.stderr)
        return 2
    print(f"benchmark written in {time.perf_counter() - t0:.0f} s: " + ", ".join(str(y) for y in yamls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
