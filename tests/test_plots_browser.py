"""`dvc plots show` in a real browser, offline: every declared plot rendered once.

On the session's tiny repro'd pipeline (tests/dvc_helpers.built_repo), `dvc plots show` writes
its page with the repository's template (.dvc/plots/offline.html, ``plots.html_template``);
headless Debian Chromium driven by Playwright opens it with every non-file request aborted and
reported, so a page that fetches Vega from a CDN fails here (and would be blank offline). Checked:
each plot of dvc.yaml has one element, each Vega plot one drawn canvas (vegaEmbed resolved, no
page error) and each image plot one loaded image; titles are unique. A screenshot of the whole
page goes into the test's tmp dir.

Chromium comes from Debian (``.ci/system-deps``); the test skips naming that script when
/usr/bin/chromium is absent.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from tests.dvc_helpers import built_repo, dvc
from tests.plot_defs import declared_plots, stage_plots

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent: run .ci/system-deps (installs Debian chromium)",
    ),
    pytest.mark.slow,  # the session's tiny pipeline (shared with the DVC tests) is built first
]
sync_api = pytest.importorskip("playwright.sync_api")

TIMEOUT_MS = 60_000
# Runs before the page's scripts: wraps vegaEmbed as the inlined bundle defines it, to record each
# plot's title and whether its embedding resolved (the canvas is drawn) or failed.
RECORD_EMBEDS = """
window.__embeds = [];
let realEmbed;
Object.defineProperty(window, 'vegaEmbed', {
  configurable: true,
  set(value) { realEmbed = value; },
  get() {
    if (!realEmbed) return undefined;
    return (el, spec, opts) => {
      const title = spec && spec.title ? (spec.title.text ?? spec.title) : null;
      const entry = {el: String(el), title, state: 'pending'};
      window.__embeds.push(entry);
      const result = realEmbed(el, spec, opts);
      result.then(() => { entry.state = 'ok'; }, (e) => { entry.state = 'error: ' + e; });
      return result;
    };
  },
});
"""
# Pixels of a canvas that are neither transparent nor white: something was drawn.
INKED = """(c) => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250)) n++;
  }
  return n;
}"""


def div_id(plot_id: str) -> str:
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(plot_id)  # the id DVC gives the plot's element


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory) -> tuple[Path, list]:
    built = built_repo(tmp_path_factory)
    out = tmp_path_factory.mktemp("plots_page")
    dvc(built.path, "plots", "show", "-o", str(out))
    dvc_yaml = built.path / "dvc.yaml"
    return out / "index.html", declared_plots(dvc_yaml) + stage_plots(dvc_yaml)


def test_plots_page_renders_every_plot_once_offline(plots_page, tmp_path):
    page_file, plots = plots_page
    html = page_file.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE), "a script is fetched"
    vega = [p for p in plots if not p.is_image]
    images = [p for p in plots if p.is_image]
    assert vega and images
    outside: list[str] = []
    errors: list[str] = []

    def local_only(route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")) or urlparse(url).hostname is None:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.route("**/*", local_only)
            context.add_init_script(RECORD_EMBEDS)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_file.as_uri(), wait_until="load", timeout=TIMEOUT_MS)
            try:
                page.wait_for_function(
                    f"window.__embeds.length === {len(vega)} && "
                    "window.__embeds.every((e) => e.state !== 'pending')",
                    timeout=TIMEOUT_MS,
                )
            except sync_api.TimeoutError:
                embeds = page.evaluate("window.__embeds")
                raise AssertionError(
                    f"{len(embeds)} of {len(vega)} Vega plots embedded; network requests "
                    f"blocked: {outside}; page errors: {errors}"
                ) from None
            embeds = page.evaluate("window.__embeds")
            for plot in plots:
                element = page.locator(f"[id='{div_id(plot.id)}']")
                assert element.count() == 1, plot.id
                if plot.is_image:
                    img = element.locator("img")
                    assert img.count() == 1, plot.id  # one revision: the workspace
                    loaded = img.evaluate("(e) => e.complete && e.naturalWidth > 0")
                    assert loaded, f"{plot.id}: image not loaded"
                    assert element.locator("p").first.inner_text().strip() == plot.id
                else:
                    canvas = element.locator("canvas")
                    assert canvas.count() == 1, plot.id
                    assert canvas.evaluate(INKED) > 500, f"{plot.id}: nothing drawn"
            assert page.locator("canvas").count() == len(vega)  # nothing drawn twice
            assert page.locator("img").count() == len(images)
            page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page requested network URLs: {outside}"
    assert errors == [], f"page errors: {errors}"
    assert [e["state"] for e in embeds] == ["ok"] * len(vega), embeds
    titles = [e["title"] for e in embeds] + [p.id for p in images]
    assert sorted(titles) == sorted([p.title for p in vega] + [p.id for p in images])
    assert len(set(titles)) == len(titles), "two plots with one title"
    assert (tmp_path / "plots.png").stat().st_size > 10_000
