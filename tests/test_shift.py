"""python -m stages.shift: per-class image statistics of the augment cache, split by split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
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
    png = tmp_path / "reports" / "shift.png"
    text = shift.main(["--cache", str(cache), "--out", str(out), "--segmenter", "none",
                       "--plot", str(png)])  # fmt: skip
    assert out.read_text() == text == capsys.readouterr().out
    rows = {(r[0], r[1]): (r[2], r[3]) for r in shift.class_means(shift.split_stats(cache))}
    assert set(rows) == {(s, c) for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")}
    for split in ("train", "test"):
        (n_norm, normal), (n_pneu, pneu) = rows[split, "NORMAL"], rows[split, "PNEUMONIA"]
        assert n_norm == n_pneu == 5
        assert normal[4] > 2 * pneu[4]  # sharpness: the 3x3 box filter took most of it
        assert normal[2] == 0 and pneu[2] > 50  # the black band shows in the 1st percentile
    assert "| train | NORMAL | 5 |" in text and "| val |" not in text  # absent split skipped
    assert "lung height" not in text  # no segmenter, no framing columns
    seps = dict(shift.separation(shift.split_stats(cache)))
    assert set(seps) == {"train", "test"}
    for aucs in seps.values():  # PNEUMONIA is the blurrier class in both splits: AUC 0
        assert aucs[4] == 0.0 and aucs[2] == 1.0  # and the one without the black band
    assert "| train | " + " | ".join(f"{v:.2f}" for v in seps["train"]) + " |" in text
    with Image.open(png) as im:  # one row of panels per statistic, one column per split
        assert im.format == "PNG" and im.height > im.width  # 6 rows of 2 panels


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
    rng = np.random.default_rng(1)
    film = uniform_filter(rng.normal(128, 40, (96, 144)), 5).clip(0, 255).astype(np.uint8)
    square = np.asarray(Image.fromarray(film[:, 24:120]).resize((48, 48), Image.BILINEAR))
    squeezed = np.asarray(Image.fromarray(film).resize((48, 48), Image.BILINEAR))
    a_square, a_squeezed = shift.image_stats(np.stack([square, squeezed]))[:, 5]
    assert abs(a_square) < 0.15 and a_squeezed > a_square + 0.2


def test_a_missing_cache_fails_clearly_and_writes_nothing(tmp_path):
    out = tmp_path / "shift.md"
    with pytest.raises(StageError, match="not found: run dvc repro augment"):
        shift.main(["--cache", str(tmp_path / "nope"), "--out", str(out),
                    "--plot", str(tmp_path / "shift.png")])  # fmt: skip
    with pytest.raises(StageError, match="missing.pt not found: give a segmenter file"):
        shift.main(["--cache", str(_cache(tmp_path / "c")), "--out", str(out),
                    "--segmenter", str(tmp_path / "missing.pt")])  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="has no images"):
        shift.main(["--cache", str(tmp_path / "empty"), "--out", str(out), "--segmenter", "none"])
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_separation_needs_two_classes():
    labels = np.array(["A", "B", "C", "A"])
    assert shift.separation([("train", labels, np.zeros((4, 6)))]) == []
    # a split with one class, or a column without values, has no AUC rather than a made-up one
    (_, one), (_, two) = shift.separation(
        [("val", np.array(["A", "A"]), np.ones((2, 2))),
         ("test", np.array(["A", "B"]), np.array([[1.0, np.nan], [2.0, np.nan]]))]
    )  # fmt: skip
    assert np.isnan(one).all() and two[0] == 1.0 and np.isnan(two[1])


# ------------------------------------------------- framing, measured by a real (tiny) U-Net
def _framed(lung_rows: int, body_rows: int, seed: int) -> np.ndarray:
    """An S x S film whose lungs span ``lung_rows`` of a film ``lung_rows + body_rows`` tall
    (the neck and belly bright body), squeezed to the square as Kermany's copy does."""
    from tests.segmenter_helpers import film, lungs

    m = lungs(lung_rows, S)
    pad = np.zeros((body_rows // 2, S), bool)
    tall = film(np.vstack([pad, m, pad]), seed=seed)
    return np.asarray(Image.fromarray(tall).resize((S, S), Image.BILINEAR))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    import dataclasses
    from contextlib import chdir

    import stages  # noqa: F401  (torch before anything that may load TensorFlow)
    from stages.segmenter.predict import LungSegmenter
    from stages.segmenter.train import train
    from tests.test_segmenter_train import TINY, make_cache

    root = tmp_path_factory.mktemp("seg")
    with chdir(root):  # dvclive writes relative to the working directory
        cfg = dataclasses.replace(TINY, epochs=20)
        train(cfg, make_cache(root / "cache", {"train": 16, "val": 4}), root / "seg.pt",
              root / "live", root / "ckpt", root / "m.json")  # fmt: skip
    return LungSegmenter(root / "seg.pt")


def test_framing_columns_see_tighter_framed_pneumonia_films(tmp_path, segmenter):
    # train: NORMAL films show neck and belly (the chest half the film's height), PNEUMONIA
    # films are framed to the chest; test: both framed alike, as on Kermany's official test
    cache = tmp_path / "cache"
    for split, normal_body in (("train", 24), ("test", 0)):
        images = [_framed(24, normal_body, i) for i in range(6)]
        images += [_framed(24, 0, 10 + i) for i in range(6)]
        labels = ["NORMAL"] * 6 + ["PNEUMONIA"] * 6
        index = pd.DataFrame({"path": [f"{split}{i}.png" for i in range(12)], "label": labels,
                              "patient_id": [f"p{i}" for i in range(12)]})  # fmt: skip
        write_split(cache, split, np.stack(images), index, S)
    write_meta(cache, {"task": "classification", "image_size": S,
                       "classes": ["NORMAL", "PNEUMONIA"]})  # fmt: skip
    per_split = shift.split_stats(cache, segmenter)
    _, _, train_stats = per_split[0]
    assert train_stats.shape == (12, 9) and np.isfinite(train_stats).all()
    rows = {(r[0], r[1]): r[3] for r in shift.class_means(per_split)}
    height = {k: v[6] for k, v in rows.items()}
    assert height["train", "PNEUMONIA"] > height["train", "NORMAL"] + 0.1
    assert abs(height["test", "PNEUMONIA"] - height["test", "NORMAL"]) < 0.1
    seps = dict(shift.separation(per_split))
    assert seps["train"][6] > 0.95  # lung height alone tells the classes apart in train
    assert abs(seps["test"][6] - 0.5) < 0.25  # and not in test
    text = shift.to_markdown(shift.class_means(per_split), cache, shift.separation(per_split))
    assert "| lung height | lung width | lung area |" in text
    shift.plot(per_split, shift.separation(per_split), tmp_path / "nine.png")
    six = [(s, labels, stats[:, :6]) for s, labels, stats in per_split]
    shift.plot(six, shift.separation(six), tmp_path / "six.png")
    with Image.open(tmp_path / "nine.png") as nine, Image.open(tmp_path / "six.png") as six:
        assert nine.width == six.width and 1.3 < nine.height / six.height < 1.7  # 9 rows vs 6


def test_films_without_lungs_are_left_out_of_the_framing():
    from stages.segmenter.predict import Lungs

    class Finder:  # the segmenter's interface: lungs where the film is dark, none in a flat one
        def segment(self, films, margin=0.0):
            out = []
            for f in films:
                mask = f < 100
                rows, cols = np.nonzero(mask)
                box = (
                    (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
                    if mask.any()
                    else (0, 0, *f.shape[::-1])
                )
                out.append(Lungs(mask=mask, box=box, found=bool(mask.any())))
            return out

    films = np.full((3, S, S), 170, np.uint8)
    films[0, 6:18, 4:20] = 20
    films[1, 0:12, 0:6] = 20
    stats = shift.lung_stats(films, Finder())
    assert stats[0] == pytest.approx([12 / S, 16 / S, 12 * 16 / S**2])
    assert stats[1] == pytest.approx([12 / S, 6 / S, 72 / S**2]) and np.isnan(stats[2]).all()
    labels = np.array(["A", "A", "A"])
    ((_, _, _, means),) = shift.class_means([("test", labels, stats)])
    assert means == pytest.approx([12 / S, 11 / S, (192 + 72) / 2 / S**2])  # the flat film left out
    ((_, _, _, none),) = shift.class_means([("test", labels[:1], stats[2:])])
    assert np.isnan(none).all()  # no value at all: NaN (shown as -), not a warning or a zero


def test_the_default_segmenter_is_used_only_when_its_file_exists(tmp_path, monkeypatch, segmenter):
    from stages.common import paths

    monkeypatch.setattr(paths, "SEGMENTER_MODEL", tmp_path / "absent.pt")
    assert shift._segmenter(None) is None  # a clone before `dvc repro`: the image columns only
    monkeypatch.setattr(paths, "SEGMENTER_MODEL", segmenter.path)
    assert shift._segmenter(None).path == segmenter.path
    assert shift._segmenter("none") is None
