"""Downloads (served from 127.0.0.1: resume, checksums, Range ignored, offline) and safe extraction."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import socket
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stages.common import fetch
from stages.common.fetch import NetworkError, download, resolve, safe_extract
from stages.common.utils import StageError

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, position-dependent so a bad resume shows


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: int | None = None  # bytes of body sent before the connection is cut (once)
    ignore_range: bool = False
    requests: list[dict[str, str | None]] = field(default_factory=list)
    etag: bool = False  # send an ETag (a hash of the body) and answer If-None-Match with 304
    head: bool = False  # answer HEAD (else 501, as BaseHTTPRequestHandler does)
    heads: list[str] = field(default_factory=list)  # paths asked for with HEAD


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # socket timeout per connection, so a stuck client never hangs the test
    state: ServerState

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def do_HEAD(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        state.heads.append(self.path)
        body = state.files.get(self.path)
        if not state.head or body is None:
            self.send_error(501 if not state.head else 404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if state.etag:
            self.send_header("ETag", _etag(body))
        self.end_headers()

    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        state.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if state.etag and self.headers.get("If-None-Match") == _etag(body):
            self.send_response(304)
            self.end_headers()
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if state.etag:
            self.send_header("ETag", _etag(body))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        chunk = body[start:]
        if state.cut_after is not None:
            chunk, state.cut_after = chunk[: state.cut_after], None
            self.close_connection = True
        self.wfile.write(chunk)
        self.wfile.flush()


@contextlib.contextmanager
def serving(state: ServerState) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``state`` until the block ends; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState(files={"/data.bin": PAYLOAD})
    with serving(state) as url:
        yield url, state


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


# -------------------------------------------------------------------------------------- download
def test_full_download_with_sha256_then_cached(server, tmp_path):
    url, state = server
    dest = download(f"{url}/data.bin", tmp_path / "d" / "data.bin", sha256=SHA, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_suffix(".bin.part").exists()
    n = len(state.requests)
    assert download(f"{url}/data.bin", dest, sha256=SHA, timeout=5) == dest
    assert len(state.requests) == n  # no network when dest is already there and matches


def test_interrupted_download_resumes(server, tmp_path):
    url, state = server
    state.cut_after = 30_000
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    with pytest.raises(NetworkError, match="broke off"):
        download(f"{url}/data.bin", dest, sha256=SHA, timeout=5, chunk=4096, retries=0)
    assert part.stat().st_size == 30_000 and not dest.exists()
    download(f"{url}/data.bin", dest, sha256=SHA, timeout=5, chunk=4096)
    assert state.requests[-1]["range"] == "bytes=30000-"
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_retries_resume_within_one_call(server, tmp_path):
    url, state = server
    state.cut_after = 10_000
    dest = download(f"{url}/data.bin", tmp_path / "data.bin", md5=MD5, timeout=5, retries=1)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in state.requests] == [None, "bytes=10000-"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / "data.bin"
    with pytest.raises(StageError) as info:
        download(f"{url}/data.bin", dest, sha256="0" * 64, timeout=5)
    assert "0" * 64 in str(info.value) and SHA in str(info.value)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()


def test_md5_checked(server, tmp_path):
    url, _ = server
    assert download(f"{url}/data.bin", tmp_path / "a.bin", md5=MD5, timeout=5).is_file()
    with pytest.raises(StageError, match="md5 mismatch"):
        download(f"{url}/data.bin", tmp_path / "b.bin", md5="f" * 32, timeout=5)
    assert not (tmp_path / "b.bin").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url, state = server
    state.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(b"x" * 5000)  # stale partial file
    dest = download(f"{url}/data.bin", tmp_path / "data.bin", sha256=SHA, timeout=5)
    assert state.requests[0]["range"] == "bytes=5000-"  # asked to resume, got a 200
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_and_http_errors(server, tmp_path):
    url, state = server
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # finished, but never renamed
    assert download(f"{url}/data.bin", tmp_path / "data.bin", sha256=SHA).read_bytes() == PAYLOAD
    assert state.requests[-1]["range"] == f"bytes={len(PAYLOAD)}-"  # answered 416: whole already
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD + b"junk")  # longer than the file: restart
    assert download(f"{url}/data.bin", tmp_path / "b.bin", sha256=SHA).read_bytes() == PAYLOAD
    assert [r["range"] for r in state.requests[-2:]] == [f"bytes={len(PAYLOAD) + 4}-", None]
    with pytest.raises(NetworkError, match="404"):
        download(f"{url}/missing.zip", tmp_path / "missing.zip", timeout=5)


def test_unreachable_url_names_param(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/chest_xray.zip"
    with pytest.raises(StageError) as info:
        resolve(url, tmp_path, what="the Kermany archive", param="data.classification.path")
    msg = str(info.value)
    assert "data.classification.path" in msg and "the Kermany archive" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- safe_extract
def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            body = data.get(info.name)
            if body is not None:
                info.size = len(body)
            tf.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _assert_refused(archive: Path, work: Path, match: str, **kw) -> None:
    with pytest.raises(StageError, match=match):
        safe_extract(archive, work / "out", **kw)
    assert sorted(p.name for p in work.iterdir()) == []  # no dest, no temp dir, nothing outside


def test_zip_slip_and_absolute_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    evil = _zip(tmp_path / "evil.zip", {"ok.txt": b"fine", "../evil.txt": b"pwned"})
    _assert_refused(evil, work, "unsafe member path")
    assert not (tmp_path / "evil.txt").exists()
    backslash = _zip(tmp_path / "bs.zip", {"..\\..\\evil.txt": b"pwned"})
    _assert_refused(backslash, work, "unsafe member path")
    absolute = _zip(tmp_path / "abs.zip", {"/tmp/abs_evil.txt": b"pwned"})
    _assert_refused(absolute, work, "unsafe member path")
    tar_abs = _tar(tmp_path / "abs.tar.gz", [tarfile.TarInfo("/tmp/x")], {"/tmp/x": b"p"})
    _assert_refused(tar_abs, work, "unsafe member path")


def test_tar_links_and_devices_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    _assert_refused(_tar(tmp_path / "s.tar.gz", [_link("etc", "/etc")]), work, "symlink")
    _assert_refused(_tar(tmp_path / "r.tar.gz", [_link("a/up", "../../x")]), work, "symlink")
    hard = _tar(tmp_path / "h.tar.gz", [_link("h", "../outside", tarfile.LNKTYPE)])
    _assert_refused(hard, work, "unsafe member path")
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    _assert_refused(_tar(tmp_path / "d.tar.gz", [dev]), work, "special file")


def _zip_link(path: Path, name: str, target: str) -> Path:
    """A zip holding one symbolic link ``name`` -> ``target`` (as Info-ZIP stores links)."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the mode bits below are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr(info, target)
    return path


@pytest.mark.parametrize("target", ["../../x", "../a/../../x", "/etc/passwd"])
def test_zip_and_tar_links_escaping_the_root_are_refused_relative_or_absolute(tmp_path, target):
    work = tmp_path / "work"
    work.mkdir()
    _assert_refused(_zip_link(tmp_path / "l.zip", "a/up", target), work, "link a/up")
    _assert_refused(_tar(tmp_path / "l.tar.gz", [_link("a/up", target)]), work, "symlink a/up")


def test_zip_and_tar_links_inside_the_root_are_kept(tmp_path):
    out = safe_extract(_zip_link(tmp_path / "in.zip", "a/same", "../ok.txt"), tmp_path / "z")
    assert (out / "a/same").read_bytes() == b"../ok.txt"  # zipfile writes the link as text
    infos = [tarfile.TarInfo("ok.txt"), _link("a/same", "../ok.txt")]
    out = safe_extract(_tar(tmp_path / "in.tar.gz", infos, {"ok.txt": b"fine"}), tmp_path / "t")
    assert (out / "a/same").read_bytes() == b"fine"


def test_zip_bomb_and_limits_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bomb = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(8 << 20)})
    assert bomb.stat().st_size < (8 << 20) / 200
    _assert_refused(bomb, work, "compression ratio")
    small = _zip(tmp_path / "small.zip", {f"{i}.txt": b"abc" for i in range(5)})
    _assert_refused(small, work, "more than 4 members", max_files=4)
    _assert_refused(small, work, "bytes uncompressed", max_total_bytes=10)


def test_normal_zip_and_tar_extracted(tmp_path):
    members = {"chest_xray/train/NORMAL/a.jpeg": b"A" * 100, "chest_xray/b.txt": b"B"}
    out = safe_extract(_zip(tmp_path / "ok.zip", members), tmp_path / "zip_out")
    for name, body in members.items():
        assert (out / name).read_bytes() == body
    infos = [tarfile.TarInfo(n) for n in members] + [_link("chest_xray/lnk", "b.txt")]
    out = safe_extract(_tar(tmp_path / "ok.tar.gz", infos, members), tmp_path / "tar_out")
    assert (out / "chest_xray/train/NORMAL/a.jpeg").read_bytes() == b"A" * 100
    assert (out / "chest_xray/lnk").read_bytes() == b"B"  # a link inside the tree is fine


# ---------------------------------------------------------------------------------------- resolve
def test_resolve_folder_file_and_missing(tmp_path):
    folder = tmp_path / "kermany"
    folder.mkdir()
    npz = tmp_path / "x.npz"
    npz.write_bytes(b"npz")
    kw = {"what": "the PneumoniaMNIST npz", "param": "data.classification.path"}
    got = resolve(str(folder), tmp_path / "w", **kw)
    assert got == fetch.Fetched(folder, {"kind": "folder", "path": str(folder)})
    got = resolve(str(npz), tmp_path / "w", **kw)
    assert got.path == npz and got.origin["kind"] == "file"
    assert got.origin["sha256"] == hashlib.sha256(b"npz").hexdigest()
    for missing in (str(tmp_path / "nope.zip"), None):
        with pytest.raises(StageError) as info:
            resolve(missing, tmp_path / "w", **kw)
        assert "data.classification.path" in str(info.value)
        assert "the PneumoniaMNIST npz" in str(info.value)


def test_resolve_local_paths_relative_to_root_and_inside_it(tmp_path):
    root = tmp_path / "inputs"
    (root / "kermany").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    kw = {
        "what": "Kermany",
        "param": "data.classification.path",
        "root": root,
        "root_param": "data.classification.root",
    }
    assert resolve("kermany", tmp_path / "w", **kw).path == root / "kermany"
    assert resolve(str(root / "kermany"), tmp_path / "w", **kw).path == root / "kermany"
    for outside in (str(tmp_path / "elsewhere"), "../elsewhere", "link"):
        with pytest.raises(StageError) as info:
            resolve(outside, tmp_path / "w", **kw)
        msg = str(info.value)
        assert "\n" not in msg and "data.classification.root" in msg, msg
        assert f"data.classification.path = {outside!r} is outside" in msg
    assert "symbolic link" in msg  # the last one is lexically inside, really outside
    assert not (tmp_path / "w").exists()


def test_resolve_local_checksum(tmp_path):
    archive = _zip(tmp_path / "set.zip", {"train/NORMAL/a.png": b"png"})
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    kw = {"what": "set", "param": "data.classification.path", "root": tmp_path}
    got = resolve("set.zip", tmp_path / "w", sha256=sha, **kw)
    assert got.origin == {
        "kind": "file",
        "path": str(archive),
        "sha256": sha,
        "verified": ["sha256"],
    }
    with pytest.raises(StageError, match=r"data\.classification\.path: md5 mismatch for set\.zip"):
        resolve("set.zip", tmp_path / "w", md5="0" * 32, **kw)


def test_resolve_archive_extracts_once(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "ChestXRay2017.zip", {"chest_xray/test/x.jpeg": b"x"})
    work = tmp_path / "work"
    kw = {"what": "Kermany", "param": "data.classification.path"}
    out = resolve(str(archive), work, **kw).path
    key = fetch.url_key(str(archive.resolve()))
    assert out == work / "extracted" / key / "ChestXRay2017"
    assert (out / "chest_xray/test/x.jpeg").read_bytes() == b"x"
    calls = []
    real = fetch.safe_extract
    monkeypatch.setattr(fetch, "safe_extract", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert resolve(str(archive), work, **kw).path == out and calls == []  # re-used
    _zip(archive, {"chest_xray/test/y.jpeg": b"y"})  # the archive changed: extract again
    out = resolve(str(archive), work, **kw).path
    assert len(calls) == 1 and (out / "chest_xray/test/y.jpeg").exists()
    assert not (out / "chest_xray/test/x.jpeg").exists()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def test_resolve_default_url_downloads_then_revalidates(server, tmp_path):
    url, state = server
    body = _zip_bytes({"train/NORMAL/a.png": b"png"})
    state.files["/sets/set%201.zip"] = body
    kw = {"what": "set", "param": "data.detection.path", "default_url": f"{url}/sets/set%201.zip"}
    got = resolve(None, tmp_path, **kw)
    folder = tmp_path / fetch.url_key(f"{url}/sets/set%201.zip")
    assert got.path == folder / "set_1" and (got.path / "train/NORMAL/a.png").read_bytes() == b"png"
    assert got.origin == {
        "kind": "url",
        "url": f"{url}/sets/set%201.zip",
        "file": str(folder / "set_1.zip"),
        "sha256": hashlib.sha256(body).hexdigest(),
        "bytes": len(body),
        "verified": [],
    }
    n = len(state.requests)
    assert resolve(None, tmp_path, **kw).path == got.path
    # no checksum: revalidated; this server refuses HEAD, so one GET whose body is not read
    assert state.heads == ["/sets/set%201.zip"] and len(state.requests) == n + 1


def test_resolve_url_keyed_by_url(server, tmp_path):
    url, state = server
    state.files["/v1/data.zip"] = _zip_bytes({"a.png": b"v1"})
    state.files["/v2/data.zip"] = _zip_bytes({"b.png": b"v2"})
    kw = {"what": "set", "param": "data.classification.path"}
    v1 = resolve(f"{url}/v1/data.zip", tmp_path, **kw)
    v2 = resolve(f"{url}/v2/data.zip", tmp_path, **kw)
    assert v1.path != v2.path and v1.path.name == v2.path.name == "data"
    assert sorted(p.name for p in v2.path.iterdir()) == ["b.png"]
    assert [r["path"] for r in state.requests] == ["/v1/data.zip", "/v2/data.zip"]


def test_resolve_refetches_cached_download_failing_checksum_or_extraction(server, tmp_path):
    url, state = server
    body = _zip_bytes({"a.png": b"good"})
    state.files["/d.zip"] = body
    sha = hashlib.sha256(body).hexdigest()
    kw = {"what": "set", "param": "data.classification.path"}
    got = resolve(f"{url}/d.zip", tmp_path, sha256=sha, **kw)
    cached = got.origin["file"]
    Path(cached).write_bytes(b"corrupt")  # damaged in the cache; the checksum param catches it
    got = resolve(f"{url}/d.zip", tmp_path, sha256=sha, **kw)
    assert Path(cached).read_bytes() == body and len(state.requests) == 2
    assert got.origin["verified"] == ["sha256"]
    Path(cached).write_bytes(b"not a zip")  # no checksum given: the failed extraction catches it
    got = resolve(f"{url}/d.zip", tmp_path, **kw)
    assert Path(cached).read_bytes() == body and len(state.requests) == 3
    assert (got.path / "a.png").read_bytes() == b"good"
    state.files["/d.zip"] = b"never a zip"  # broken at the source: fails twice, one line
    Path(cached).write_bytes(b"junk")
    with pytest.raises(StageError, match=r"downloaded twice from .*/d\.zip") as info:
        resolve(f"{url}/d.zip", tmp_path, **kw)
    assert "\n" not in str(info.value) and len(state.requests) == 5


# ------------------------------------------------- a URL without checksum whose file is replaced
def _png_bytes(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("L", (16, 16), bytes((i * 7 + value * 31) % 256 for i in range(256))).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _image_folder_zip(n: int, first: int = 0) -> bytes:
    """A ``folder`` source archive of ``n`` distinct images, half NORMAL, half PNEUMONIA."""
    labels = ("NORMAL", "PNEUMONIA")
    return _zip_bytes(
        {f"set/{labels[i % 2]}/img{i:03d}.png": _png_bytes(first + i) for i in range(n)}
    )


@pytest.mark.parametrize(
    "kind", ["etag and HEAD", "size only, HEAD refused"], ids=["etag", "size-only"]
)
def test_url_source_replaced_behind_the_same_url_is_noticed_without_checksum(
    tmp_path, caplog, kind
):
    """v1 (20 images) then v2 (8 images) at one URL, no sha256/md5 in params: the second run
    revalidates the cached download, fetches v2 and extracts it again; the report records the
    sha256 of what was used; offline, the cached file is used with a warning naming it."""
    from stages import download as download_stage
    from stages.common.config import parse
    from stages.sources.config import ClassificationData

    v1, v2 = _image_folder_zip(20), _image_folder_zip(8, first=100)
    state = ServerState(files={"/data/set.zip": v1}, etag=kind == "etag and HEAD")
    state.head = state.etag

    def run(url: str) -> dict:
        data = {"root": str(tmp_path), "source": "folder", "path": f"{url}/data/set.zip"}
        cfg = parse(ClassificationData, data, "data.classification")
        return download_stage.run(cfg, "classification", tmp_path / "raw", tmp_path / "dl", 1)

    with serving(state) as url:
        first = run(url)
        assert first["total_images"] == 20
        assert first["sources"][0]["origin"]["sha256"] == hashlib.sha256(v1).hexdigest()
        n = len(state.requests)
        assert run(url)["total_images"] == 20  # unchanged: revalidated, not fetched again
        if state.head:
            assert len(state.requests) == n and state.heads == ["/data/set.zip"]
        state.files["/data/set.zip"] = v2  # replaced behind the same URL
        with caplog.at_level(logging.WARNING, logger="stages.common.fetch"):
            second = run(url)
        assert second["total_images"] == 8
        assert "changed on the server" in caplog.text
    origin = second["sources"][0]["origin"]
    assert origin["sha256"] == hashlib.sha256(v2).hexdigest() and origin["bytes"] == len(v2)
    assert origin["verified"] == []
    cached = Path(origin["file"])
    assert cached.read_bytes() == v2
    extracted = sorted(p.name for p in cached.with_suffix("").rglob("*.png"))
    assert len(extracted) == 8 and "img019.png" not in extracted  # v1's extraction is gone

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.common.fetch"):
        offline = run(url)  # the server is gone: the cached v2 is used, with one warning
    assert offline["total_images"] == 8
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "stages.common.fetch"]
    assert "cannot reach" in warning and str(cached) in warning and "\n" not in warning


def test_cached_download_changed_on_disk_or_server_same_size_is_fetched_again(tmp_path):
    state = ServerState(files={"/d.bin": PAYLOAD}, etag=True, head=True)
    with serving(state) as url:
        dest = download(f"{url}/d.bin", tmp_path / "d.bin", timeout=5)
        record = json.loads((tmp_path / ".d.bin.download.json").read_text())
        assert record["etag"] == _etag(PAYLOAD) and record["size"] == len(PAYLOAD)
        assert record["sha256"] == SHA and record["url"] == f"{url}/d.bin"
        same_size = bytes(reversed(PAYLOAD))
        state.files["/d.bin"] = same_size  # another file of the same size: the ETag tells
        assert download(f"{url}/d.bin", dest, timeout=5).read_bytes() == same_size
        n = len(state.requests)
        dest.write_bytes(b"edited in the cache")  # changed on disk: fetched again, no HEAD asked
        heads = len(state.heads)
        assert download(f"{url}/d.bin", dest, timeout=5).read_bytes() == same_size
        assert len(state.requests) == n + 1 and len(state.heads) == heads
        state.head = False  # HEAD refused: a conditional GET answered 304, nothing fetched
        n = len(state.requests)
        assert download(f"{url}/d.bin", dest, timeout=5).read_bytes() == same_size
        assert len(state.requests) == n + 1 and dest.stat().st_size == len(same_size)
