"""Shared test setup: offline Ultralytics, deterministic torch, small shapes."""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

import yolo_fewshot  # noqa: E402,F401  (registers the layers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def onnx_roundtrip(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path, opset: int = 17):
    """Export ``module`` to ONNX (TorchScript exporter, as Ultralytics uses) and run it in onnxruntime."""
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    names = [f"in{i}" for i in range(len(inputs))]
    torch.onnx.export(module, inputs, str(path), input_names=names, opset_version=opset, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def bank_without(path, key: str, out):
    """A copy of the reference bank file ``path`` at ``out`` with its tensor ``key`` removed (a tampered file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors[key]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(out), metadata=meta)
    return out
