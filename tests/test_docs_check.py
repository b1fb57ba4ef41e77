"""``python -m stages.docs --check`` treats a generated file that is missing as stale: a deleted
docs/experiments.md (or one never written) fails the check, naming the file."""

from __future__ import annotations

import shutil

import pytest

from stages.tools import docs as R
from tests.imports import REPO


def test_stale_diff_of_a_missing_file_is_not_empty(tmp_path):
    missing = tmp_path / "docs/experiments.md"
    diff = R.stale_diff({missing: "# Named experiments\n"})
    assert f"+++ {missing} (generated)" in diff and "+# Named experiments" in diff


def test_check_fails_when_a_generated_file_is_missing(tmp_path, capsys):
    for name in ("dvc.yaml", "params.yaml", *(b.path for b in R.BLOCKS)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert not (tmp_path / R.EXPERIMENTS_DOC).exists()
    with pytest.raises(SystemExit) as exc:
        R.main(["--check", "--root", str(tmp_path)])  # docs/experiments.md was never written
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert str(tmp_path / R.EXPERIMENTS_DOC) in err and f"run {R.WRITE}" in err
    R.main(["--write", "--root", str(tmp_path)])
    R.main(["--check", "--root", str(tmp_path)])  # written now: current, no SystemExit
