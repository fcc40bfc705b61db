"""yolo_fewshot: reference-image (few-shot) detection for Ultralytics YOLOv8.

Importing the package registers its layers with Ultralytics (see ``_register``). It sets ``YOLO_OFFLINE`` and
``YOLO_AUTOINSTALL=False`` unless you set them yourself, so that the import makes no network access (Ultralytics
probes connectivity when it is first imported) and never pip-installs anything. Without torch/Ultralytics installed
only the torch-free ONNX runtime (``yolo_fewshot.runtime.onnx``) is usable.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
    import ultralytics  # noqa: F401
except ImportError as e:  # deployment without torch: the ONNX runtime still works
    _MISSING = str(e)
else:
    _MISSING = None
    from ._register import register

    register()

    from .model import FewShotYOLO
    from .nn.detector import FewShotDetectionModel

__all__ = ["FewShotDetectionModel", "FewShotYOLO", "__version__"]


def __getattr__(name: str):
    if name in ("FewShotYOLO", "FewShotDetectionModel") and _MISSING:
        raise ImportError(
            f"yolo_fewshot.{name} needs torch and ultralytics ({_MISSING}); install them, or use the "
            "torch-free yolo_fewshot.runtime.onnx.FewShotOnnx on an exported model"
        )
    raise AttributeError(f"module 'yolo_fewshot' has no attribute '{name}'")
