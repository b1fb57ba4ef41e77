"""Data identity through real DVC: a local data folder is a dependency of its download stage, and a
URL source is keyed by its URL and checksum (served from 127.0.0.1 by a thread of the test).

Inputs: temporary git+DVC copies of this repository (tests/dvc_helpers.make_repo) whose
classification source is a tiny Kermany-layout folder outside the repository (data root
``../xray``) or a zip served on loopback; no network, no real data. Outputs: none (pytest
temp dirs). Run: ``.venv/bin/python -m pytest tests/test_data_identity.py -q``.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import subprocess
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.common import fetch
from tests.conftest import shrink_params
from tests.dvc_helpers import (
    BIN,
    changed_stages,
    commit_all,
    dvc,
    git,
    make_repo,
    ran_stages,
    tool_env,
    tree_digest,
)

CLS = "download@classification"
DET = "download@detection"
# the loopback server must never be reached through a proxy of the environment
ENV = {**tool_env(), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def png_bytes(value: int, size: int = 12) -> bytes:
    """A tiny 8-bit gray PNG whose pixels differ for every ``value`` in 0..255."""
    arr = ((np.arange(size * size).reshape(size, size) + value * 37) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(value))
    return path


def kermany_zip(names: dict[str, int]) -> bytes:
    """A Kaggle-style archive: ``chest_xray/train/<CLASS>/<name>`` -> pixels of ``value``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, value in names.items():
            zf.writestr(f"chest_xray/train/{name}", png_bytes(value))
    return buf.getvalue()


def tiny_repo(tmp_path: Path, data: Callable[[dict], None]) -> Path:
    """make_repo with the shrunk params and ``data`` applied to ``params['data']``."""

    def shrink(params: dict) -> dict:
        shrink_params(params)
        params["data"]["detection"]["synthetic"].update(n_patients=4, image_size=64)
        data(params["data"])
        return params

    return make_repo(tmp_path / "repo", shrink)


def set_params(repo: Path, **classification) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["classification"].update(classification)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stale(repo: Path) -> set[str]:
    """The download stages `dvc status` lists as changed."""
    return changed_stages(repo, CLS, DET)


def manifest(repo: Path) -> pd.DataFrame:
    path = repo / "data/raw/classification/manifest.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def stems(repo: Path) -> list[str]:
    return sorted(Path(p).stem for p in manifest(repo)["path"])


def report(repo: Path) -> dict:
    return json.loads((repo / "data/raw/classification/report.json").read_text())


# ------------------------------------------------------------------------- local data folder
def test_local_folder_is_a_dependency_of_its_download_stage(tmp_path):
    xray = tmp_path / "xray"  # the data root, outside the repository (like ../shared/data)
    for i in range(3):
        write_png(xray / f"kermany/train/NORMAL/IM-{i:04d}-0001.png", i)
        write_png(xray / f"kermany/train/PNEUMONIA/person{i}_bacteria_{i}.png", 50 + i)

    def data(d: dict) -> None:
        d["root"] = "../xray"
        d["classification"].update(source="kermany", path="kermany")

    repo = tiny_repo(tmp_path, data)
    out = dvc(repo, "repro", CLS, DET)
    assert ran_stages(out) == {"check-params", CLS, DET}
    commit_all(repo, "downloaded")
    assert stale(repo) == set() and len(manifest(repo)) == 6
    assert report(repo)["sources"][0]["origin"] == {"kind": "folder", "path": "../xray/kermany"}
    # nothing of the data is copied into the repository (git or DVC tracked files)
    tracked = git(repo, "ls-files").splitlines()
    assert not [f for f in tracked if f.endswith((".png", ".dvc"))]

    added = write_png(xray / "kermany/train/NORMAL/IM-0009-0001.png", 99)
    # both download stages read data.root; the detection one finds its own output unchanged,
    # so nothing downstream of it re-runs (its chain is not invalidated)
    det_raw = tree_digest(repo, ["data/raw/detection"])
    assert stale(repo) == {CLS, DET}
    assert ran_stages(dvc(repo, "repro", CLS, DET)) == {CLS, DET}
    assert tree_digest(repo, ["data/raw/detection"]) == det_raw
    assert "IM-0009-0001" in stems(repo) and len(manifest(repo)) == 7

    kept = added.read_bytes()
    added.unlink()
    assert stale(repo) == {CLS, DET}
    added.write_bytes(kept)  # the same content back (new mtime): up to date, nothing to re-run
    assert stale(repo) == set()

    changed = xray / "kermany/train/PNEUMONIA/person1_bacteria_1.png"
    before = manifest(repo).set_index("path")["sha256"]
    write_png(changed, 200)  # same name, other pixels
    assert stale(repo) == {CLS, DET}
    assert ran_stages(dvc(repo, "repro", CLS, DET)) == {CLS, DET}
    after = manifest(repo).set_index("path")["sha256"]
    assert list(after.index) == list(before.index)
    assert sorted(Path(p).stem for p in after.index if after[p] != before[p]) == [
        "person1_bacteria_1"
    ]
    assert stale(repo) == set()


# ------------------------------------------------------------------------------- URL source
class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(self.path)  # type: ignore[attr-defined]
        body = server.files.get(self.path)  # type: ignore[attr-defined]
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def served() -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 in a thread of this test: ``.files`` (path -> bytes) served,
    ``.requests`` (paths asked for) recorded, ``.url`` its base address."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests = {}, []  # type: ignore[attr-defined]
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def run_stage(repo: Path) -> subprocess.CompletedProcess:
    """The download stage's own command line, outside DVC (what `dvc repro` would run)."""
    return subprocess.run(
        [str(BIN / "python"), "-m", "stages.download", "--task", "classification"],
        cwd=repo,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cached_file(repo: Path, url: str) -> Path:
    return repo / "data/downloads" / fetch.url_key(url) / "data.zip"


def test_url_source_keyed_by_url_and_checksum(tmp_path, served):
    v1 = kermany_zip({"NORMAL/IM-0001-0001.png": 1, "PNEUMONIA/person1_virus_1.png": 2})
    v2 = kermany_zip(
        {
            "NORMAL/IM-0002-0001.png": 3,
            "NORMAL/IM-0003-0001.png": 4,
            "PNEUMONIA/person2_virus_2.png": 5,
        }
    )
    served.files.update({"/v1/data.zip": v1, "/v2/data.zip": v2, "/v3/data.zip": v1})
    url1, url2, url3 = (f"{served.url}/v{i}/data.zip" for i in (1, 2, 3))
    sha2 = hashlib.sha256(v2).hexdigest()

    def data(d: dict) -> None:
        d["classification"].update(source="kermany", path=url1)

    repo = tiny_repo(tmp_path, data)
    assert ran_stages(dvc(repo, "repro", CLS, DET, env=ENV)) == {"check-params", CLS, DET}
    assert stems(repo) == ["IM-0001-0001", "person1_virus_1"]
    assert report(repo)["sources"][0]["origin"]["url"] == url1
    commit_all(repo, "v1")

    set_params(repo, path=url2, sha256=sha2)
    assert stale(repo) == {CLS}  # the URL is a param of download@classification only
    assert ran_stages(dvc(repo, "repro", CLS, DET, env=ENV)) == {"check-params", CLS}
    assert stems(repo) == ["IM-0002-0001", "IM-0003-0001", "person2_virus_2"]
    origin = report(repo)["sources"][0]["origin"]
    assert origin == {
        "kind": "url",
        "url": url2,
        "file": cached_file(repo, url2).relative_to(repo).as_posix(),
        "sha256": sha2,
        "bytes": len(v2),
        "verified": ["sha256"],
    }
    assert cached_file(repo, url1).read_bytes() == v1  # v1 kept under its own key, not reused
    assert served.requests == ["/v1/data.zip", "/v2/data.zip"]
    commit_all(repo, "v2")
    good_manifest = manifest(repo)

    # a wrong checksum: one clear line, no partial file, the stage's outputs untouched
    set_params(repo, path=url3, sha256=sha2)
    proc = run_stage(repo)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sha256 mismatch for data.zip: expected " + sha2)
    assert hashlib.sha256(v1).hexdigest() in last and "data.classification.path" in last
    assert not list((repo / "data/downloads").rglob("*.part"))
    assert not (repo / "data/downloads" / fetch.url_key(url3)).exists()
    pd.testing.assert_frame_equal(manifest(repo), good_manifest)

    # a corrupted cached download with the right checksum param: deleted and fetched again
    set_params(repo, path=url2, sha256=sha2)
    cached_file(repo, url2).write_bytes(b"corrupted in the cache")
    n = len(served.requests)
    proc = run_stage(repo)
    assert proc.returncode == 0, proc.stderr
    assert served.requests[n:] == ["/v2/data.zip"]
    assert cached_file(repo, url2).read_bytes() == v2
    pd.testing.assert_frame_equal(manifest(repo), good_manifest)

    # a cached archive that cannot be extracted (no checksum to catch it): fetched again
    set_params(repo, path=url2, sha256=None)
    cached_file(repo, url2).write_bytes(b"PK\x03\x04 not really a zip")
    n = len(served.requests)
    proc = run_stage(repo)
    assert proc.returncode == 0, proc.stderr
    assert served.requests[n:] == ["/v2/data.zip"]
    assert cached_file(repo, url2).read_bytes() == v2
    assert stems(repo) == ["IM-0002-0001", "IM-0003-0001", "person2_virus_2"]
    assert report(repo)["sources"][0]["origin"]["verified"] == []
