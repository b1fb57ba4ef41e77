"""The page's API: the app started on a free loopback port, called with gradio_client.

Good images give the decision, probabilities, a Grad-CAM and a boxes image at the original size;
every bad input gives a clear "Refused" message (never a stack trace) and the server keeps
serving; an upload over the size limit (1 MB here, configurable) is refused by the server.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from tests.serve_models import (
    THRESHOLD,
    bad_inputs,
    free_port,
    keep_absl_stream,
    tiny_models,
    xray_like,
)

gradio_client = pytest.importorskip("gradio_client")
from stages.serve import provenance  # noqa: E402
from stages.serve.app import DISCLAIMER, build_app, launch, make_handler  # noqa: E402
from stages.serve.inference import Predictor  # noqa: E402

MAX_UPLOAD_MB = 1.0


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp() / "serve_models")


@pytest.fixture(scope="module")
def server(models):
    predictor = Predictor(models["classifier"], models["detector"], models["metrics"], 0.0)
    metrics = {"classifier (test)": models["metrics"]}
    about = provenance.collect([models["classifier"], models["detector"]], metrics).markdown()
    demo = build_app(predictor, about, [])
    port = free_port()
    keep_absl_stream()
    launch(demo, "127.0.0.1", port, MAX_UPLOAD_MB, block=False)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    try:
        yield client, predictor
    finally:
        client.close()
        demo.close()


def _call(client, path: Path):
    return client.predict(gradio_client.handle_file(str(path)), api_name="/predict")


def test_good_image_gives_decision_probabilities_and_pictures(server, tmp_path):
    client, predictor = server
    gray = xray_like(150, 100)
    path = tmp_path / "chest.png"
    Image.fromarray(gray).save(path)
    status, label, cam, boxes, raw = _call(client, path)
    expected = predictor.predict_gray(gray, "chest.png").classification
    assert f"## {expected['decision']}" in status
    assert f"threshold {THRESHOLD:.3f}" in status
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    assert confidences["PNEUMONIA"] == pytest.approx(expected["p_positive"], abs=1e-5)
    for picture in (cam, boxes):
        img = np.asarray(Image.open(picture))
        assert img.shape == (150, 100, 3)
        assert img.std() > 0
    assert raw["classification"]["decision"] == expected["decision"]
    assert raw["detection"]["boxes"]  # score_thresh 0: the untrained detector always answers


@pytest.mark.parametrize(
    "kind",
    ["non_image", "corrupt", "truncated", "zero_byte", "dicom_no_pixels", "bomb", "16bit", "rgba"]
    + ["cmyk", "dicom"],
)
def test_bad_and_odd_inputs(server, tmp_path, kind):
    client, _ = server
    path, reason = bad_inputs(tmp_path)[kind]
    status, label, cam, boxes, raw = _call(client, path)
    assert "Traceback" not in status
    if reason is None:  # accepted and converted to 8-bit grey
        assert status.startswith("## ") and label is not None and cam is not None
    else:
        assert status.startswith("**Refused:**") and path.name in status
        assert not label and (cam, boxes, raw) == (None, None, None)  # outputs cleared
        word = {"bomb": "too large", "dicom_no_pixels": "no pixel data"}.get(kind)
        if word:
            assert word in status
    good = tmp_path / "good.png"  # the server keeps serving
    assert _call(client, good)[0].startswith("## ")


def test_upload_over_the_size_limit_is_refused(server, tmp_path):
    client, _ = server
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).bytes(int(1.5 * MAX_UPLOAD_MB * 1024 * 1024)))
    # gradio_client refuses it before sending (it reads the limit from the app's config) ...
    with pytest.raises(ValueError, match="exceeds the maximum file size") as info:
        _call(client, big)
    assert "Traceback" not in str(info.value)
    # ... and the server refuses it too when a client does not check (413, a plain message).
    with big.open("rb") as fh:
        reply = httpx.post(f"{client.src}gradio_api/upload", files={"files": fh}, timeout=60)
    assert reply.status_code == 413 and "maximum allowed size" in reply.text
    small = tmp_path / "small.png"
    Image.fromarray(xray_like()).save(small)
    assert _call(client, small)[0].startswith("## ")  # still serving


def test_handler_without_models_names_the_dvc_commands(tmp_path):
    handler = make_handler(Predictor(tmp_path / "c.keras", tmp_path / "d.pt"))
    img = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(img)
    status, *rest = handler(str(img))
    assert "dvc pull" in status and "dvc repro train-detector" in status
    assert rest == [None, None, None, None]


def test_page_shows_disclaimer_and_provenance(server, models):
    client, _ = server
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in client.config["components"])
    assert DISCLAIMER in texts
    assert "**Code:** git" in texts
    assert f"**{models['classifier']}:** not in dvc.lock" in texts  # a test model, not DVC's
    assert "roc_auc 0.950" in texts and f"threshold {THRESHOLD:.3f}" in texts
