"""The installed package: YAMLs resolve by bare name outside the source tree; import makes no network access."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed_outside_source(tmp_path) -> bool:
    r = subprocess.run(
        [sys.executable, "-c", "import yolo_fewshot, sys; print(yolo_fewshot.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    return r.returncode == 0 and not r.stdout.strip().startswith(str(REPO))


def test_installed_package_resolves_yaml_by_bare_name(tmp_path):
    if not _installed_outside_source(tmp_path):
        pytest.skip("yolo_fewshot is not installed non-editable (run the README's test command)")
    code = (
        "from yolo_fewshot import FewShotYOLO; m = FewShotYOLO('yolov8n-psalm-p2.yaml'); print(m.model.stride.tolist())"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.stdout.strip().splitlines()[-1] == "[4.0, 8.0, 16.0, 32.0]"


def test_import_makes_no_network_access(tmp_path):
    code = textwrap.dedent("""
        import socket
        def refuse(*a, **k):
            raise SystemExit(f"network access at import: {a!r}")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import yolo_fewshot
        from yolo_fewshot import FewShotYOLO
        FewShotYOLO("yolov8n-psalm.yaml").info()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_setup_cfg_lists_every_subpackage():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "yolo_fewshot").rglob("__init__.py")}
    assert found | {"yolo_fewshot.cfg", "yolo_fewshot.assets"} == listed  # the two mapped from cfg/ and data/


def test_installed_package_ships_the_benchmark_manifests(tmp_path):
    if not _installed_outside_source(tmp_path):
        pytest.skip("yolo_fewshot is not installed non-editable (run the README's test command)")
    code = "from yolo_fewshot.data import benchmark as b; print(len(b.load_stamps()), b.manifest_dir())"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    n, where = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(n) == len((REPO / "data/manifests/tuxpaint-stamps.tsv").read_text().splitlines()) - 4  # minus header
    assert not where.startswith(str(REPO)) and where.endswith("assets/manifests")
