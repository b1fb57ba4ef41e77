"""The page's API: the app started on a free loopback port, called with gradio_client.

Good images give the decision, probabilities, a Grad-CAM and a boxes image at the original size;
every bad input gives a clear "Refused" message (never a stack trace) and the server keeps
serving; an upload over the size limit (1 MB here, configurable) is refused by the server. The
page names each model's origin and data, and warns prominently about the synthetic detector
(the tiny workspace of tests/serve_models.py: classifier data kermany, detector synthetic).
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
    constant_classifier,
    evaluation_file,
    free_port,
    keep_absl_stream,
    tiny_models,
    xray_like,
)

gradio_client = pytest.importorskip("gradio_client")
from stages.serve.app import (  # noqa: E402
    DISCLAIMER,
    build_app,
    create,
    launch,
    make_handler,
    page_texts,
    server_temp_dir,
)
from stages.serve.inference import Predictor  # noqa: E402

MAX_UPLOAD_MB = 1.0


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp() / "serve_models")


@pytest.fixture(scope="module")
def server(models):
    with server_temp_dir():
        predictor = Predictor(
            models["classifier"],
            models["detector"],
            models["evaluation"],
            0.0,
            provenance_root=models["root"],
        )
        about, warning = page_texts(predictor)
        demo = build_app(predictor, about, [], warning)
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
    assert raw["detection"]["models"][0]["synthetic_data"] is True
    assert "trained on synthetic phantoms, not X-rays" in status  # said beside the boxes
    assert "classifier was trained on synthetic" not in status  # its data are kermany


@pytest.mark.parametrize(
    "kind",
    ["non_image", "corrupt", "truncated", "zero_byte", "dicom_no_pixels", "bomb", "16bit", "rgba"]
    + ["cmyk", "dicom", "one_pixel", "thin"],
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
        word = {"bomb": "too large", "dicom_no_pixels": "no pixel data", "one_pixel": "too small",
                "thin": "too small"}.get(kind)  # fmt: skip
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


def _page(client) -> dict[str, str]:
    """{elem_id or index: markdown} of the page's components."""
    out = {}
    for i, comp in enumerate(client.config["components"]):
        props = comp.get("props", {})
        out[props.get("elem_id") or str(i)] = str(props.get("value", ""))
    return out


def test_page_shows_disclaimer_and_provenance(server, models):
    client, _ = server
    page = _page(client)
    texts = " ".join(page.values())
    assert DISCLAIMER in texts
    about = page["provenance"]
    assert "**Code:** git" in about
    assert f"**Classifier** `{models['classifier']}`: no git commit or DVC experiment" in about
    assert "not in dvc.lock" in about  # a test model, not DVC's
    assert "trained on kermany (6 images); tested on kermany (3 images)" in about
    assert "roc_auc 0.950" in about and f"threshold {THRESHOLD:.3f}" in about
    # the detector's figures are said to be on phantoms, next to the figures themselves
    assert "**detector (test on synthetic phantoms (3 images)):** map_50 0.631" in about


def test_page_warns_prominently_about_synthetic_data(server):
    client, _ = server
    page = _page(client)
    warning = page["synthetic-warning"]
    assert warning.startswith("## ⚠️ **SYNTHETIC DATA: the detector was trained and tested")
    assert "classifier" not in warning.split("**")[1]  # only the detector is synthetic
    order = list(page)
    assert order.index("synthetic-warning") < order.index("provenance")  # above the figures


def test_page_serves_an_ensemble_with_the_whole_decision(tmp_path):
    """Two constant models (0.6, 0.2) -> mean 0.4 -> temperature 2 -> 0.4495 >= 0.35."""
    a = constant_classifier(tmp_path / "a.keras", 0.6)
    b = constant_classifier(tmp_path / "b.keras", 0.2)
    evaluation = evaluation_file(tmp_path / "e.json", 0.35, [a, b], temperature=2.0)
    _, predictor = create([a, b], None, evaluation)
    img = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(img)
    status, probs, *_ = make_handler(predictor)(str(img))
    want = np.sqrt(0.4) / (np.sqrt(0.4) + np.sqrt(0.6))
    assert probs["PNEUMONIA"] == pytest.approx(want, abs=1e-5)
    assert status.startswith("## PNEUMONIA")
    assert "temperature 2.000" in status and "mean of 2 models" in status


def test_page_serves_its_examples_and_nothing_else_of_the_data(tmp_path, monkeypatch):
    """The test-split examples are copies in the server's temp folder: the page loads them,
    while the data folders (data/raw/<task>/manifest.csv names patients) are refused."""
    monkeypatch.chdir(tmp_path)  # a workspace whose data/raw and data/split the page reads
    raw = Path("data/raw/classification")
    (raw / "images").mkdir(parents=True)
    image = raw / "images" / "a.png"
    Image.fromarray(xray_like()).save(image)
    manifest = raw / "manifest.csv"
    manifest.write_text("path,label,patient_id\nimages/a.png,NORMAL,patient-0042\n")
    split = Path("data/split/classification")
    split.mkdir(parents=True)
    (split / "test.csv").write_text(f"path,label,subtype\n{image},NORMAL,\n")
    with server_temp_dir() as temp:
        demo, _ = create(None, None, tmp_path / "none.json", 0.3, temp / "examples")
        shown = sorted((temp / "examples").iterdir())
        port = free_port()
        launch(demo, "127.0.0.1", port, MAX_UPLOAD_MB, block=False, files=shown)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        try:
            files = f"http://127.0.0.1:{port}/gradio_api/file="
            for secret in (manifest, manifest.resolve(), image.resolve(), raw.resolve()):
                assert httpx.get(f"{files}{secret}", timeout=30).status_code == 403, secret
            # what clicking the example loads: the client fetches it through the file route
            upload, truth = client.predict(0, api_name="/load_example")
            assert truth["value"] == "classification test split: NORMAL"
            fetched = Path(upload["value"])  # the client's download of the served copy
            assert fetched.name.endswith("a.png") and fetched.read_bytes() == image.read_bytes()
        finally:
            client.close()
            demo.close()
