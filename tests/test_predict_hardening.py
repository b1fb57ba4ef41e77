"""The predict command's hardened edges: each defect is a one-line ``error:`` and exit 2 (usage
and configuration errors) or a JSON error line for the input concerned, never a traceback.

- a corrupt or malicious model file (a pickle named .keras, a Keras model with a Python lambda,
  a truncated archive, a torch pickle carrying code, random bytes): "not a valid model", exit 2,
  and the pickled code never runs;
- ``--out`` an existing folder, ``--gradcam-dir`` an existing file: exit 2 before any model loads;
- a folder holding a self-referencing symlink, a broken link, a link to the folder itself, a
  FIFO and an unreadable sub-folder: every one of them gets a JSON line {"file", "error",
  "reason"};
- an EPS file named .png inside a folder: a not_an_image line.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.predict import sidecar_path
from stages.serve import predict as predict_cmd
from stages.serve.inference import Predictor
from tests.serve_models import tiny_models, xray_like


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp() / "serve_models")


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(path)
    return path


def _cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """Run ``cxr-predict`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["cxr-predict", *argv])
    with pytest.raises(SystemExit) as info:
        predict_cmd.cli()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _assert_one_error_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


class _RunsCode:
    """Unpickling this runs ``os.system`` - what a malicious model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _keras_with_sidecar(models: dict, path: Path) -> Path:
    sidecar_path(path).write_text(sidecar_path(models["classifier"]).read_text())
    return path


def _lambda_keras(models: dict, path: Path) -> Path:
    import keras

    model = keras.Sequential([keras.Input((48, 48, 1)), keras.layers.Lambda(lambda x: x * 2)])
    model.save(path)
    return _keras_with_sidecar(models, path)


@pytest.mark.parametrize("kind", ["pickle", "lambda", "truncated", "hdf5", "empty_zip"])
def test_invalid_classifier_file_is_a_one_line_error(
    models, tmp_path, image, kind, monkeypatch, capsys
):
    marker = tmp_path / "pwned"
    path = tmp_path / "bad.keras"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    elif kind == "lambda":
        _lambda_keras(models, path)
    elif kind == "truncated":
        data = models["classifier"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "hdf5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 512)
    else:
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "no model here")
    _keras_with_sidecar(models, path)
    argv = [str(image), "--classifier", str(path), "--detector", str(models["detector"])]
    code, out, err = _cli(monkeypatch, capsys, argv)
    assert code == 2 and out == ""
    _assert_one_error_line(err, str(path), "not a valid classifier model")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["code_pickle", "random", "wrong_dict", "truncated"])
def test_invalid_detector_file_is_a_one_line_error(
    models, tmp_path, image, kind, monkeypatch, capsys
):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "bad.pt"
    if kind == "code_pickle":
        torch.save({"format": "x", "payload": _RunsCode(marker)}, path)
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "wrong_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        data = models["detector"].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    argv = [str(image), "--classifier", str(tmp_path / "none.keras"), "--detector", str(path)]
    code, out, err = _cli(monkeypatch, capsys, argv)
    assert code == 2 and out == ""
    _assert_one_error_line(err, str(path))
    assert not marker.exists()  # weights_only: the pickled os.system never ran


def test_the_server_shares_the_loader(models, tmp_path):
    from stages.common.utils import StageError
    from stages.serve.app import create

    bad = tmp_path / "bad.keras"
    bad.write_bytes(pickle.dumps({"not": "a model"}))
    _keras_with_sidecar(models, bad)
    with pytest.raises(StageError, match="not a valid classifier model"):
        create([bad], None, tmp_path / "none.json")
    with pytest.raises(StageError, match="not a valid classifier model"):
        Predictor([bad], None)


def test_out_is_an_existing_folder(tmp_path, image, monkeypatch, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    code, out, err = _cli(monkeypatch, capsys, [str(image), "--out", str(folder)])
    assert code == 2 and out == ""
    _assert_one_error_line(err, "--out", "is a folder")
    assert list(folder.iterdir()) == []


def test_out_below_a_file(tmp_path, image, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = _cli(monkeypatch, capsys, [str(image), "--out", str(tmp_path / "f" / "o.json")])
    assert code == 2
    _assert_one_error_line(err, "--out", "is not a folder")


def test_gradcam_dir_is_an_existing_file(tmp_path, image, monkeypatch, capsys):
    target = tmp_path / "cams"
    target.write_text("a file")
    code, out, err = _cli(monkeypatch, capsys, [str(image), "--gradcam-dir", str(target)])
    assert code == 2 and out == ""
    _assert_one_error_line(err, "--gradcam-dir", "is a file")
    assert target.read_text() == "a file"


def test_every_entry_of_a_folder_gets_a_line(models, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    sub = folder / "locked"
    sub.mkdir(parents=True)
    Image.fromarray(xray_like()).save(folder / "good.png")
    Image.fromarray(xray_like()).save(sub / "hidden_from_us.png")
    (folder / "self.png").symlink_to("self.png")  # a self-referencing link
    (folder / "gone.png").symlink_to("does-not-exist.png")
    (folder / "back").symlink_to(".", target_is_directory=True)  # a link to its own folder
    eps = folder / "drawing.png"
    Image.fromarray(xray_like()).save(eps, format="EPS")  # an EPS file named .png
    os.mkfifo(folder / "pipe.png")  # reading a FIFO would block forever
    sub.chmod(0)
    if os.geteuid() == 0:  # root reads any folder: make this one fail as it does for a user
        real = os.scandir

        def scandir(path="."):
            if Path(path) == sub:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "p.jsonl"
    argv = [str(folder), "--out", str(out), "--classifier", str(models["classifier"])]
    argv += ["--detector", "none.pt", "--evaluation", str(models["evaluation"])]
    try:
        code, _, err = _cli(monkeypatch, capsys, argv)
    finally:
        sub.chmod(0o755)
    assert code == 1 and "Traceback" not in err
    lines = {Path(x["file"]).name: x for x in map(json.loads, out.read_text().splitlines())}
    names = {"good.png", "locked", "self.png", "gone.png", "back", "drawing.png", "pipe.png"}
    assert set(lines) == names
    assert "classification" in lines["good.png"]
    expected = {
        "locked": "unreadable",
        "self.png": "link_loop",
        "gone.png": "broken_link",
        "back": "link_loop",
        "drawing.png": "not_an_image",
        "pipe.png": "unreadable",
    }
    for name, reason in expected.items():
        assert lines[name]["reason"] == reason, lines[name]
        assert set(lines[name]) == {"file", "error", "reason"}
    assert "PostScript/EPS" in lines["drawing.png"]["error"]


def test_a_broken_link_given_explicitly_gets_a_line(models, tmp_path, image, monkeypatch, capsys):
    link = tmp_path / "x.png"
    link.symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "p.jsonl"
    argv = [str(link), str(image), "--out", str(out), "--classifier", str(models["classifier"])]
    code, _, _ = _cli(monkeypatch, capsys, [*argv, "--detector", "none.pt"])
    assert code == 1
    first, second = map(json.loads, out.read_text().splitlines())
    assert first == {"file": str(link), "error": first["error"], "reason": "broken_link"}
    assert "classification" in second


@pytest.mark.parametrize("where", ["the-input", "a-link-to-the-input", "inside-the-input-folder"])
def test_out_never_overwrites_an_input(models, tmp_path, where, monkeypatch, capsys):
    """``--out`` naming an input (or a link to it), or a file inside an input folder: one
    error line before any model loads, and the input is left as it was."""
    folder = tmp_path / "xrays"
    folder.mkdir()
    image = folder / "a.png"
    Image.fromarray(xray_like()).save(image)
    before = image.read_bytes()
    given = str(image)
    if where == "the-input":
        out = image
    elif where == "a-link-to-the-input":
        out = tmp_path / "preds.jsonl"
        out.symlink_to(image)
    else:
        out, given = folder / "b.png", str(folder)
    argv = [given, "--out", str(out), "--classifier", str(models["classifier"])]
    code, stdout, err = _cli(monkeypatch, capsys, [*argv, "--detector", "none.pt"])
    assert code == 2 and stdout == ""
    _assert_one_error_line(err, "--out", "input")
    assert image.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]
