"""Screenshot of the reference studio with real detections (the README's docs/studio.png).

Starts ``yolo-fewshot studio`` in this process on a free localhost port, drives it in headless Chromium (Debian's
``chromium``; Playwright with ``executable_path``, no browser download): uploads skimage's cat as the reference with a
box, a scene (the cat pasted on gravel), detects at ``--conf``, and saves the page as a palette PNG.

    python tools/studio_screenshot.py --model runs/benchmark/fold0/proto/weights/last.pt --out docs/studio.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov8n-lite0-proto.yaml", help="model YAML or checkpoint")
    ap.add_argument("--out", default="docs/studio.png")
    ap.add_argument("--conf", type=float, default=0.005, help="confidence slider value")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright
    from skimage import data

    from yolo_fewshot.studio.app import launch

    tmp = Path(tempfile.mkdtemp(prefix="studio_shot_"))
    cat = data.chelsea()
    cv2.imwrite(str(tmp / "cat.png"), cat[..., ::-1])
    scene = cv2.resize(np.stack([data.gravel()] * 3, -1), (640, 480))
    scene[100:250, 200:425] = cv2.resize(cat, (225, 150), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tmp / "scene.png"), scene[..., ::-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page_app, _ = launch(args.model, "127.0.0.1", port, tmp / "work", threads=args.threads, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp / "profile"),
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
                viewport={"width": 1400, "height": 1000},
            )  # fmt: skip
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#ref-files input[type=file]").set_input_files(str(tmp / "cat.png"))
            canvas = page.locator("#annotator canvas")
            canvas.wait_for()
            time.sleep(0.5)
            c = canvas.bounding_box()
            page.mouse.move(c["x"] + c["width"] * 0.3, c["y"] + c["height"] * 0.08)
            page.mouse.down()
            page.mouse.move(c["x"] + c["width"] * 0.72, c["y"] + c["height"] * 0.95, steps=8)
            page.mouse.up()
            page.locator("#class-name textarea, #class-name input").first.fill("cat")
            page.click("#add")
            page.wait_for_function("document.querySelector('#message').innerText.includes('added')")
            page.locator("#scene-file input[type=file]").set_input_files(str(tmp / "scene.png"))
            page.wait_for_selector("#scene-file >> text=scene.png")
            number = page.locator("#conf input[type=number]")
            number.fill(str(args.conf))
            number.press("Enter")
            page.click("#detect")
            page.wait_for_function("document.querySelector('#message').innerText.includes('detection(s)')")
            time.sleep(1.0)
            print(page.locator("#message").inner_text().strip())
            shot = tmp / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        page_app.close()
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {img.size[0]}x{img.size[1]}, {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
