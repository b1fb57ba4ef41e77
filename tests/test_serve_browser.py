"""The page in a real browser: headless Debian Chromium driven by Playwright opens the page,
uploads an X-ray, waits for the result and checks the decision text and the rendered overlays;
then a non-image and an over-limit upload, which must give a readable message in the page. The
synthetic-data warning of the detector is a visible heading above the figures.

Chromium comes from Debian (``.ci/system-deps`` installs it in CI); the test skips naming that
script when /usr/bin/chromium is absent. Nothing may leave the loopback interface: every other
request is aborted and reported (Gradio must not phone home or fetch fonts / CDN assets).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from tests.serve_models import free_port, keep_absl_stream, tiny_models, xray_like

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: run .ci/system-deps (installs Debian chromium)",
)
sync_api = pytest.importorskip("playwright.sync_api")
from stages.serve.app import DISCLAIMER, build_app, launch, page_texts, server_temp_dir  # noqa: E402
from stages.serve.inference import Predictor  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    models = tiny_models(tmp_path_factory.getbasetemp() / "serve_models")
    with server_temp_dir():
        predictor = Predictor(
            models["classifier"],
            models["detector"],
            models["evaluation"],
            0.0,
            provenance_root=models["root"],  # the detector's data: synthetic phantoms
        )
        about, warning = page_texts(predictor)
        demo = build_app(predictor, about, [], warning)
        port = free_port()
        keep_absl_stream()
        launch(demo, "127.0.0.1", port, 1.0, block=False)
        try:
            yield f"http://127.0.0.1:{port}/", predictor
        finally:
            demo.close()


def test_upload_shows_decision_and_overlays(page_url, tmp_path):
    url, predictor = page_url
    gray = xray_like(160, 120, seed=3)
    path = tmp_path / "upload.png"
    Image.fromarray(gray).save(path)
    expected = predictor.predict_gray(gray, path.name).classification["decision"]
    outside: list[str] = []

    def only_loopback(route) -> None:
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(url, wait_until="load", timeout=TIMEOUT_MS)
            page.wait_for_selector("#status", timeout=TIMEOUT_MS)
            assert DISCLAIMER.split("**")[1] in page.inner_text("#disclaimer")
            warning = page.inner_text("#synthetic-warning")
            assert "SYNTHETIC DATA: the detector was trained and tested on synthetic" in warning
            assert page.is_visible("#synthetic-warning h2")  # a heading, not small print
            assert "trained on kermany" in page.inner_text("#provenance")
            page.set_input_files("input[type=file]", str(path))
            heading = page.wait_for_selector("#status h2", timeout=TIMEOUT_MS)
            assert heading.inner_text().strip() == expected
            assert "threshold 0.420" in page.inner_text("#status")
            assert "PNEUMONIA" in page.inner_text("#probs")
            for elem_id in ("gradcam", "boxes"):
                img = page.wait_for_selector(f"#{elem_id} img", timeout=TIMEOUT_MS)
                page.wait_for_function("(e) => e.complete && e.naturalWidth > 0", arg=img)
                size = img.evaluate("(e) => [e.naturalWidth, e.naturalHeight]")
                assert size == [120, 160], elem_id  # drawn at the original image size
            notes = tmp_path / "notes.txt"
            notes.write_text("not an image")
            page.click("button[aria-label='Clear']")  # the upload box comes back
            page.set_input_files("input[type=file]", str(notes))
            page.wait_for_selector("#status >> text=Refused", timeout=TIMEOUT_MS)
            assert "notes.txt: not a PNG, JPEG or DICOM image" in page.inner_text("#status")
            big = tmp_path / "big.png"
            big.write_bytes(b"\0" * (2 * 1024 * 1024))  # the page was started with 1 MB
            page.click("button[aria-label='Clear']")
            page.set_input_files("input[type=file]", str(big))
            page.wait_for_selector("text=maximum allowed size", timeout=TIMEOUT_MS)
        finally:
            browser.close()
    assert outside == [], f"the page requested non-loopback URLs: {outside}"
