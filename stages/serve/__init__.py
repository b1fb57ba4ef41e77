"""Serving the pipeline's models: one ``Predictor`` shared by the web page, the predict command
and the latency bench.

Modules: ``inference`` (decode -> the training preprocessing -> the evaluation's decision with
the classifier ensemble, Grad-CAM, detector), ``render`` (heatmap and boxes drawn at the original
image size), ``provenance`` (git rev, DVC experiment or commit of each model, the data it was
trained and tested on, key metrics), ``predict`` (the command), ``app`` (the Gradio page). Run the
page with ``python -m stages.serve --host 127.0.0.1 --port 7860 --max-upload-mb 50``.
Importing this package, or any of its modules, does not import Gradio, TensorFlow or torch: they
load with the first model or page.
"""
