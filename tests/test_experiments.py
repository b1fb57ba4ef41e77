"""Named experiments (stages.tools.experiments) and the seed 002 ablation runner/report (stages.tools.ablations).

Fast tests: every named experiment's overrides apply to the real params.yaml the way DVC applies
them and every stage's schema accepts the result; the shell commands round-trip; the
generated table and commands are current (tests/test_docs.py); the
report is checked on a `dvc exp show --json` structure shaped like DVC 3.67's. Slow: on a copy of the
session's built pipeline, two tiny rows are queued, run by a queue worker and reported end to end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages.check_params import resolve
from stages.classifier.config import TrainClassifierConfig
from stages.common.config import ConfigError, get_section, parse
from stages.common.utils import StageError
from stages.tools import ablations as A
from stages.tools import experiments as X
from stages.tools import queue as Q
from tests.dvc_helpers import built_repo, tool_env

NAMES = list(X.EXPERIMENTS)


def _plain(value):
    """Tuples -> lists, recursively (what a YAML round trip gives back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("name", NAMES)
def test_overrides_apply_and_every_stage_parses(name, params):
    before = copy.deepcopy(params)
    out = X.apply_overrides(params, X.overrides_for(name, "/data", params))
    assert params == before, "apply_overrides must not modify its input"
    resolve(out)  # every section as its stage parses it: ConfigError = a wrong key or value
    for key, value in X.get(name).set_params:
        expected = _plain(X._resolve(value, "/data"))
        assert get_section(out, key) == expected, f"{key}: DVC would write something else"


@pytest.mark.parametrize("name", NAMES)
def test_override_keys_are_schema_keys_and_change_a_default(name, _params_master):
    """Each key a recipe sets is a params key (its schema has it) and differs from the default:
    a recipe lists what defines it, so `dvc exp show` shows just that."""
    keys = [k for k, _ in X.get(name).set_params]
    assert len(keys) == len(set(keys)), f"{name}: a key is set twice (DVC keeps only the last)"
    defaults = resolve(_params_master)
    flat = {"data.root": _params_master["data"]["root"]}
    for section, values in defaults.items():
        stack = [(section, values)]
        while stack:
            prefix, node = stack.pop()
            for k, v in node.items():
                stack.append((f"{prefix}.{k}", v)) if isinstance(v, dict) else None
                flat.setdefault(f"{prefix}.{k}", v)
    for key, value in X.get(name).set_params:
        assert key in flat, f"{name}: {key} is no params key"
        assert _plain(value) != flat[key], f"{name}: {key} sets the default {value!r}"


def test_a_typo_is_caught(params):
    from dvc.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):  # plain key=value: the key must be listed
        X.apply_overrides(params, ["train_classifier.hed.units=2"])
    with pytest.raises(ConfigError, match="hed"):  # ++ adds it; the schema refuses the typo
        resolve(X.apply_overrides(params, ["++train_classifier.hed.units=2"]))
    bad = X.apply_overrides(params, ["++train_classifier.head.units=0"])
    with pytest.raises(ConfigError, match="units"):
        parse(TrainClassifierConfig, bad["train_classifier"], "train_classifier")


@pytest.mark.parametrize(
    "value",
    ["../shared/data/kermany224", "/abs path/with space", "true", "null", "1e-05", "a:b", "none",
     0.0005, 1e-5, 2.0, -3, True, None, [0.4, 0.25, 0.5], [[32, 40], [64, 80]],
     [{"name": "kermany", "path": "/x y/k", "classes": {"PNEUMONIA/bacteria": "BACTERIA"}}]],
)  # fmt: skip
def test_format_value_reads_back_equal_through_dvc(value):
    out = X.apply_overrides({"k": "old"}, [f"k={X.format_value(value)}"])
    assert out["k"] == value


@pytest.mark.parametrize("value", [float("nan"), "${oops}", "back\\slash", {"a b": 1}])
def test_format_value_refuses_what_dvc_would_mangle(value):
    with pytest.raises(ValueError):
        X.format_value(value)


@pytest.mark.parametrize("name", NAMES)
def test_command_round_trips_through_the_shell(name):
    root = "/mnt/my data/x-rays"
    argv = shlex.split(X.command(name, root))
    assert argv[:5] == ["dvc", "exp", "run", "-n", name]
    assert argv[-1] == X.get(name).target
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert sets == X.overrides_for(name, root)
    keys = [s.split("=", 1)[0] for s in sets]
    assert len(keys) == len(set(keys)) == len(X.get(name).set_params)
    assert "{data_root}" not in " ".join(argv)
    if any("{data_root}" in repr(v) for _, v in X.get(name).set_params):
        assert root in " ".join(sets)
    assert shlex.split(X.command(name, root, queue=True))[3] == "--queue"


def test_seed002_rows_are_the_seven_of_both_tables():
    rows = [X.get(n) for n in X.SEED002_ROWS]
    assert [e.table for e in rows].count("loss") == 5
    assert [e.table for e in rows].count("regularisation") == 2
    assert all(len(e.row) == 3 for e in rows)
    # rows that ARE the TO-BE system share its params exactly, so DVC's run cache trains it once
    to_be = dict(X.get("seed002-to-be").set_params)
    same = [e.name for e in rows if dict(e.set_params) == to_be]
    assert same == ["seed002-sigmoid-bce-adam", "seed002-gen-dropout"]
    # every row reads the same data/split/augment params: the upstream stages run once
    upstream = {tuple((k, repr(v)) for k, v in e.set_params if not k.startswith("train_"))
                for e in rows}  # fmt: skip
    assert len(upstream) == 1


def test_merge_overrides_replaces_same_key_in_place():
    base = ["a.b=1", "c=2"]
    assert Q.merge_overrides(base, ["c=3", "+d.e=4"]) == ["a.b=1", "c=3", "+d.e=4"]
    # a key the recipe adds with ++ (params.yaml lacks it) keeps its ++ when replaced
    assert Q.merge_overrides(["++x.y=[1]", "c=2"], ["x.y=[2]"]) == ["++x.y=[2]", "c=2"]
    with pytest.raises(StageError, match="key=value"):
        Q.merge_overrides(base, ["oops"])


def test_queue_argv_has_one_set_per_key():
    run = Q.Run("seed002-to-be", "seed002-to-be", ("train_classifier.epochs=1", "+x.y=2"))
    argv = Q.queue_argv(run, "/d")
    assert argv[:5] == ["exp", "run", "--queue", "-n", "seed002-to-be"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    keys = [s.split("=", 1)[0].lstrip("+") for s in sets]
    assert len(keys) == len(set(keys))
    assert "train_classifier.epochs=1" in sets and "train_classifier.epochs=50" not in sets
    assert (
        "data.root=/d" in sets
        and any(s.startswith("++data.classification.sources=") and "kermany224" in s for s in sets)
        and argv[-1] == "evaluate@classification"
    )


def test_missing_inputs_names_the_absent_folder(tmp_path):
    train, test = f"{tmp_path}/kermany224", f"{tmp_path}/kermany_test_public"
    lungs = f"{tmp_path}/lung_masks"  # the segmenter of cam_in_lungs
    assert Q.missing_inputs("seed002-to-be", str(tmp_path)) == [train, test, lungs]
    (tmp_path / "kermany224").mkdir()
    (tmp_path / "lung_masks").mkdir()
    assert Q.missing_inputs("seed002-to-be", str(tmp_path)) == [test]  # the official test source
    (tmp_path / "kermany_test_public").mkdir()
    assert Q.missing_inputs("seed002-to-be", str(tmp_path)) == []
    assert len(Q.missing_inputs("seed003-vgg16-4class", str(tmp_path))) == 1  # covid19_radiography


def test_experiments_cli_prints_the_commands(capsys):
    X.main(["seed002-to-be", "--data-root", "/d", "--queue"])
    out = capsys.readouterr().out
    assert X.command("seed002-to-be", "/d", queue=True) in out
    assert out.startswith("# seed002-to-be: Seed 002 TO-BE")


def test_titles_are_unique_and_name_the_configured_size():
    titles = [e.title for e in X.EXPERIMENTS.values()]
    assert all(titles) and len(set(titles)) == len(titles)
    for e in X.EXPERIMENTS.values():
        assert not {"target", "placeholder"} & set(e.title.lower().replace("(", " ").split())
        for size in re.findall(r"(\d+) px", e.title):
            section = f"augment.{e.target.split('@')[1]}"
            got = resolve(X.resolved_params(e.name))[section]["image_size"]
            assert got == int(size), f"{e.name}: title says {size} px, params {got}"


def test_failed_run_shows_the_error_not_the_progress_bar_frames(monkeypatch):
    """A captured log has one line per tqdm frame; the failure message keeps the last frame
    of each bar, so the error line is in the tail and the bar appears once."""
    frames = [f"intake: {p:3d}%|{'#' * (p // 10)}| {p * 52}/5232" for p in range(0, 101, 5)]
    log = "\n".join(
        [
            "Reproducing experiment 'x'",
            *frames,
            "error: split mode 'official' needs a test split",
            "saving: 100%|#| 3/3",
            "ERROR: failed to reproduce 'split'",
        ]
    )
    assert Q.log_tail(log, 5) == [
        "Reproducing experiment 'x'", frames[-1], "error: split mode 'official' needs a test split",
        "saving: 100%|#| 3/3", "ERROR: failed to reproduce 'split'",
    ]  # fmt: skip
    assert Q.log_tail(log, 2) == ["saving: 100%|#| 3/3", "ERROR: failed to reproduce 'split'"]
    two_bars = "a:  10%|#| 1/10\nb:  50%|#| 1/2\na:  20%|#| 2/10"  # other bars are not merged
    assert Q.log_tail(two_bars, 9) == two_bars.splitlines()

    def fake(args, check=True):
        return subprocess.CompletedProcess(
            args, 0, log if args[:2] == ["queue", "logs"] else "", ""
        )

    monkeypatch.setattr(Q, "_dvc", fake)
    monkeypatch.setattr(Q, "wait", lambda names, *a: {n: "failed" for n in names})
    with pytest.raises(StageError) as err:
        Q.run(["seed1"], workers=1, timeout=1)
    msg = str(err.value)
    assert msg.startswith("1 experiment(s) failed: seed1\n")
    assert "needs a test split" in msg and frames[-1] in msg
    assert frames[-2] not in msg and msg.count("intake:") == 1


def test_queue_resumes_requeues_failed_and_replaces(monkeypatch, tmp_path):
    for folder in ("kermany224", "kermany_test_public", "lung_masks"):
        (tmp_path / folder).mkdir()
    show = json.dumps(exp_show_json())
    calls = []

    def fake(args, check=True):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, 0, show if args[:2] == ["exp", "show"] else "", "")

    monkeypatch.setattr(Q, "_dvc", fake)
    monkeypatch.setattr(Q, "has_commit", lambda: True)
    monkeypatch.setattr(Q, "params_changed", lambda: False)
    names = ["seed002-to-be", "seed002-nogen-dropout", "seed002-sigmoid-bce-rmsprop",
             "seed002-gen-dropout"]  # fmt: skip
    # success and queued are kept, failed is removed and queued again, unknown is queued
    assert A.queue(names, str(tmp_path)) == ["seed002-nogen-dropout", "seed002-gen-dropout"]
    assert ["exp", "remove", "seed002-nogen-dropout"] in calls
    runs = [c for c in calls if c[:3] == ["exp", "run", "--queue"]]
    assert all(f"data.root={tmp_path}" in c for c in runs)
    calls.clear()
    assert A.queue(names[:1], str(tmp_path), replace=True) == ["seed002-to-be"]
    assert ["exp", "remove", "seed002-to-be"] in calls
    with pytest.raises(StageError, match="data not found"):
        A.queue(names, str(tmp_path / "elsewhere"))
    monkeypatch.setattr(Q, "has_commit", lambda: False)
    with pytest.raises(StageError, match="commit"):
        A.queue(names, str(tmp_path))
    monkeypatch.setattr(Q, "has_commit", lambda: True)
    monkeypatch.setattr(Q, "params_changed", lambda: True)
    calls.clear()
    with pytest.raises(StageError, match="params.yaml differs from the last commit"):
        A.queue(names, str(tmp_path))
    assert not [c for c in calls if c[:2] == ["exp", "run"]]  # nothing queued


def test_params_changed_sees_an_edited_or_checked_out_params_file(tmp_path, monkeypatch):
    """What --ensemble leaves (another commit's params.yaml, staged) counts as changed."""
    monkeypatch.chdir(tmp_path)
    for args in (["init", "-q"], ["config", "user.name", "t"], ["config", "user.email", "t@t"]):
        _git(tmp_path, *args)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-q", "-m", "one")
    (tmp_path / "params.yaml").write_text("a: 2\n")
    _git(tmp_path, "commit", "-q", "-am", "two")
    assert not Q.params_changed()
    _git(tmp_path, "checkout", "HEAD~1", "--", "params.yaml")  # staged, like --ensemble
    assert Q.params_changed()
    _git(tmp_path, "checkout", "HEAD", "--", "params.yaml")
    assert not Q.params_changed()
    (tmp_path / "params.yaml").write_text("a: 3\n")
    assert Q.params_changed()


# ----------------------------------------------------------------------------- run / status

STATUS = """Task     Name                      Created    Status
d372434  seed002-to-be             03:10 AM   {a}
04e3ecd  seed002-gen-dropout       03:10 AM   {b}

Worker status: {w} active, 0 idle
"""


def test_parse_status():
    tasks, workers = Q.parse_status(STATUS.format(a="Running", b="Queued", w=1))
    assert tasks == {"seed002-to-be": "running", "seed002-gen-dropout": "queued"}
    assert workers == (1, 0)
    requeued = (
        STATUS.format(a="Success", b="Success", w=0) + "9d4e4d0  seed002-to-be  03:30 AM  Queued"
    )
    assert Q.parse_status(requeued)[0]["seed002-to-be"] == "queued"


class FakeDvc:
    """Stands in for ``ablations._dvc``: a scripted sequence of ``dvc queue status`` outputs."""

    def __init__(self, statuses: list[str]):
        self.statuses, self.calls = statuses, []

    def __call__(self, args, check=True):
        self.calls.append(list(args))
        text = ""
        if args[:2] == ["queue", "status"]:
            text = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        elif args[:2] == ["queue", "logs"]:
            text = "\n".join(f"line {i}" for i in range(100)) + "\nerror: head/loss refused"
        return subprocess.CompletedProcess(args, 0, text, "")


def test_run_waits_then_reports_failures_with_log_tail(monkeypatch):
    names = ["seed002-to-be", "seed002-gen-dropout"]
    fake = FakeDvc([STATUS.format(a="Running", b="Queued", w=1),
                    STATUS.format(a="Success", b="Failed", w=0)])  # fmt: skip
    monkeypatch.setattr(Q, "_dvc", fake)
    with pytest.raises(StageError, match="1 experiment.*seed002-gen-dropout") as err:
        Q.run(names, workers=2, timeout=60, poll=0)
    assert "error: head/loss refused" in str(err.value) and "line 10\n" not in str(err.value)
    assert fake.calls[0] == ["queue", "start", "-j", "2"]
    assert ["queue", "logs", "seed002-gen-dropout"] in fake.calls


def test_run_success_and_timeout(monkeypatch):
    names = ["seed002-to-be", "seed002-gen-dropout"]
    monkeypatch.setattr(Q, "_dvc", FakeDvc([STATUS.format(a="Success", b="Success", w=0)]))
    assert Q.run(names, workers=1, timeout=60, poll=0)["seed002-gen-dropout"] == "success"
    monkeypatch.setattr(Q, "_dvc", FakeDvc([STATUS.format(a="Running", b="Queued", w=1)]))
    with pytest.raises(StageError, match="still pending"):
        Q.run(names, workers=1, timeout=0, poll=0)


def test_wait_asks_again_as_soon_as_a_run_ends(monkeypatch, tmp_path):
    """Between the `poll`-second asks, a run ending (a file in the queue's result folder) makes
    `wait` ask `dvc queue status` at once; an unchanged queue costs no `dvc` process."""
    result = tmp_path / "result"
    result.mkdir()
    monkeypatch.setattr(Q, "queue_dirs", lambda: (tmp_path / "in", result))
    fake = FakeDvc([STATUS.format(a="Running", b="Success", w=1),
                    STATUS.format(a="Success", b="Success", w=0)])  # fmt: skip
    monkeypatch.setattr(Q, "_dvc", fake)
    clock = {"now": 0.0}
    monkeypatch.setattr(Q.time, "monotonic", lambda: clock["now"])

    def sleep(seconds: float) -> None:
        clock["now"] += seconds
        if clock["now"] >= 5:  # the run ends 5 s into a 600 s poll
            (result / "task-1").write_text("{}")

    monkeypatch.setattr(Q.time, "sleep", sleep)
    tasks = Q.wait(["seed002-to-be"], workers=1, timeout=3600, poll=600)
    assert tasks["seed002-to-be"] == "success"
    assert fake.calls.count(["queue", "status"]) == 2
    assert 5 <= clock["now"] <= 5 + Q.WATCH_EVERY


def test_run_restarts_a_dead_worker_once_then_fails(monkeypatch):
    fake = FakeDvc([STATUS.format(a="Queued", b="Queued", w=0)])
    monkeypatch.setattr(Q, "_dvc", fake)
    with pytest.raises(StageError, match="no queue worker"):
        Q.run(["seed002-to-be"], workers=1, timeout=60, poll=0)
    assert fake.calls.count(["queue", "start", "-j", "1"]) == 2


# ----------------------------------------------------------------------------- report


# The reports committed with each fake experiment: {rev: {path: document}}, served to the tools
# by the fake ``rev_json`` below (the real one reads them with `git show <rev>:<path>`).
REV_DOCS: dict[str, dict[str, dict]] = {}


@pytest.fixture(autouse=True)
def _reports_at_revisions(monkeypatch):
    monkeypatch.setattr(Q, "rev_json", lambda rev, path: REV_DOCS.get(rev, {}).get(str(path)))


def _metrics(train: float, val: float, test: float, auc: float) -> dict:
    """An experiment's metrics as `dvc exp show` lists them, and (under "_reports") the
    training summary and evaluation report committed with it."""
    return {
        "metrics/classifier.json": {"data": {"accuracy": test, "roc_auc": auc}},
        "metrics/detector.json": {"error": {"type": "FileNotFoundError", "msg": "absent"}},
        "_reports": {
            "reports/live/classifier/training.json": {"train_accuracy": train, "val_accuracy": val},
            "reports/classifier/evaluation.json": {"n_test": 523, "at_0_5": {"accuracy": 0.5}},
        },
    }


def _params(path: str) -> dict:
    return {"params.yaml": {"data": {
        "data": {"classification": {"source": "kermany", "path": path}},
        "split": {"classification": {"mode": "random"}},
        "augment": {"classification": {"image_size": 150}},
    }}}  # fmt: skip


def _exp(
    name: str, state: str | None, metrics: dict, error: dict | None = None, rev: str = ""
) -> dict:
    """One experiment as DVC 3.67 lists it under its baseline (executor null once cleaned)."""
    import hashlib

    metrics = dict(metrics)
    reports = metrics.pop("_reports", {})
    rev = rev or hashlib.sha1(json.dumps([name, metrics], sort_keys=True).encode()).hexdigest()
    REV_DOCS[rev] = reports
    data = {"rev": rev, "timestamp": "2026-01-01T00:00:00", "params": _params(
        "/d/kermany224"), "metrics": metrics, "deps": {}, "outs": {}, "meta": {}}  # fmt: skip
    executor = None if state is None else {"state": state, "name": "dvc-task", "local": {}}
    entry = {"rev": rev, "name": name, "data": data, "error": error, "experiments": None}
    return {"revs": [entry], "executor": executor, "name": name}


def exp_show_json() -> list:
    base = _metrics(0.1111, 0.2222, 0.3333, 0.4444)  # the baseline's (what a failed run shows)
    return [
        {"rev": "workspace", "name": None, "data": {"metrics": base}, "error": None,
         "experiments": None},
        {"rev": "a" * 40, "name": "main", "data": {"metrics": base}, "error": None,
         "experiments": [
             _exp("seed002-to-be", "success", _metrics(0.96, 0.93, 0.92, 0.97)),
             _exp("seed002-softmax-cce-adam", None, _metrics(0.9512, 0.875, 0.8805, 0.9612)),
             _exp("seed002-softmax-cce-adam", "success", _metrics(0.5, 0.5, 0.5, 0.5)),  # older
             _exp("seed002-nogen-dropout", "failed", base,
                  {"msg": "Experiment run failed", "type": ""}),
             _exp("seed002-sigmoid-bce-rmsprop", "queued", base),
         ]},
    ]  # fmt: skip


def test_collect_reads_the_newest_successful_run():
    res = A.collect(exp_show_json(), list(X.SEED002_ROWS) + ["seed002-to-be"])
    r = res["seed002-softmax-cce-adam"]
    assert (r.train, r.val, r.test, r.roc_auc, r.n_test) == (0.9512, 0.875, 0.8805, 0.9612, 523)
    assert res["seed002-nogen-dropout"].state == "failed"
    assert res["seed002-nogen-dropout"].test is None  # never the baseline's figures
    assert res["seed002-sigmoid-bce-rmsprop"].state == "queued"
    assert "seed002-gen-dropout" not in res


def test_report_markdown(tmp_path):
    show = tmp_path / "show.json"
    show.write_text(json.dumps(exp_show_json()))
    out = tmp_path / "reports" / "ablations.md"
    A.main(["report", "--out", str(out), "--show-json", str(show),
            "--names", *X.SEED002_ROWS, "seed002-to-be", "seed002-as-is"])  # fmt: skip
    text = out.read_text()
    lines = {ln.split("`")[-2]: ln for ln in text.splitlines() if ln.startswith("|") and "`" in ln}
    pub = X.get("seed002-softmax-cce-adam").published
    assert lines["seed002-softmax-cce-adam"].startswith("| softmax | categorical CE | Adam |")
    assert f"**0.9512** / {pub.train_accuracy:.4f}" in lines["seed002-softmax-cce-adam"]
    assert f"**0.8805** / {pub.test_accuracy:.4f}" in lines["seed002-softmax-cce-adam"]
    assert "| 0.9612 |" in lines["seed002-softmax-cce-adam"]
    rev = next(
        e["revs"][0]["rev"]
        for b in exp_show_json()
        for e in b["experiments"] or []
        if e["name"] == "seed002-softmax-cce-adam"
    )  # fmt: skip  (the newest run's)
    assert lines["seed002-softmax-cce-adam"].endswith(f"`seed002-softmax-cce-adam` ({rev[:7]}) |")
    assert "| failed |" in lines["seed002-nogen-dropout"]
    assert "| queued |" in lines["seed002-sigmoid-bce-rmsprop"]
    assert "| not run |" in lines["seed002-gen-dropout"]
    assert lines["seed002-to-be"].startswith("| TO-BE | **0.9600** / 0.9758")
    assert "seed002-as-is" not in lines  # the systems table lists only what ran
    assert "0.3333" not in text and "0.1111" not in text  # baseline figures never leak in
    assert "523 images" in text and "patient-grouped hold-out" in text
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "`seed002" in ln]
    assert len({ln.count("|") for ln in table_rows if ln.count("|") > 8}) == 1


# ----------------------------------------------------------------------------- end to end


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, timeout=60)


@pytest.mark.slow
def test_queue_run_report_end_to_end(tmp_path, tmp_path_factory):
    """Two tiny seed 002 rows (one is the TO-BE twin: run-cached) through the real DVC queue, then
    scored as an ensemble as `stages.repeat --ensemble` does. The runs start from a copy of the
    session's built pipeline, as a team's queue starts from a commit whose outputs are cached:
    the chains the rows leave alone are checked out, not run again."""
    repo, data_root = tmp_path / "repo", tmp_path / "data"
    for folder in ("kermany224", "kermany_test_public", "lung_masks"):
        (data_root / folder).mkdir(parents=True)
    shutil.copytree(built_repo(tmp_path_factory).path, repo, symlinks=True)
    env = tool_env()

    names = ["seed002-to-be", "seed002-gen-dropout"]
    tiny = ["data.classification.source=synthetic", "data.classification.sources=[]",
            "augment.classification.image_size=48", "train_classifier.epochs=1",
            "data.segmentation.source=synthetic", "data.segmentation.sources=[]",
            "train_segmenter.epochs=1", "evaluate.classification.bootstrap=0",
            "evaluate.classification.n_samples_grid=0", "evaluate.classification.n_gradcam=0"]  # fmt: skip

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "stages.tools.ablations", *args, "--names", *names],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=220)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    try:
        cli("queue", "--data-root", str(data_root), *(f"--set={s}" for s in tiny))
        # the default poll (10 s): each poll is a `dvc queue status` process, which at 3 s took
        # a fifth of the core the runs share and slowed them more than the longer wait costs
        cli("run", "--workers", "1", "--timeout", "200")
        cli("report", "--out", "reports/ablations.md")
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo, env=env,
                       capture_output=True, timeout=60)  # fmt: skip
    text = (repo / "reports" / "ablations.md").read_text()
    res = A.collect(json.loads(subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, env=env,
        capture_output=True, text=True, check=True).stdout), names)  # fmt: skip
    assert {n: r.state for n, r in res.items()} == dict.fromkeys(names, "success")
    for name in names:
        r = res[name]
        assert r.test is not None and r.roc_auc is not None and r.params is not None
        assert get_section(r.params, "train_classifier.epochs") == 1
        assert f"**{r.test:.4f}** / 0.9311" in text
    # the twin has the TO-BE's params, so DVC restored the trained model instead of training
    assert res[names[0]].test == res[names[1]].test

    # `stages.repeat --ensemble`'s scoring of finished runs in a workspace that never ran them:
    # the first run's cache parts and lungs meter checked out, each run's model read from the
    # DVC cache at its commit. Two copies of one model average to that model.
    code = ("import json; from stages.tools.repeat import ensemble; "
            f"print(json.dumps(ensemble({names!r})))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=220)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ens = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in (repo / "models" / "ensemble").glob("*.keras")) == [
        f"{n}.keras" for n in sorted(names)
    ]
    assert ens["accuracy"] == pytest.approx(res[names[0]].test, abs=1e-9)
    assert ens["roc_auc"] == pytest.approx(res[names[0]].roc_auc, abs=1e-9)
    assert isinstance(ens["n_test"], int) and ens["n_test"] > 0
    assert 0.0 <= ens["cam_in_lungs"] <= 1.0  # the lungs meter came with the first run


# ----------------------------------------------------------------------------- repeat / scoreboard


def _run_exp(name: str, acc: float, auc: float, spec: float, stamp: str, drop=None) -> dict:
    metrics = {"metrics/classifier.json": {"data": {"accuracy": acc, "roc_auc": auc,
               "specificity": spec, "sensitivity": 0.9}}}  # fmt: skip
    reports = {"reports/classifier/evaluation.json": {"n_test": 312}}
    if drop is not None:  # the training run's hold-out figures
        reports["reports/live/classifier/training.json"] = {"val_accuracy": acc + 0.1,
                    "val_auc": 0.99, "val_accuracy_max_drop": drop}  # fmt: skip
    import hashlib

    rev = (name.encode().hex()[:34] + hashlib.sha1(name.encode()).hexdigest())[:40]
    exp = _exp(name, "success", {**metrics, "_reports": reports}, rev=rev)
    exp["revs"][0]["data"]["timestamp"] = stamp
    return exp


def test_repeat_reports_each_seed_mean_sd_and_the_ensemble(monkeypatch, tmp_path):
    from stages.tools import repeat as R

    batch = R.runs("ours-kermany-best", [1, 2, 3])
    assert [r.name for r in batch] == [f"ours-kermany-best-seed{s}" for s in (1, 2, 3)]
    assert batch[1].extra == ("train_classifier.seed=2",)
    show = [{"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": [
        _run_exp("ours-kermany-best-seed1", 0.80, 0.90, 0.70, "2026-01-01T00:10:00", 0.02),
        _run_exp("ours-kermany-best-seed2", 0.90, 0.94, 0.80, "2026-01-01T00:20:00", 0.04),
        _run_exp("ours-kermany-best-seed3", 0.85, 0.92, 0.90, "2026-01-01T00:30:00", 0.09),
    ]}]  # fmt: skip
    results = R.collect(show, [r.name for r in batch])
    assert results["ours-kermany-best-seed2"]["accuracy"] == 0.90
    m, sd = R.mean_sd([0.80, 0.90, 0.85])
    assert m == pytest.approx(0.85) and sd == pytest.approx(0.05)
    text = R.render("ours-kermany-best", results, {"accuracy": 0.88, "roc_auc": 0.95,
                    "specificity": 0.85, "sensitivity": 0.9, "n_test": 312}, seeds=[1, 2, 3])  # fmt: skip
    assert "| mean +- sd (3 seeds) | 0.850 +- 0.050 | 0.920 +- 0.020 | 0.800 +- 0.100 |" in text
    # the report names the command that wrote it, seeds and ensemble included
    assert "`python -m stages.repeat ours-kermany-best --seeds 1 2 3 --ensemble`" in text
    one = R.render("ours-kermany-best", {k: results[k] for k in ["ours-kermany-best-seed2"]},
                   None, seeds=[2])  # fmt: skip
    assert "`python -m stages.repeat ours-kermany-best --seeds 2`" in one
    assert "mean +- sd" not in one and "| `ours-kermany-best-seed2` |" in one
    # the hold-out beside the test: val accuracy (test + 0.1 here), val AUC, the largest drop
    row = next(line for line in text.splitlines() if line.startswith("| `ours-kermany-best-seed3`"))
    assert row.endswith("| 0.9500 | 0.9900 | 0.0900 |"), row
    assert text.count("| 0.950 +- 0.050 | 0.990 +- 0.000 | 0.050 +- 0.036 |") == 1, text
    assert "| ensemble of 3 (mean probability) | 0.8800 | 0.9500 | 0.8500 |" in text
    assert R.experiment_revs(show)["ours-kermany-best-seed3"].startswith("6f7572")
    # the printed recipe is the one tool command
    assert X.commands("ours-kermany-best", "/d") == [
        "python -m stages.weights efficientnet_lite0",  # its ImageNet weights, fetched once
        "python -m stages.repeat ours-kermany-best --seeds 1 2 3 --data-root /d --ensemble",
    ]
    # both PneumoniaMNIST recipes, the proxy included, print the same three seeds' ensemble
    for name in ("ours-pneumoniamnist", "ours-pneumoniamnist-public-half"):
        assert X.commands(name, "/d") == [
            f"python -m stages.repeat {name} --seeds 1 2 3 --data-root /d --ensemble"
        ]


def test_repeat_variant_runs_are_named_by_tag_and_queue_their_overrides(monkeypatch, tmp_path):
    """--set changes every seed's run (before the seed), --tag names the runs and the report;
    a typo'd key, a --set without a tag, a seed override or a bad tag stop before queuing."""
    from stages.tools import queue as Q
    from stages.tools import repeat as R

    over = ["augment.classification.image_size=64", "train_classifier.epochs=20"]
    batch = R.runs("ours-kermany-best", [1, 2], over, "64px")
    assert [r.name for r in batch] == [
        "ours-kermany-best-64px-seed1",
        "ours-kermany-best-64px-seed2",
    ]
    assert batch[1].extra == (*over, "train_classifier.seed=2")
    argv = Q.queue_argv(batch[0], "/d")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    # the recipe's own 150 px is replaced in place (DVC keeps only the last -S of a key)
    assert "augment.classification.image_size=64" in sets
    assert "augment.classification.image_size=150" not in sets
    assert sets[-1] == "train_classifier.seed=1" and argv[4] == "ours-kermany-best-64px-seed1"
    with pytest.raises(StageError, match="--tag"):
        R.runs("ours-kermany-best", [1], over)
    with pytest.raises(StageError, match="--seeds"):
        R.runs("ours-kermany-best", [1], ["train_classifier.seed=7"], "s7")
    with pytest.raises(StageError, match="letters"):
        R.runs("ours-kermany-best", [1], over, "64 px")
    Q.check_params(batch, "/d")  # the schemas accept both keys
    with pytest.raises(StageError, match="unknown key.*'epoch'"):
        Q.check_params([Q.Run("x", "ours-kermany-best", ("train_classifier.epoch=20",))], "/d")
    with pytest.raises(StageError, match="key=value"):
        Q.merge_overrides([], ["train_classifier.epochs"])
    # the report says what changed and how to run it again
    show = [{"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": [
        _run_exp("ours-kermany-best-64px-seed2", 0.82, 0.90, 0.70, "2026-01-01T00:30:00", 0.02),
        _run_exp("ours-kermany-best-64px-seed1", 0.80, 0.90, 0.70, "2026-01-01T00:10:00", 0.02),
        _run_exp("ours-kermany-best-seed1", 0.10, 0.10, 0.10, "2026-01-01T00:20:00", 0.02),
    ]}]  # fmt: skip
    monkeypatch.setattr(Q, "exp_show", lambda *a, **k: show)
    monkeypatch.setattr(R.paths, "REPORTS", tmp_path)
    argv = ["ours-kermany-best", "--seeds", "1", "2", "--report-only", "--tag", "64px"]
    R.main([*argv, "--set", over[0]])
    text = (tmp_path / "repeats" / "ours-kermany-best-64px.md").read_text()
    assert text.startswith("# `ours-kermany-best-64px` over training seeds")
    assert "--set augment.classification.image_size=64 --tag 64px" in text
    assert "`ours-kermany-best-64px-seed1` | 0.8000" in text and "0.1000" not in text
    # rows in seed order, whatever order the runs finished in
    assert text.index("64px-seed1`") < text.index("64px-seed2`")


def test_recipes_on_fetchable_imagenet_weights_fetch_them_first(monkeypatch):
    """A recipe (or a --set variant) on efficientnet_lite0 + imagenet gets its weights fetched
    before anything is queued; bases whose weights cannot be fetched here, or none, do not."""
    from stages.tools import queue as Q
    from stages.tools import repeat as R

    real_get = X.get
    lite = [
        ("train_classifier.arch", "efficientnet_lite0"),
        ("train_classifier.weights", "imagenet"),
    ]
    assert X.pretrained(lite) == ["efficientnet_lite0"]
    assert X.pretrained([lite[0], ("train_classifier.weights", "none")]) == []
    assert X.pretrained([("train_classifier.arch", "vgg16"), lite[1]]) == []
    monkeypatch.setattr(X, "get", lambda name: dataclasses.replace(real_get(name), set_params=lite))
    assert X.commands("ours-kermany-best", "/d")[0] == "python -m stages.weights efficientnet_lite0"
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(R.W, "fetch", lambda arch: calls.append(f"fetch {arch}"))

    def queue(*args, **kw):
        calls.append("queue")
        raise StageError("stopped here")

    monkeypatch.setattr(Q, "queue", queue)
    sets = ["--set", "train_classifier.arch=efficientnet_lite0", "--set", lite[1][0] + "=imagenet"]
    with pytest.raises(StageError, match="stopped here"):
        R.main(["ours-kermany-best", "--seeds", "1", *sets, "--tag", "lite"])
    assert calls == ["fetch efficientnet_lite0", "queue"]
    calls.clear()
    with pytest.raises(StageError, match="stopped here"):
        R.main(["ours-kermany-best", "--seeds", "1"])
    assert calls == (
        ["fetch efficientnet_lite0"]
        if X.pretrained(real_get("ours-kermany-best").set_params)
        else []
    ) + ["queue"]


def test_scoreboard_report_only_keeps_the_measured_times_and_their_machine(monkeypatch, tmp_path):
    from stages.common import paths
    from stages.tools import queue as Q
    from stages.tools import scoreboard as S

    show = [{"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": [
        _run_exp("board-seed002-to-be", 0.85, 0.93, 0.70, "2026-01-01T01:10:00"),
    ]}]  # fmt: skip
    # the runs belong to an older commit than HEAD: only `dvc exp show -A` lists them
    monkeypatch.setattr(Q, "exp_show", lambda all_commits=False: show if all_commits else [])
    monkeypatch.setattr(paths, "REPORTS", tmp_path)
    (tmp_path / "seeds_wall_times.json").write_text(
        '{"machine": "AMD EPYC 9B14, 2 cores, 2026-01-01", "seconds": {"board-seed002-to-be": 600}}'
    )
    S.main(["--report-only", "--names", "seed002-to-be"])
    text = (tmp_path / "seeds.md").read_text()
    assert "10.0 min" in text and "(AMD EPYC 9B14, 2 cores, 2026-01-01)." in text
    kept = json.loads((tmp_path / "seeds_wall_times.json").read_text())
    assert kept == {"machine": "AMD EPYC 9B14, 2 cores, 2026-01-01",
                    "seconds": {"board-seed002-to-be": 600}}  # fmt: skip


def _board_results(as_is_done: str, to_be_done: str) -> dict:
    """The scoreboard's collected results of 002 AS-IS and TO-BE finishing at those times."""
    from stages.tools import scoreboard as S

    show = [{"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": [
        _run_exp("board-seed002-as-is", 0.70, 0.80, 0.50, as_is_done),
        _run_exp("board-seed002-to-be", 0.85, 0.93, 0.70, to_be_done),
    ]}]  # fmt: skip
    return S.collect(show, ["board-seed002-to-be", "board-seed002-as-is"])


def test_scoreboard_partial_rerun_keeps_each_runs_machine():
    """--names re-runs one system on another CPU: the older time keeps its machine, the report
    marks which time came from where; one machine for all prints as before."""
    from stages.tools import scoreboard as S

    old = {
        "machine": "AMD EPYC, 2026-01-01",
        "seconds": {"board-seed002-to-be": 600, "board-seed002-as-is": 300},
    }  # fmt: skip  (a file from before "machines")
    merged = S.merge_timing(old, {"board-seed002-as-is": 240.0}, "Intel Xeon, 2026-02-02")
    assert merged["seconds"] == {"board-seed002-to-be": 600, "board-seed002-as-is": 240.0}
    assert merged["machines"] == {"board-seed002-to-be": "AMD EPYC, 2026-01-01",
                                  "board-seed002-as-is": "Intel Xeon, 2026-02-02"}  # fmt: skip
    assert merged["machine"] == "Intel Xeon, 2026-02-02"
    assert S.merge_timing(merged, {}, "")["machines"] == merged["machines"]  # report-only
    names = ["seed002-to-be", "seed002-as-is"]
    results = _board_results("2026-02-02T01:30:00", "2026-01-01T01:10:00")
    text = S.render(results, merged["seconds"], names, merged["machines"])
    assert "10.0 min [a] |" in text and "4.0 min [b] |" in text
    assert "Total wall time: 14 min ([a] AMD EPYC, 2026-01-01; [b] Intel Xeon, 2026-02-02)." in text
    # a call that ran only as-is: to-be finished before it started and is not re-timed
    from datetime import datetime

    start = datetime.fromisoformat("2026-02-02T01:26:00").timestamp()
    assert S.measured_now(results, [f"board-{n}" for n in names], start) == {
        "board-seed002-as-is": 240.0
    }
    assert S.measured_now(results, [f"board-{n}" for n in names], None) == {}
    same = S.merge_timing(old, {}, "")
    text = S.render(results, same["seconds"], names, same["machines"])
    assert "[a]" not in text and "Total wall time: 15 min (AMD EPYC, 2026-01-01)." in text


def test_scoreboard_table_and_wall_times():
    from stages.tools import scoreboard as S

    names = ["seed002-to-be", "seed002-as-is"]
    results = _board_results("2026-01-01T01:30:00", "2026-01-01T01:10:00")
    from datetime import datetime

    start = datetime.fromisoformat("2026-01-01T01:00:00").timestamp()
    walls = S.wall_times(results, [f"board-{n}" for n in names], start)
    assert walls == {"board-seed002-to-be": 600.0, "board-seed002-as-is": 1200.0}
    text = S.render(results, walls, names)
    row = next(line for line in text.splitlines() if "`seed002-to-be`" in line)
    assert "official test, public half (312)" in row and "| 0.850 | 0.930 | 0.700 |" in row
    assert "test acc 0.9311" in row and "10.0 min" in row
    assert "Total wall time: 30 min." in text
    # the machine the times were measured on goes beside the total
    cpu = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx\n"
    assert S.machine(cpu).startswith("AMD EPYC 9B14, ") and S.machine(cpu).endswith(" cores")
    assert S.machine("flags : avx\n").startswith("unknown CPU, ")
    where = "AMD EPYC 9B14, 2 cores, 2026-01-01"
    assert "Total wall time: 30 min (AMD EPYC 9B14, 2 cores, 2026-01-01)." in S.render(
        results, walls, names, where
    )
    assert set(S.SCOREBOARD) == {"seed000-cnn5", "seed001-cnn", "seed002-as-is", "seed002-to-be",
                                 "seed003-vgg16-binary", "seed003-vgg16-3class",
                                 "seed003-vgg16-4class"}  # fmt: skip


def test_ablations_report_names_the_data_the_runs_trained_on():
    """The report's Data line reads the recipes' `sources` list (it once read `source` and wrote
    "synthetic" for rows trained on Kermany)."""
    params = X.resolved_params("seed002-to-be", "/d")
    text = A.data_sources(params)
    assert text == (
        "`kermany` from `/d/kermany224`, `kermany` from `/d/kermany_test_public` (test)"
    ), text
    assert "synthetic" not in text
    plain = {"data": {"root": "data/inputs", "classification": {"source": "synthetic"}}}
    assert A.data_sources(plain) == "`synthetic`"
