"""The generated docs (the experiments table of docs/recipes.md, the params table of
docs/reproducibility.md, docs/experiments.md, docs/params.md) are current, and
``python -m stages.docs`` rewrites only their generated parts, atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages.common.utils import StageError
from stages.tools import docs as R
from stages.tools import experiments as X
from stages.tools import param_table
from tests.imports import REPO


def test_generated_docs_are_current():
    """Fails when EXPERIMENTS or dvc.yaml changed and the docs were not regenerated."""
    diff = R.stale_diff(R.rendered(REPO))
    assert not diff, f"generated docs are stale: run {R.WRITE}\n{diff}"


def test_published_cell_formats():
    assert R.published_cell(X.get("seed000-cnn5").published) == (
        "val acc 0.88; test acc 0.91; ROC-AUC 0.97; curve_accuracy 0.97 "
        "(seed 000 report; its code's README)"
    )
    assert "test acc 0.9103; precision 0.8976, recall 0.9667, f1 0.9309 (seed 001 blog)" in (
        R.published_cell(X.get("seed001-cnn").published)
    )
    assert R.published_cell(X.get("seed004-retinanet-r101").published).startswith(
        "AP@0.5: Consolidation 0.484, Fibrosis 0.074,"
    )


def _copy(tmp_path: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "docs").mkdir()
    for doc in {R.EXPERIMENTS_DOC, *(b.path for b in R.BLOCKS)}:
        shutil.copy(REPO / doc, tmp_path / doc)
    return tmp_path


def test_write_repairs_stale_parts_only_and_check_then_passes(tmp_path, capsys):
    root = _copy(tmp_path)
    recipes = root / R.RECIPES_DOC
    text = recipes.read_text()
    head, rest = text.split(R.BEGIN, 1)
    block, tail = rest.split(R.END, 1)
    recipes.write_text(
        f"{head}outside\n{R.BEGIN}{block.replace('| Seed 000', '| Seed 0')}{R.END}{tail}"
    )
    repro = root / R.REPRODUCIBILITY_DOC
    head, rest = repro.read_text().split(param_table.BEGIN, 1)
    _, tail = rest.split(param_table.END, 1)
    repro.write_text(f"{head}{param_table.BEGIN}\nstale row\n{param_table.END}{tail}")
    (root / R.EXPERIMENTS_DOC).write_text("stale\n")
    with pytest.raises(SystemExit) as exc:
        R.main(["--check", "--root", str(root)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "-| `seed000-cnn5` | Seed 0:" in err and "+| `seed000-cnn5` | Seed 000:" in err
    assert "-stale row" in err and str(repro) in err
    assert f"run {R.WRITE}" in err
    R.main(["--write", "--root", str(root)])
    assert "outside\n" in recipes.read_text()  # text outside the markers is kept
    assert "stale row" not in repro.read_text() and "| `train_detector` |" in repro.read_text()
    assert "dvc exp run -n seed000-cnn5" in (root / R.EXPERIMENTS_DOC).read_text()
    R.main(["--check", "--root", str(root)])  # current now: no SystemExit
    assert not list(root.glob(".*.tmp*")) and not list((root / "docs").glob(".*.tmp*"))


@pytest.mark.parametrize(
    ("doc", "marker"),
    [
        pytest.param(b.path, m, id=f"{b.path.stem}-{'begin' if m == b.begin else 'end'}")
        for b in R.BLOCKS
        for m in (b.begin, b.end)
    ],
)
def test_a_missing_marker_is_a_clear_error_and_changes_nothing(tmp_path, doc, marker):
    root = _copy(tmp_path)
    text = (root / doc).read_text().replace(marker, "")
    (root / doc).write_text(text)
    with pytest.raises(StageError, match="needs exactly one"):
        R.main(["--write", "--root", str(root)])
    assert (root / doc).read_text() == text


def test_a_missing_file_with_a_block_is_a_clear_error(tmp_path):
    root = _copy(tmp_path)
    (root / R.REPRODUCIBILITY_DOC).unlink()
    with pytest.raises(StageError, match=r"docs/reproducibility\.md is missing"):
        R.main(["--check", "--root", str(root)])


def test_generated_markers_only_where_the_generator_writes():
    """A marker pair in any other markdown file would never be regenerated (silently stale)."""
    homes = {b.begin.split(" ")[1]: REPO / b.path for b in R.BLOCKS}  # "experiments:begin"
    for md in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for name, home in homes.items():
            if md != home:
                assert f"<!-- {name}" not in md.read_text(), f"{md}: {name} marker"


def test_experiments_doc_holds_every_command():
    doc = (REPO / R.EXPERIMENTS_DOC).read_text()
    for name in X.EXPERIMENTS:
        assert f"## `{name}`" in doc
        assert f"dvc exp run -n {name}" in doc or name in doc
