"""The reference studio's web page: Gradio blocks wired to a :class:`~yolo_fewshot.studio.logic.Studio`.

Left, the references: upload photos (or a video, then pick a frame), drag a box on each (none = the whole photo), name
the class, tick "negative" for a look-alike, and press Add reference; the gallery shows what was added. Right, the
scene: an image, a short video, or a file or folder path on this machine; Detect draws the detections with their
scores and the reference thumbnails, lists them, and the confidence slider filters them without running the model
again. Below, the bank (save, load) and the export (baked ONNX, or the dynamic pair) as downloads.

Every handler returns the page's one-line message last; a mistake shows there (never a stack trace, which goes to the
server's log only for bugs) and leaves every other output, and so everything the user made, as it was.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .logic import DEFAULT_MODEL, EXPORT_KINDS, Studio, StudioError, annotation_box, one_line

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network from the page
import gradio as gr  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402

LOGGER = logging.getLogger("yolo_fewshot.studio")
HEADERS = ["source", "frame", "class", "score", "x1", "y1", "x2", "y2"]
CSS = """
#message {min-height: 1.8em; padding: 4px 10px; border-radius: 6px; background: var(--background-fill-secondary)}
#message p {margin: 0; font-weight: 600}
"""


def _ok(text: str) -> str:
    return f"✓ {text}"


def _guard(n_outputs: int) -> Callable:
    """Wrap a handler whose last output is the message: any exception becomes that one line (a bug's traceback goes
    to the log) and the other outputs stay as they are."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except StudioError as e:
                msg = f"⚠ {one_line(e)}"
            except Exception as e:  # a bug, or a failure of a library: one line on the page, the traceback in the log
                LOGGER.exception("studio: %s failed", fn.__name__)
                msg = f"⚠ {type(e).__name__}: {one_line(e)}"
            return (*[gr.skip()] * (n_outputs - 1), msg) if n_outputs > 1 else msg

        return run

    return wrap


def _table(rows: list[list]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=HEADERS)


def build(studio: Studio) -> gr.Blocks:
    """The page for ``studio`` (not launched)."""

    def current() -> tuple[Any, Any, str]:
        """Annotator value, frame slider, and the line naming what waits for a box."""
        cur = studio.current
        if cur is None:
            return None, gr.update(visible=False, value=0), "Upload reference photos (or a video) to start."
        img, source, frame, frames = cur
        slider = gr.update(visible=frames > 1, maximum=max(1, frames - 1), value=frame)
        waiting = len(studio.pending) - 1
        return (
            {"image": img, "boxes": []},
            slider,
            f"Box the object in **{source}**" + (f" ({waiting} more waiting)" if waiting else ""),
        )

    def downloadable(path: Path) -> str:
        """``path`` itself when the page may serve it (under the work folder), else a copy there."""
        work = studio.workdir.resolve()
        path = Path(path).resolve()
        if work in path.parents:
            return str(path)
        (work / "downloads").mkdir(parents=True, exist_ok=True)
        return str(shutil.copy2(path, work / "downloads" / path.name))

    with gr.Blocks(title="yolo-fewshot studio") as page:
        gr.Markdown(
            f"## yolo-fewshot studio\nModel `{studio.model_name}` · encoder `{studio.model.encoder_name}` · "
            "find an object from a few reference photos"
        )
        message = gr.Markdown("Upload reference photos (left), then a scene (right).", elem_id="message")
        selected = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("### 1 · References")
                ref_files = gr.File(
                    label="Reference photos or a video", file_count="multiple", elem_id="ref-files", height=110
                )
                waiting = gr.Markdown("Upload reference photos (or a video) to start.", elem_id="waiting")
                frame = gr.Slider(0, 1, value=0, step=1, label="Video frame", visible=False, elem_id="frame")
                annotator = image_annotator(
                    label="Drag a box around the object (no box = the whole photo)",
                    single_box=True,
                    sources=[],
                    image_type="numpy",
                    label_list=["object"],
                    label_colors=[(255, 80, 0)],
                    use_default_label=True,
                    disable_edit_boxes=True,
                    boxes_alpha=0.15,
                    show_download_button=False,
                    show_clear_button=False,
                    height=340,
                    elem_id="annotator",
                )
                with gr.Row():
                    class_name = gr.Textbox(label="Class name", placeholder="e.g. backpack", elem_id="class-name")
                    negative = gr.Checkbox(label="Negative: a look-alike that is NOT this class", elem_id="negative")
                with gr.Row():
                    add = gr.Button("Add reference", variant="primary", elem_id="add")
                    skip = gr.Button("Skip this photo", elem_id="skip")
                refs = gr.Gallery(
                    label="References (click one to select it)",
                    columns=4,
                    fit_columns=False,
                    height=220,
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="refs",
                )
                with gr.Row():
                    remove = gr.Button("Remove selected", size="sm", elem_id="remove")
                    clear = gr.Button("Remove all", size="sm", elem_id="clear")
            with gr.Column(scale=3):
                gr.Markdown("### 2 · Scene")
                with gr.Row():
                    scene_file = gr.File(label="Scene image or short video", elem_id="scene-file", height=110)
                    scene_path = gr.Textbox(
                        label="…or a file or folder path on this machine", elem_id="scene-path", lines=1
                    )
                with gr.Row():
                    conf = gr.Slider(0.001, 1.0, value=0.25, step=0.001, label="Confidence", elem_id="conf", scale=3)
                    detect = gr.Button("Detect", variant="primary", elem_id="detect", scale=1)
                result = gr.Gallery(
                    label="Detections", columns=3, height=460, preview=True, object_fit="contain", elem_id="result"
                )
                video = gr.Video(label="Annotated video", visible=False, elem_id="video")
                table = gr.Dataframe(value=_table([]), label="Detections", interactive=False, elem_id="detections")
        gr.Markdown("### 3 · Bank and export")
        with gr.Row():
            with gr.Column():
                bank_path = gr.Textbox(
                    value=str(studio.workdir / "references.safetensors"),
                    label="Bank file on this machine (.safetensors)",
                    elem_id="bank-path",
                )
                with gr.Row():
                    save = gr.Button("Save bank", elem_id="save")
                    load = gr.Button("Load bank from this path", elem_id="load")
                bank_upload = gr.File(
                    label="…or upload a bank to load", file_types=[".safetensors"], elem_id="bank-upload", height=90
                )
            with gr.Column():
                kind = gr.Radio(list(EXPORT_KINDS), value=EXPORT_KINDS[0], label="Export", elem_id="export-kind")
                imgsz = gr.Number(value=640, precision=0, label="Image size", elem_id="imgsz")
                export = gr.Button("Export model with these references", elem_id="export")
            download = gr.File(label="Download", interactive=False, elem_id="download")

        # -- handlers (message last) ---------------------------------------------------------------------------------
        @_guard(5)
        def on_upload(files: list[str] | None):
            try:  # the file box is emptied either way: its files are queued (or refused), not kept for the next upload
                msg = _ok(studio.enqueue([str(f) for f in files or []]))
            except StudioError as e:
                msg = f"⚠ {one_line(e)}"
            value, slider, line = current()
            return value, slider, line, None, msg

        @_guard(3)
        def on_frame(index: float):
            studio.select_frame(int(index))
            value, _, line = current()
            return value, line, gr.skip()

        @_guard(5)
        def on_add(value: Any, name: str, is_negative: bool):
            ref = studio.add_current(name, annotation_box(value), is_negative)
            box = "the whole photo" if ref.box is None else "box " + ", ".join(f"{v:.0f}" for v in ref.box)
            nxt, slider, line = current()
            return studio.gallery(), nxt, slider, line, _ok(f"added {ref.caption} ({box}); {studio.summary()}")

        @_guard(4)
        def on_skip():
            msg = studio.skip()
            value, slider, line = current()
            return value, slider, line, _ok(msg)

        def on_select(evt: gr.SelectData) -> int:
            return evt.index

        @_guard(3)
        def on_remove(index: int | None):
            what = studio.remove(index)
            return studio.gallery(), None, _ok(f"removed {what}; {studio.summary()}")

        @_guard(2)
        def on_clear():
            studio.clear()
            return [], _ok("removed every reference")

        @_guard(4)
        def on_detect(file: str | None, path: str, threshold: float):
            source = file or (path or "").strip()
            view = studio.detect(source, threshold)
            n = len(view.rows)
            classes = ", ".join(studio.class_names)
            video_out = gr.update(visible=view.video is not None, value=str(view.video) if view.video else None)
            return (
                view.gallery,
                video_out,
                _table(view.rows),
                _ok(
                    f"{n} detection(s) of {classes} at confidence ≥ {threshold:g}"
                    + ("" if n else " (lower the confidence slider to see weaker ones)")
                ),
            )

        @_guard(4)
        def on_conf(threshold: float):
            if not studio.frames:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            view = studio.view(threshold)
            video_out = gr.update(value=str(view.video)) if view.video else gr.skip()
            return (
                view.gallery,
                video_out,
                _table(view.rows),
                _ok(f"{len(view.rows)} detection(s) at confidence ≥ {threshold:g}"),
            )

        @_guard(2)
        def on_save(path: str):
            saved = studio.save_bank(path)
            return downloadable(saved), _ok(f"saved {studio.summary()} to {saved}")

        @_guard(2)
        def on_load(path: str | None):
            bank = studio.load_bank(path or "")
            return studio.gallery(), _ok(f"loaded {Path(str(path)).name}: {studio.summary()} ({bank.spec.name})")

        @_guard(2)
        def on_export(export_kind: str, size: float | None):
            f = studio.export(export_kind, int(size or 640))
            return downloadable(f), _ok(f"exported {Path(f).name} ({export_kind}, {studio.summary()})")

        ref_files.upload(on_upload, ref_files, [annotator, frame, waiting, ref_files, message])
        frame.input(on_frame, frame, [annotator, waiting, message], trigger_mode="always_last", show_progress="hidden")
        add.click(on_add, [annotator, class_name, negative], [refs, annotator, frame, waiting, message])
        skip.click(on_skip, None, [annotator, frame, waiting, message])
        refs.select(on_select, None, selected)
        remove.click(on_remove, selected, [refs, selected, message])
        clear.click(on_clear, None, [refs, message])
        detect.click(on_detect, [scene_file, scene_path, conf], [result, video, table, message])
        conf.input(on_conf, conf, [result, video, table, message], trigger_mode="always_last", show_progress="hidden")
        save.click(on_save, bank_path, [download, message])
        load.click(on_load, bank_path, [refs, message])
        bank_upload.upload(on_load, bank_upload, [refs, message])
        export.click(on_export, [kind, imgsz], [download, message])
    return page


def launch(
    model: str | Path = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 7878,
    workdir: str | Path = "runs/studio",
    encoder: str | None = None,
    threads: int | None = None,
    block: bool = True,
) -> tuple[gr.Blocks, Studio]:
    """Build the model and serve the page on ``http://host:port`` (bound to ``host`` only).

    Args:
        model: Model YAML or checkpoint.
        host: Interface to bind (127.0.0.1: this machine only).
        port: TCP port.
        workdir: Where saved banks, exports and annotated videos go.
        encoder: Support encoder (default: the model's).
        threads: torch threads (None: torch's default).
        block: Serve until interrupted; False returns once the server runs (tests, notebooks).

    Returns:
        The page (``page.close()`` stops it) and its :class:`Studio`.
    """
    studio = Studio(model, workdir, encoder, threads)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    print(f"yolo-fewshot studio: http://{host}:{port}  (model {studio.model_name}; Ctrl+C stops it)", flush=True)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: the page fetches nothing from the internet
    page.launch(
        server_name=host,
        server_port=int(port),
        prevent_thread_lock=not block,
        quiet=True,
        show_error=False,
        allowed_paths=[str(Path(workdir).resolve())],
        theme=theme,
        css=CSS,
        ssr_mode=False,
        inbrowser=False,
    )
    return page, studio
