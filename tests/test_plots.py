"""The plots of `dvc plots show`: each drawn once, the FROC template, and the offline page.

- dvc.yaml declares each plot once: no file drawn by two plots, no figure both as data (Vega) and
  as an image, no two plots with one title; image plots are pictures only.
- .dvc/plots/froc.json (the FROC's template): DVC fills it, the x axis is log-scaled, and its
  operating points are the default ``evaluate.detection.fps_per_image``.
- .dvc/plots/offline.html (``plots.html_template`` in .dvc/config) is what
  ``python -m stages.tools.plots_template`` builds from the pinned npm packages (that part skips
  when .dvc/plots/node_modules is absent), has DVC's ``{plot_divs}`` and no network script.
The page in a browser: tests/test_plots_browser.py. Report images vs declarations: the
evaluation tests (tests/plot_defs.py).
"""

from __future__ import annotations

import configparser
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from stages.detector.config import EvalDetectionConfig
from stages.tools import plots_template
from tests.conftest import REPO
from tests.plot_defs import declared_plots, image_names

PLOTS_DIR = REPO / plots_template.PLOTS_DIR
FROC = PLOTS_DIR / "froc.json"
PAGE = PLOTS_DIR / plots_template.PAGE_NAME


def _stem(path: str) -> tuple[str, str]:
    """(report folder, figure name): reports/x/plots/roc.csv and reports/x/roc.png -> same."""
    p = Path(path)
    folder = p.parent.parent if p.parent.name == "plots" else p.parent
    return folder.as_posix(), p.stem


def test_each_plot_is_declared_once():
    plots = declared_plots()
    files = Counter(f for p in plots for f in p.files)
    assert not [f for f, n in files.items() if n > 1], "a file drawn by two plots"
    titles = Counter(p.title for p in plots)
    assert not [t for t, n in titles.items() if n > 1], "two plots with one title"
    as_image = {_stem(p.id) for p in plots if p.is_image}
    as_data = {_stem(f) for p in plots if not p.is_image for f in p.files}
    assert not as_image & as_data, f"drawn both as data and as an image: {as_image & as_data}"
    # The curves are Vega plots of their data; pictures only among the images.
    pictures = {Path(p.id).stem for p in plots if p.is_image}
    curve_names = {Path(f).stem for p in plots if not p.is_image for f in p.files}
    assert not pictures & (curve_names | {"roc", "pr", "confusion", "froc", "ap_per_class"})
    curves = {f for p in plots if not p.is_image for f in p.files}
    for name in ("roc", "pr", "confusion"):
        assert f"reports/classifier/plots/{name}.csv" in curves
    for name in ("froc", "ap_per_class"):
        assert f"reports/detector/plots/{name}.csv" in curves


def test_image_names_in_markdown():
    text = "Figures: samples.png and `gradcam.png`; ![x](cases_best.png) (plots/roc.csv)."
    assert image_names(text) == {"samples.png", "gradcam.png", "cases_best.png"}


# ----------------------------------------------------------------------------- FROC template


def _froc_plot():
    (froc,) = [p for p in declared_plots() if "reports/detector/plots/froc.csv" in p.files]
    return froc


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_froc_template_log_axis_and_operating_points():
    assert _froc_plot().template == "froc"  # dvc.yaml: found as .dvc/plots/froc.json
    spec = json.loads(FROC.read_text())
    (rates,) = [p["value"] for p in spec["params"] if p["name"] == "rates"]
    assert tuple(rates) == EvalDetectionConfig().fps_per_image  # the ChestX-Det10 points
    x_defs = [n["x"] for n in _walk(spec) if isinstance(n.get("x"), dict) and "field" in n["x"]]
    assert x_defs and all(x["scale"]["type"] == "log" for x in x_defs)
    marks = {n["mark"]["type"] for n in _walk(spec) if isinstance(n.get("mark"), dict)}
    assert {"line", "rule", "point"} <= marks  # the curve, the operating points and their values


def test_dvc_fills_the_froc_template(tmp_path):
    """dvc-render's own filling of the template with this repository's FROC data: every anchor
    replaced, the data inline, the operating points' transform intact."""
    from dvc_render import VegaRenderer

    froc = _froc_plot()
    rows = [
        {"fps_per_image": x, "sensitivity": y, "rev": "workspace"}
        for x, y in ((0, 0.3), (0.025, 0.4), (0.075, 0.5), (0.15, 0.6), (8, 0.9))
    ]
    renderer = VegaRenderer(
        rows, froc.id, template="froc", template_dir=str(PLOTS_DIR), x="fps_per_image",
        y="sensitivity", title=froc.title,
    )  # fmt: skip
    filled = renderer.get_filled_template()
    text = json.dumps(filled)
    assert "<DVC_METRIC" not in text
    assert filled["data"]["values"] == rows and filled["title"]["text"] == froc.title
    assert "datum['fps_per_image'] <= datum.rate" in text


# ----------------------------------------------------------------------------- offline page


def test_offline_page_is_configured_and_has_no_network_script():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    assert config.get("plots", "html_template") == f"plots/{plots_template.PAGE_NAME}"
    page = PAGE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page
    assert "{scripts}" not in page  # where DVC would insert its CDN <script src=...> tags
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.IGNORECASE)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.IGNORECASE)
    versions = plots_template.pinned_versions(PLOTS_DIR)
    stamp = ", ".join(f"{n} {v}" for n, v in versions.items())
    assert stamp in page  # the committed page names the pinned versions
    for name, version in versions.items():
        assert f"/*! {name} {version} " in page


def test_offline_page_is_what_the_generator_builds():
    if not (PLOTS_DIR / "node_modules").is_dir():
        pytest.skip(
            f"{PLOTS_DIR}/node_modules is absent: `npm ci` there (or `make plots-page`) "
            "to compare the committed page with the pinned packages"
        )
    assert PAGE.read_text(encoding="utf-8") == plots_template.build_page(PLOTS_DIR), (
        "the committed page differs from the pinned versions: python -m stages.tools.plots_template"
    )


def test_generator_refuses_a_version_range_and_a_stale_install(tmp_path):
    from stages.common.utils import StageError

    (tmp_path / "package.json").write_text(json.dumps({"dependencies": {"vega": "^5.0.0"}}))
    (tmp_path / "package-lock.json").write_text(json.dumps({"packages": {}}))
    with pytest.raises(StageError, match="exact version"):
        plots_template.pinned_versions(tmp_path)
    pins = {"vega": "5.0.0", "vega-lite": "5.0.0", "vega-embed": "6.0.0"}
    (tmp_path / "package.json").write_text(json.dumps({"dependencies": pins}))
    lock = {f"node_modules/{n}": {"version": v} for n, v in pins.items()}
    (tmp_path / "package-lock.json").write_text(json.dumps({"packages": lock}))
    assert plots_template.pinned_versions(tmp_path) == pins
    (tmp_path / "node_modules/vega").mkdir(parents=True)
    (tmp_path / "node_modules/vega/package.json").write_text(json.dumps({"version": "5.1.0"}))
    with pytest.raises(StageError, match="npm ci"):
        plots_template.build_page(tmp_path)


def test_inlined_script_cannot_end_its_element_early(tmp_path):
    pins = {"vega": "5.0.0", "vega-lite": "5.0.0", "vega-embed": "6.0.0"}
    (tmp_path / "package.json").write_text(json.dumps({"dependencies": pins}))
    lock = {f"node_modules/{n}": {"version": v} for n, v in pins.items()}
    (tmp_path / "package-lock.json").write_text(json.dumps({"packages": lock}))
    for (name, rel), version in zip(plots_template.BUNDLES, pins.values(), strict=True):
        pkg = tmp_path / "node_modules" / name
        (pkg / rel).parent.mkdir(parents=True)
        (pkg / "package.json").write_text(json.dumps({"version": version, "license": "BSD"}))
        (pkg / rel).write_text(f'var s = "</script>{name}";\n//# sourceMappingURL={name}.map\n')
    page = plots_template.build_page(tmp_path)
    assert page.count("</script>") == 3 and "sourceMappingURL" not in page
    (tmp_path / "node_modules/vega/build/vega.min.js").write_text('var t = "{plot_divs}";')
    from stages.common.utils import StageError

    with pytest.raises(StageError, match="plot_divs"):
        plots_template.build_page(tmp_path)
