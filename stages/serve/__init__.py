"""Serving the pipeline's models: one ``Predictor`` shared by the web page, the predict command
and the latency bench.

Modules: ``inference`` (decode -> the training preprocessing -> classifier, Grad-CAM, detector),
``render`` (heatmap and boxes drawn at the original image size), ``provenance`` (git rev, DVC
experiment, key metrics), ``app`` (the Gradio page). Run the page with
``python -m stages.serve --host 127.0.0.1 --port 7860 --max-upload-mb 50``.
Importing this package does not import Gradio.
"""
