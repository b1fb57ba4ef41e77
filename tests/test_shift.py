"""python -m stages.shift: per-class image statistics of the augment cache, split by split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import uniform_filter

from stages.common.cache import write_meta, write_split
from stages.common.utils import StageError
from stages.tools import shift

S = 24


def _cache(root, splits=("train", "test")):
    """NORMAL films sharp with a black border; PNEUMONIA the same texture smoothed, no border."""
    rng = np.random.default_rng(0)
    for split in splits:
        n = 10
        texture = rng.integers(60, 200, (n, S, S)).astype(np.float32)
        normal = texture[: n // 2].copy()
        normal[:, :2] = 0  # a black band: the 1st percentile is 0
        pneu = np.stack([uniform_filter(t, 3) for t in texture[n // 2 :]])
        images = np.concatenate([normal, pneu]).round().astype(np.uint8)
        index = pd.DataFrame(
            {
                "path": [f"{split}_{i}.png" for i in range(n)],
                "label": ["NORMAL"] * (n // 2) + ["PNEUMONIA"] * (n - n // 2),
                "patient_id": [f"p{i}" for i in range(n)],
            }
        )
        write_split(root, split, images, index, S)
    write_meta(
        root, {"task": "classification", "image_size": S, "classes": ["NORMAL", "PNEUMONIA"]}
    )
    return root


def test_the_table_separates_what_separates_the_classes(tmp_path, capsys):
    cache = _cache(tmp_path / "cache")
    out = tmp_path / "reports" / "shift.md"
    text = shift.main(["--cache", str(cache), "--out", str(out)])
    assert out.read_text() == text == capsys.readouterr().out
    rows = {(r[0], r[1]): (r[2], r[3]) for r in shift.class_stats(cache)}
    assert set(rows) == {(s, c) for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")}
    for split in ("train", "test"):
        (n_norm, normal), (n_pneu, pneu) = rows[split, "NORMAL"], rows[split, "PNEUMONIA"]
        assert n_norm == n_pneu == 5
        assert normal[4] > 2 * pneu[4]  # sharpness: the 3x3 box filter took most of it
        assert normal[2] == 0 and pneu[2] > 50  # the black band shows in the 1st percentile
    assert "| train | NORMAL | 5 |" in text and "| val |" not in text  # absent split skipped


def test_image_stats_match_numpy_on_one_image():
    img = np.add.outer(np.arange(S), 3 * np.arange(S)).astype(np.uint8)[None]
    mean, sd, p1, p99, sharp, aniso = shift.image_stats(img)[0]
    x = img[0].astype(np.float64)
    assert mean == pytest.approx(x.mean()) and sd == pytest.approx(x.std())
    assert (p1, p99) == pytest.approx(tuple(np.percentile(x, [1, 99])))
    assert sharp == pytest.approx(3.0)  # neighbours along a row differ by three grey levels
    assert aniso == pytest.approx(np.log(3.0), rel=1e-5)  # and along a column by one
    assert shift.image_stats(np.full((1, S, S), 7, np.uint8))[0, 5] == 0.0  # flat: no NaN


def test_anisotropy_sees_a_film_squeezed_sideways():
    # Kermany's 224 px copy squeezed wider films more; a squeeze must raise the anisotropy.
    from PIL import Image

    rng = np.random.default_rng(1)
    film = uniform_filter(rng.normal(128, 40, (96, 144)), 5).clip(0, 255).astype(np.uint8)
    square = np.asarray(Image.fromarray(film[:, 24:120]).resize((48, 48), Image.BILINEAR))
    squeezed = np.asarray(Image.fromarray(film).resize((48, 48), Image.BILINEAR))
    a_square, a_squeezed = shift.image_stats(np.stack([square, squeezed]))[:, 5]
    assert abs(a_square) < 0.15 and a_squeezed > a_square + 0.2


def test_a_missing_cache_fails_clearly_and_writes_nothing(tmp_path):
    out = tmp_path / "shift.md"
    with pytest.raises(StageError, match="not found: run dvc repro augment"):
        shift.main(["--cache", str(tmp_path / "nope"), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="has no images"):
        shift.main(["--cache", str(tmp_path / "empty"), "--out", str(out)])
    assert not out.exists()
