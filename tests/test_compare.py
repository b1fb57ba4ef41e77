"""`python -m stages.compare`: `dvc exp show --json` reduced to the rows' defining params and
their test figures, fitted to the terminal without cutting a figure.

Fast tests on a structure shaped like DVC 3.67's `dvc exp show --json`; the real DVC output is
checked by tests/test_dvc_pipeline.py (the column set of `dvc exp show`).
"""

from __future__ import annotations

import json

import pytest

from stages.tools import compare as C

CLS, DET = "metrics/classifier.json", "metrics/detector.json"


def _data(lr: float, epochs: int, acc: float, det_map: float = 0.25) -> dict:
    params = {
        "params.yaml": {
            "data": {
                "train_classifier": {"arch": "to_be", "learning_rate": lr, "epochs": epochs},
                "train_detector": {"backbone": "resnet18", "epochs": 4},
                "data": {"root": "data/inputs", "classification": {"source": "synthetic"}},
            }
        }
    }
    metrics = {
        CLS: {"data": {"accuracy": acc, "roc_auc": 0.9, "specificity": 0.8, "cam_in_lungs": 0.5}},
        DET: {"data": {"map": det_map, "map_50": 0.7, "froc": 0.6}},
    }
    return {"params": params, "metrics": metrics, "timestamp": "2026-12-07T05:00:00"}


def _exp(name: str, data: dict, state: str | None = "success", error=None) -> dict:
    executor = None if state == "success" else {"state": state, "name": None}
    return {"name": name, "executor": executor, "revs": [{"rev": "b" * 40, "name": name,
            "data": data, "error": error, "experiments": None}]}  # fmt: skip


def show() -> list:
    base = _data(0.001, 15, 0.81)
    return [
        {"rev": "workspace", "name": None, "data": base, "error": None, "experiments": None},
        {"rev": "a" * 40, "name": "main", "data": base, "error": None, "experiments": [
            _exp("lr-high", _data(0.01, 15, 0.86)),
            _exp("ep-5", _data(0.001, 5, 0.79)),
            _exp("queued-one", base, state="queued"),
        ]},
    ]  # fmt: skip


def test_rows_show_changed_params_and_only_varying_tasks():
    t = C.table(C.rows(show()))
    assert t.header == [
        "experiment", "state", "acc", "auc", "spec", "cam", "learning_rate", "epochs"
    ] or t.header == ["experiment", "state", "acc", "auc", "spec", "cam", "epochs",
                      "learning_rate"]  # fmt: skip
    by_name = {r[0].strip(): dict(zip(t.header, r, strict=True)) for r in t.rows}
    assert by_name["lr-high"]["acc"] == "0.860" and by_name["lr-high"]["learning_rate"] == "0.01"
    assert by_name["ep-5"]["epochs"] == "5"
    # the detector's figures are equal in every row: not shown; unchanged params neither
    assert "mAP" not in t.header and "arch" not in t.header and "backbone" not in t.header
    # a queued run shows its baseline's metrics in dvc exp show: the table never does
    assert by_name["queued-one"]["acc"] == C.MISSING and by_name["queued-one"]["state"] == "queued"


def test_fit_keeps_every_figure_and_names_what_it_left_out():
    t = C.table(C.rows(show()))
    narrow = C.fit(t, 60)
    assert narrow.header[: t.n_fixed] == t.header[: t.n_fixed]
    assert narrow.left_out and set(narrow.left_out) <= {"learning_rate", "epochs"}
    text = C.render_text(narrow)
    assert "also changed" in text and all(h in text for h in ("acc", "auc", "spec"))
    wide = C.render_text(C.fit(t, 200))
    assert all(len(line) <= 200 for line in wide.splitlines())
    assert "learning_rate" in wide and "also changed" not in wide


def test_short_names_are_unique_tails():
    names = C.short_names(["train_classifier.epochs", "train_detector.epochs", "a.learning_rate"])
    assert names == {
        "train_classifier.epochs": "train_classifier.epochs",
        "train_detector.epochs": "train_detector.epochs",
        "a.learning_rate": "learning_rate",
    }


def test_all_tasks_when_nothing_varies_and_the_cli_formats(tmp_path, capsys):
    one = show()[:1]
    t = C.table(C.rows(one))
    assert {"acc", "mAP", "FROC"} <= set(t.header)
    path = tmp_path / "show.json"
    path.write_text(json.dumps(show()))
    C.main(["--show-json", str(path), "--csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("experiment,state,acc,auc") and len(lines) == 1 + 5
    C.main(["--show-json", str(path), "--md"])
    assert capsys.readouterr().out.startswith("| experiment | state | acc |")
    with pytest.raises(SystemExit):
        C.main(["--show-json", str(path), "--width", "10"])
