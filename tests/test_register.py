"""_register: idempotent, names in Ultralytics' namespace, refuses an unexpected upstream layout or version."""

import inspect

import pytest
from ultralytics.nn import tasks

from yolo_fewshot import _register
from yolo_fewshot._register import (
    ANCHOR,
    HOOK_ATTR,
    UpstreamChanged,
    check_version,
    hooked_parse_model,
    register,
    upstream_parse_model,
)


def test_layers_are_in_ultralytics_namespace():
    for name, cls in _register.layers().items():
        assert tasks.__dict__[name] is cls


def test_register_is_idempotent():
    before = tasks.parse_model
    register()
    register()
    assert tasks.parse_model is before and getattr(before, HOOK_ATTR)


def test_hook_changes_only_the_anchor_branch():
    src = inspect.getsource(upstream_parse_model())
    fn = hooked_parse_model(src, tasks.__dict__)
    assert getattr(fn, HOOK_ATTR) and fn.__globals__ is tasks.__dict__
    assert not getattr(upstream_parse_model(), HOOK_ATTR, False)


def test_refuses_changed_upstream_layout():
    src = inspect.getsource(upstream_parse_model())
    with pytest.raises(UpstreamChanged, match="upstream changed"):
        hooked_parse_model(src.replace(ANCHOR, "        if m in some_other_set:\n"), {})
    with pytest.raises(UpstreamChanged, match="upstream changed"):
        hooked_parse_model(src + "\n" + ANCHOR, {})
    with pytest.raises(UpstreamChanged, match="max_channels"):
        hooked_parse_model(src.replace("max_channels", "maxch"), {})


def test_refuses_shadowing_an_upstream_name(monkeypatch):
    monkeypatch.setitem(tasks.__dict__, "PSALM", object)
    with pytest.raises(UpstreamChanged, match="different 'PSALM'"):
        register()


@pytest.mark.parametrize("version,ok", [("8.4.190", True), ("8.4.231", True), ("8.4.189", False), ("8.5.0", False)])
def test_version_check(version, ok):
    if ok:
        assert check_version(version) == version
    else:
        with pytest.raises(ImportError, match="pip install 'ultralytics>=8.4.190,<8.5'"):
            check_version(version)


def test_stock_ultralytics_models_still_build():
    from ultralytics import YOLO

    m = YOLO("yolov8n-p2.yaml").model
    assert m.stride.tolist() == [4.0, 8.0, 16.0, 32.0]


def test_checkpoint_loading_is_guarded_once_and_refuses_a_bypassing_upstream(monkeypatch):
    import ultralytics.nn as unn

    from yolo_fewshot._register import ORIGINAL_ATTR, hook_checkpoint_loading

    before = tasks.torch_safe_load
    hook_checkpoint_loading()
    assert tasks.torch_safe_load is before is unn.torch_safe_load and getattr(before, HOOK_ATTR)
    assert not getattr(getattr(before, ORIGINAL_ATTR), HOOK_ATTR, False)  # wraps Ultralytics' own, once
    monkeypatch.setattr(tasks, "torch_safe_load", getattr(before, ORIGINAL_ATTR))
    monkeypatch.setattr(tasks, "load_checkpoint", lambda weight: None)  # an upstream that no longer calls it
    with pytest.raises(UpstreamChanged, match="cannot guard checkpoint loading"):
        hook_checkpoint_loading()
