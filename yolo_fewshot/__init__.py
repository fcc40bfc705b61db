"""yolo_fewshot: reference-image (few-shot) detection for Ultralytics YOLOv8.

Importing the package registers its layers with Ultralytics (see ``_register``). It sets ``YOLO_OFFLINE`` and
``YOLO_AUTOINSTALL=False`` unless you set them yourself, so that the import makes no network access (Ultralytics
probes connectivity when it is first imported) and never pip-installs anything.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

from ._register import register  # noqa: E402

register()

from .model import FewShotYOLO  # noqa: E402
from .nn.detector import FewShotDetectionModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FewShotDetectionModel", "FewShotYOLO", "__version__"]
