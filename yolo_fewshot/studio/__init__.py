"""The reference studio: a local web page to pick references, draw their boxes and watch detections.

``yolo-fewshot studio [model=...] [host=127.0.0.1] [port=7878]`` (or :func:`yolo_fewshot.studio.app.launch`). It needs
the ``studio`` extra (``pip install "yolo_fewshot[studio]"``: Gradio and its box-drawing component). Importing this
package imports nothing: :mod:`.logic` holds the plain-Python steps, :mod:`.app` the page, :mod:`.command` the command.
"""
