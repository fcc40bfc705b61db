"""``yolo-fewshot MODE key=value ...``: the plugin's command line, shaped like Ultralytics' ``yolo``.

Ultralytics' ``yolo`` command never imports plugins, so this is the entry point for few-shot models. Arguments are
``key=value`` pairs parsed with Ultralytics' own parser and checked against Ultralytics' keys plus the plugin's; the
model is a :class:`~yolo_fewshot.FewShotYOLO`. User mistakes (unknown key, missing file, bad value, a refused
checkpoint) and environment failures (no network, a full disk) end with one line on stderr and exit status 2, not a
stack trace; warnings print as one line too. ``unsafe_load=True`` loads a ``.pt`` you trust without the safe-loading
allowlist (:mod:`yolo_fewshot.checkpoint`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine.cfg import PLUGIN_DEFAULTS
from .pretrained import DEFAULT_MODEL

USAGE = """\
usage: yolo-fewshot MODE [key=value ...]

modes:
  demo       the whole path on real photos, ~2 min on 2 CPU cores -> runs/demo/    yolo-fewshot demo
  info       print the model summary            yolo-fewshot info model=yolov8n-psalm-p2.yaml
             (any mode: encoder=efficientnet-lite0 picks the support encoder, refs=dir/ or refs=bank.safetensors
              sets the reference classes: dir/<class name>/*.jpg, optional dir/refs.yaml for boxes and negatives)
  train      train (Ultralytics' train keys)   yolo-fewshot train model=yolov8n-psalm-p2.yaml data=my.yaml
  val        validate                          yolo-fewshot val model=best.pt data=my.yaml
  predict    detect in images/videos           yolo-fewshot predict model=best.pt source=scene.jpg
  export     export (Ultralytics' formats)     yolo-fewshot export model=best.pt format=onnx
  track, benchmark                             as in Ultralytics' `yolo`
  studio     a local web page: references, boxes, detections, bank, export   yolo-fewshot studio port=7878
  version    print versions

Every key Ultralytics' `yolo` accepts works here too (see `yolo cfg`)."""

MODES = ("demo", "info", "train", "val", "predict", "export", "track", "benchmark")
# encoder=, refs=, n_way=, k_max=, shots=, seeds=, ... (engine/cfg.py); unsafe_load=True: load a .pt you trust without
# the safe-loading allowlist (yolo_fewshot/checkpoint.py)
# dynamic_refs=True (export): detector.onnx with a prototypes input + encoder.onnx, for the torch-free runtime
PLUGIN_KEYS: dict[str, Any] = {**PLUGIN_DEFAULTS, "unsafe_load": False, "dynamic_refs": False}


class UsageError(Exception):
    """A mistake in the command line; printed as one line."""


def parse_args(args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Split ``MODE key=value ...`` into the mode and a dict of typed overrides (Ultralytics' value parsing)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, merge_equals_args, parse_key_value_pair

    if not args:
        raise UsageError(f"no mode given; choose one of {', '.join(MODES)} (try `yolo-fewshot help`)")
    mode, rest = args[0], merge_equals_args(list(args[1:]))
    if mode not in MODES:
        raise UsageError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode == "demo":
        from .demo import DEFAULTS

        extra = [a for a in rest if "=" not in a or a.split("=", 1)[0] not in DEFAULTS]
        if extra:
            raise UsageError(f"demo takes only {', '.join(f'{k}=' for k in DEFAULTS)}; got '{extra[0]}'")
        return mode, {k: _typed(v) for k, v in (a.split("=", 1) for a in rest)}
    overrides: dict[str, Any] = {}
    for a in rest:
        if "=" not in a:
            raise UsageError(f"argument '{a}' is not key=value (e.g. model=yolov8n-psalm-p2.yaml)")
        try:
            k, v = parse_key_value_pair(a)
        except AssertionError as e:
            raise UsageError(f"{e} (write {a}VALUE)") from None
        if k not in DEFAULT_CFG_DICT and k not in PLUGIN_KEYS:
            from difflib import get_close_matches

            close = get_close_matches(k, [*DEFAULT_CFG_DICT, *PLUGIN_KEYS], n=3, cutoff=0.5)
            raise UsageError(
                f"'{k}' is not a valid argument" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        overrides[k] = v
    return mode, overrides


def run_onnx(mode: str, overrides: dict[str, Any]) -> Any:
    """``predict`` with a dynamic-references ``detector.onnx``: the torch-free runtime, one JSON line per image."""
    import json
    from pathlib import Path

    from .references.build import read_refs_folder
    from .runtime.onnx import FewShotOnnx, predict_files

    if mode != "predict":
        raise UsageError(f"a dynamic-references detector.onnx supports predict only, not {mode}")
    det = Path(overrides["model"])
    refs = overrides.get("refs")
    if refs is None:
        raise UsageError("this model has no references to look for; add refs=<folder of <class>/ photos>")
    rt = FewShotOnnx(det, det.with_name("encoder.onnx"))
    if not Path(str(refs)).is_dir():
        raise UsageError(f"with detector.onnx, refs= must be a folder of <class>/ photos, got {refs}")
    items, _ = read_refs_folder(Path(str(refs)))
    rt.set_references(items)
    save = None
    if overrides.get("save", True):  # saved by default, as the torch path (and Ultralytics' `yolo`) does
        from ultralytics.utils.files import increment_path

        save = Path(overrides.get("project") or "runs/fewshot") / str(overrides.get("name") or "predict")
        # a new folder per run (predict-2, ...), as Ultralytics names them: an earlier run's copies are not overwritten
        save = increment_path(save, exist_ok=bool(overrides.get("exist_ok", False)))
    results = predict_files(
        rt,
        overrides.get("source") or "",
        float(0.25 if overrides.get("conf") is None else overrides["conf"]),  # conf=0 is 0, not the default
        float(0.7 if overrides.get("iou") is None else overrides["iou"]),
        save,
    )
    for f, dets in results:
        print(json.dumps({"image": f, "detections": dets}))
    if save is not None:
        print(f"annotated copies saved to {save}", file=sys.stderr)
    return results


def _typed(v: str) -> Any:
    """``"12"`` -> 12, ``"yes"`` stays a string (Ultralytics' value parsing)."""
    from ultralytics.cfg import smart_value

    return smart_value(v)


def run(mode: str, overrides: dict[str, Any]) -> Any:
    """Execute one parsed command."""
    if mode == "demo":
        from .data.debian import FetchError
        from .demo import run_demo

        try:
            return run_demo(**overrides)
        except FetchError as e:
            raise UsageError(str(e)) from None
    from .runtime.onnx import is_dynamic_export

    if is_dynamic_export(str(overrides.get("model", ""))):
        return run_onnx(mode, overrides)
    from . import FewShotYOLO

    model = FewShotYOLO(
        overrides.pop("model", DEFAULT_MODEL),
        encoder=overrides.pop("encoder", None),
        unsafe_load=bool(overrides.pop("unsafe_load", False)),
    )
    refs = overrides.pop("refs", None)
    dynamic = bool(overrides.pop("dynamic_refs", False))
    if dynamic and mode != "export":
        raise UsageError(f"dynamic_refs= is an export setting (yolo-fewshot export ... dynamic_refs=True), not {mode}")
    needs_refs = mode in ("predict", "track") or (mode == "export" and not dynamic)
    if needs_refs and refs is None and getattr(model.model, "prototypes", 0) is None:
        raise UsageError(
            "this model has no references to look for; add refs=<folder of <class>/ photos or bank.safetensors>"
        )
    if refs is not None:
        bank = model.set_references(str(refs))
        print(
            f"references: {len(bank)} classes {bank.names} (K={[c.k for c in bank.classes.values()]}) "
            f"encoded by {bank.spec.name}"
        )
    if mode == "info":
        return model.info(detailed=bool(overrides.get("verbose", False)), verbose=True)
    if dynamic:
        path = model.export(dynamic_refs=True, **overrides)
        print(f"exported {path} and {Path(path).with_name('encoder.onnx')} (references as an input)")
        return path
    if mode in ("predict", "track"):
        # as Ultralytics' own `yolo` command does (Model.predict's is_cli, which looks for a program named `yolo`):
        # the annotated results are saved unless save=False, and the frames stream through (the results of a long
        # video are not all kept in memory)
        overrides.setdefault("save", True)
        for _ in getattr(model, mode)(stream=True, **overrides):
            pass
        return None
    return getattr(model, mode)(**overrides)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"yolo-fewshot: warning: {message}", file=sys.stderr)


def entrypoint(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("help", "-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] in ("version", "--version"):
        import torch
        import ultralytics

        from . import __version__

        print(f"yolo_fewshot {__version__} (ultralytics {ultralytics.__version__}, torch {torch.__version__})")
        return 0
    if args and args[0] == "studio":  # the reference studio (yolo_fewshot/studio/): its own keys, its one-line errors
        from .studio.command import main as studio_main

        return studio_main(args[1:])
    # OSError: files, disks, the network (a full disk, a URL without network, a hub model that cannot be fetched)
    user_errors = (UsageError, OSError, ValueError, TypeError, SyntaxError, ImportError)
    try:
        with warnings.catch_warnings():  # the plugin's warnings (a tiny reference photo, ...) as one line each
            warnings.showwarning = _one_line_warning
            mode, overrides = parse_args(args)
            run(mode, overrides)
    except Exception as e:
        # Ultralytics wraps input errors (a missing or malformed data YAML) in RuntimeError; other errors are bugs and
        # keep their traceback
        if not isinstance(e, user_errors) and not isinstance(e.__cause__, user_errors):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"yolo-fewshot: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint())
