"""Committed benchmark assets (manifests, data YAMLs), shipped as ``yolo_fewshot.assets``; generated images are not."""
