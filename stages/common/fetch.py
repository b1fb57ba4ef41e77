"""Getting a data source onto local disk: resumable checked downloads and safe archive extraction.

Inputs: a location from params (a local folder or file/archive below the task's data root, or an
http(s) URL) and its optional sha256/md5. Outputs: ``resolve`` returns ``Fetched(path, origin)``,
the local path to read and what was fetched from where (for the download report); downloads land
in ``<work_dir>/<url_key>/<file>`` (one folder per URL, so another URL never reuses an earlier
file), archives are extracted beside the download or under ``<work_dir>/extracted/``. Run:
library module, no CLI; tested by ``.venv/bin/python -m pytest tests/test_fetch.py -q``.

Downloads stream through urllib into ``<dest>.part`` (resumed with an HTTP Range request), are
checked against sha256/md5 when known and renamed into place only when complete; a cached file
failing its checksum or its extraction is deleted and fetched again. Beside each download,
``.<file>.download.json`` records what the server said of it (ETag, Last-Modified), its size,
mtime and sha256: without a pinned checksum a cached download is revalidated with a HEAD request
(a conditional GET where HEAD is refused) and fetched again when the server reports another
ETag, Last-Modified or size, or the file changed on disk; a server that cannot be reached leaves
the cached file in use, with a warning naming it. Extraction refuses members
escaping the target, links pointing outside, device files and zip bombs, and builds the folder in
a temp dir renamed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.common.utils import StageError, atomic_dir

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
_RATIO_MIN_BYTES = 1 << 20  # compression ratios are only judged above this size
_USER_AGENT = "cxr-mlops-fetch/1.0"
_Limits = tuple[int, int, float]  # max_total_bytes, max_files, max_ratio


class NetworkError(StageError):
    """The server could not be reached or the transfer broke off (a partial file may be kept)."""


# ------------------------------------------------------------------------------------- download
def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _checksum_error(
    path: Path, sha256: str | None, md5: str | None, name: str | None = None
) -> str | None:
    """None when the file matches every given checksum, else a message naming expected vs got
    (the file called ``name``, default its own name)."""
    for algo, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algo)
            if got.lower() != expected.strip().lower():
                return f"{algo} mismatch for {name or path.name}: expected {expected}, got {got}"
    return None


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 30,
    chunk: int = 1 << 20,
    retries: int = 2,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify checksums, rename into place.

    An existing `dest` that matches the given checksums is returned without touching the
    network; without checksums it is revalidated (``_still_current``) and fetched again when the
    server's copy changed. A broken transfer is resumed up to `retries` times in this call; after
    that `NetworkError` is raised and the `.part` file is kept, so the next call continues where
    this one stopped.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256 or md5:
            problem = _checksum_error(dest, sha256, md5)
            if problem is None:
                return dest
            log.warning("%s; downloading it again", problem)
        elif _still_current(url, dest, timeout):
            return dest
        dest.unlink()
        _record_path(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    validators: dict[str, str | None] = {}
    for attempt in range(retries + 1):
        before = part.stat().st_size if part.is_file() else 0
        try:
            validators = _fetch_into(url, part, timeout=timeout, chunk=chunk, desc=dest.name)
            break
        except NetworkError as exc:
            grew = part.is_file() and part.stat().st_size > before
            if attempt == retries or not grew:  # only a transfer that made progress is retried
                raise
            log.warning("%s; resuming (attempt %d of %d)", exc, attempt + 2, retries + 1)
    problem = _checksum_error(part, sha256, md5, name=dest.name)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise StageError(f"{problem} (downloaded from {url}; the partial file was deleted)")
    os.replace(part, dest)
    _write_record(dest, url, validators, file_digest(dest, "sha256"))
    return dest


# ----------------------------------------------------------------- revalidating a cached download
def _record_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.download.json")


def _write_record(dest: Path, url: str, validators: dict[str, str | None], sha256: str) -> None:
    """What the server said of ``dest`` and what it is (size, mtime, sha256), beside it."""
    st = dest.stat()
    record = {"url": url, **validators, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _record_path(dest).write_text(json.dumps({**record, "sha256": sha256}, indent=1))


def download_record(dest: Path) -> dict[str, Any] | None:
    """The record of ``dest`` written when it was downloaded, if it still describes the file."""
    try:
        record = json.loads(_record_path(dest).read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (record.get("size"), record.get("mtime_ns")) != (
        st.st_size,
        st.st_mtime_ns,
    ):
        return None
    return record


def _validators(headers: Any) -> dict[str, str | None]:
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _remote(url: str, record: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The server's validators of ``url`` (plus ``size``), from HEAD, or from a conditional GET
    (body not read) when the server refuses HEAD; ``{"not_modified": True}`` for a 304."""
    for method in ("HEAD", "GET"):
        headers = {"User-Agent": _USER_AGENT}
        if method == "GET":  # a server that answers 304 saves sending the body
            if record.get("etag"):
                headers["If-None-Match"] = record["etag"]
            if record.get("last_modified"):
                headers["If-Modified-Since"] = record["last_modified"]
        req = urllib.request.Request(url, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                return {**_validators(resp.headers), "size": size}
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 304:
                return {"not_modified": True}
            if method == "HEAD" and exc.code in (405, 501):  # HEAD not allowed: ask with GET
                continue
            raise NetworkError(f"HTTP {exc.code} {exc.reason} for {url}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise NetworkError(f"cannot reach {url} ({getattr(exc, 'reason', exc)})") from None
    raise AssertionError("unreachable")


def _still_current(url: str, dest: Path, timeout: float) -> bool:
    """Whether the cached ``dest`` (no checksum pinned) is still what the server has at ``url``.

    False when the file changed on disk since its download, or the server reports another ETag,
    Last-Modified or size than recorded then. True when they match, or when the server cannot
    be asked (a warning names the cached file in use).
    """
    record = download_record(dest)
    if record is None and _record_path(dest).is_file():
        log.warning("%s changed on disk since it was downloaded; downloading it again", dest)
        return False
    try:
        remote = _remote(url, record or {}, timeout)
    except NetworkError as exc:
        log.warning("%s; using the cached %s without checking it is current", exc, dest)
        return True
    if remote.get("not_modified"):
        return True
    size = dest.stat().st_size
    if record is None:  # a download cached before records were kept: its size is all there is
        if remote["size"] is not None and remote["size"] != size:
            log.info("%s: the server's file has another size; downloading it again", url)
            return False
        _write_record(dest, url, _validators(remote), file_digest(dest, "sha256"))
        return True
    changed = [
        key
        for key, ours in (
            ("etag", record.get("etag")),
            ("last_modified", record.get("last_modified")),
            ("size", size),
        )
        if ours is not None and remote.get(key) is not None and remote[key] != ours
    ]
    if changed:
        log.warning("%s changed on the server (%s); downloading it again", url, ", ".join(changed))
        return False
    if not any(remote.get(k) is not None for k in ("etag", "last_modified", "size")):
        log.warning(
            "%s: the server gives no ETag, Last-Modified or size; using the cached %s as is "
            "(pin its sha256 in params to be sure of the version)",
            url,
            dest,
        )
    return True


def _fetch_into(
    url: str, part: Path, *, timeout: float, chunk: int, desc: str
) -> dict[str, str | None]:
    """One HTTP request appending to (or restarting) `part`; raises NetworkError if incomplete.
    Returns the response's validators (ETag, Last-Modified) for the download record."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range not satisfiable: either the part is already whole, or it is junk.
            _, total = _content_range(exc.headers.get("Content-Range", ""))
            exc.close()
            if total != offset:  # junk (e.g. longer than the file): start over
                part.unlink(missing_ok=True)
                return _fetch_into(url, part, timeout=timeout, chunk=chunk, desc=desc)
            return _validators(exc.headers)
        exc.close()
        raise NetworkError(f"HTTP {exc.code} {exc.reason} for {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        # connection refused, DNS failure, timeout, reset
        reason = getattr(exc, "reason", exc)
        raise NetworkError(f"cannot reach {url} ({reason})") from None
    with resp:
        validators = _validators(resp.headers)
        length = resp.headers.get("Content-Length")
        if offset and resp.status == 206:
            start, _ = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:  # resumed somewhere else: cannot be trusted, start over
                resp.close()
                part.unlink(missing_ok=True)
                return _fetch_into(url, part, timeout=timeout, chunk=chunk, desc=desc)
            mode = "ab"
        else:  # 200: the server ignored Range (or there was nothing to resume): start over
            offset, mode = 0, "wb"
        total = offset + int(length) if length is not None else None
        received, broken = offset, ""
        with (
            part.open(mode) as fh,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=desc) as bar,
        ):
            try:
                while block := resp.read(chunk):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (http.client.HTTPException, OSError) as exc:  # reset, timeout
                broken = f" ({exc})"
    if broken or (total is not None and received < total):
        of = f" of {total}" if total is not None else ""
        msg = f"download of {url} broke off after {received}{of} bytes{broken}"
        raise NetworkError(f"{msg}; partial file kept at {part}")
    return validators


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(start, total) from a Content-Range header such as `bytes 100-199/200` or `bytes */200`."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


# ------------------------------------------------------------------------------------ extraction
def is_archive(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _refuse(archive: Path, why: str) -> StageError:
    return StageError(f"refusing to extract {archive.name}: {why}")


def _member_target(root: Path, name: str, archive: Path) -> Path:
    """The path a member named `name` lands at inside `root`; refuse anything escaping it."""
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean) or ".." in parts or not parts:
        raise _refuse(archive, f"unsafe member path {name!r}")
    target = root.joinpath(*parts)
    # realpath also resolves links extracted earlier from the same archive
    if not _inside(root, os.path.realpath(target)):
        raise _refuse(archive, f"{name!r} escapes the target folder")
    return target


def _inside(root: Path, path: str | Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _check_totals(archive: Path, files: int, total: int, packed: int, limits: _Limits) -> None:
    max_total_bytes, max_files, max_ratio = limits
    if files > max_files:
        raise _refuse(archive, f"more than {max_files} members")
    if total > max_total_bytes:
        raise _refuse(archive, f"{total} bytes uncompressed > {max_total_bytes}")
    ratio = total / max(packed, 1)
    if total >= _RATIO_MIN_BYTES and ratio > max_ratio:
        raise _refuse(archive, f"compression ratio {ratio:.0f} > {max_ratio} (zip bomb?)")


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_total_bytes: int = 50 * 2**30,
    max_files: int = 2_000_000,
    max_ratio: float = 200,
) -> Path:
    """Extract a .zip/.tar[.gz|.bz2|.xz] into `dest` safely and atomically; return `dest`."""
    archive, dest = Path(archive), Path(dest)
    limits = (max_total_bytes, max_files, max_ratio)
    try:
        if zipfile.is_zipfile(archive):
            with atomic_dir(dest) as tmp:
                _extract_zip(archive, tmp, limits)
        elif tarfile.is_tarfile(archive):
            with atomic_dir(dest) as tmp:
                _extract_tar(archive, tmp, limits)
        else:
            raise StageError(f"{archive} is not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise StageError(f"cannot extract {archive}: {type(exc).__name__}: {exc}") from None
    return dest


def _extract_zip(archive: Path, root: Path, limits: _Limits) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        _check_totals(archive, len(infos), total, sum(i.compress_size for i in infos), limits)
        for info in infos:
            if info.file_size >= _RATIO_MIN_BYTES:
                _check_totals(archive, 1, info.file_size, info.compress_size, limits)
        for info in infos:
            target = _member_target(root, info.filename, archive)
            mode = info.external_attr >> 16
            if info.flag_bits & 0x1:
                raise _refuse(archive, f"{info.filename} is encrypted")
            if stat.S_ISLNK(mode):
                # zipfile writes links as small text files; refuse those pointing outside
                link = zf.read(info).decode("utf-8", "replace")
                if os.path.isabs(link) or not _inside(root, target.parent / link):
                    raise _refuse(archive, f"link {info.filename} -> {link}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(info) as src, target.open("wb") as out:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > info.file_size:  # the declared size lied
                        raise _refuse(archive, f"{info.filename} larger than declared")
                    out.write(block)


def _extract_tar(archive: Path, root: Path, limits: _Limits) -> None:
    packed = archive.stat().st_size
    files = total = 0
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:  # streaming: check then extract each member as it comes
            files += 1
            total += max(member.size, 0)
            _check_totals(archive, files, total, packed, limits)
            target = _member_target(root, member.name, archive)
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                raise _refuse(archive, f"special file {member.name!r}")  # devices, fifos
            if member.issym():
                link = member.linkname
                if os.path.isabs(link) or not _inside(root, target.parent / link):
                    raise _refuse(archive, f"symlink {member.name} -> {link}")
            if member.islnk():
                _member_target(root, member.linkname, archive)  # hard links: archive-relative
            try:
                tf.extract(member, root, set_attrs=False, filter="data")
            except tarfile.FilterError as exc:
                raise _refuse(archive, str(exc)) from None


# ---------------------------------------------------------------------------------------- resolve
def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https")


def _url_filename(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "download"


def url_key(url: str) -> str:
    """The download folder of ``url``: one per URL, so another URL (``.../v2/data.zip``)
    never reuses what an earlier one (``.../v1/data.zip``) fetched under the same file name."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fetched:
    """What ``resolve`` made of a location: the local path to read, and where it came from."""

    path: Path
    origin: dict[str, Any]  # {"kind": "folder" | "file" | "url", ...} for the download report


def resolve(
    location: str | None,
    work_dir: Path,
    *,
    what: str,
    param: str,
    root: Path | None = None,
    root_param: str = "data.<task>.root",
    default_url: str | None = None,
    sha256: str | None = None,
    md5: str | None = None,
) -> Fetched:
    """Turn a params location into a local path: a folder, an extracted archive, or a plain file.

    ``location`` (or ``default_url`` when it is None) is an http(s) URL, downloaded into
    ``work_dir/<url_key>/`` (resumed; checked against ``sha256``/``md5`` when given), or a local
    folder or file, relative to ``root`` (the folder DVC watches for the task; a location outside
    it is refused naming ``root_param``, since DVC would not see its changes). Archives are
    extracted once beside the download or under ``work_dir/extracted/``. A cached download that
    fails its checksum or cannot be extracted is deleted and fetched once more. Failures raise one
    StageError naming ``what`` to download and the ``param`` to set.
    """
    location = location if location is not None else default_url
    hint = f"download {what} by hand and set {param} to the local folder or archive"
    if not location:
        raise StageError(f"no location given for {what}: {hint}")
    work_dir = Path(work_dir)
    if _is_url(location):
        return _resolve_url(location, work_dir, sha256, md5, hint)
    path = _local(location, root, param, root_param)
    if path.is_dir():
        return Fetched(path, {"kind": "folder", "path": str(path)})
    if not path.is_file():
        raise StageError(f"{param} = {location!r} does not exist ({path}): {hint}")
    problem = _checksum_error(path, sha256, md5)
    if problem:
        raise StageError(f"{param}: {problem}; is {path} the file you meant?")
    origin = {"kind": "file", "path": str(path), "sha256": file_digest(path, "sha256")}
    origin["verified"] = _verified(sha256, md5)
    if not is_archive(path):
        return Fetched(path, origin)
    # one extraction folder per archive location, named after the archive for a human reader
    target = work_dir / "extracted" / url_key(str(path.resolve())) / archive_stem(path)
    return Fetched(_extract_once(path, target), origin)


def _verified(sha256: str | None, md5: str | None) -> list[str]:
    """The checksums the file was checked against (for the report)."""
    return [algo for algo, value in (("sha256", sha256), ("md5", md5)) if value]


def _local(location: str, root: Path | None, param: str, root_param: str) -> Path:
    """``location`` below ``root`` (absolute: as is); refuse anything DVC would not watch."""
    path = Path(location).expanduser()
    if root is None:
        return path
    root = Path(root).expanduser()
    full = path if path.is_absolute() else root / path
    if not _inside(root, full):
        lexical = os.path.normpath(os.path.abspath(full))
        linked = _inside_lexically(root, lexical)
        how = " through a symbolic link (DVC does not follow links)" if linked else ""
        raise StageError(
            f"{param} = {location!r} is outside the task's data root {root_param} = "
            f"{str(root)!r}{how}, the folder DVC watches for changes of local data: give a path "
            f"inside it, or set {root_param} to a folder holding the data"
        )
    return full


def _inside_lexically(root: Path, path: str) -> bool:
    base = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([base, path]) == base


def _resolve_url(
    url: str, work_dir: Path, sha256: str | None, md5: str | None, hint: str
) -> Fetched:
    folder = work_dir / url_key(url)
    dest = folder / _url_filename(url)
    for attempt in (1, 2):
        try:
            path = download(url, dest, sha256=sha256, md5=md5)
        except NetworkError as exc:
            _remove_if_empty(folder)
            raise StageError(f"{exc}; offline or blocked? {hint}") from None
        except StageError as exc:
            _remove_if_empty(folder)
            raise StageError(f"{exc}; {hint}") from None
        record = download_record(path)  # its sha256, unless the file changed since
        origin = {
            "kind": "url",
            "url": url,
            "file": str(path),
            "sha256": record["sha256"] if record else file_digest(path, "sha256"),
            "bytes": path.stat().st_size,
            "verified": _verified(sha256, md5),
        }
        if not is_archive(path):
            return Fetched(path, origin)
        try:
            return Fetched(_extract_once(path, folder / archive_stem(path)), origin)
        except StageError as exc:
            if attempt == 2:
                raise StageError(f"{exc} (downloaded twice from {url}); {hint}") from None
            log.warning("%s; deleting the download and fetching it again", exc)
            path.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _remove_if_empty(folder: Path) -> None:
    """A failed first download leaves no empty key folder behind (a kept .part stays)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _extract_once(archive: Path, target: Path) -> Path:
    """Extract unless a marker says this exact archive (size, mtime) was extracted completely."""
    marker = target.with_name(f".{target.name}.extracted.json")
    st = archive.stat()
    stamp = {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if target.is_dir() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except (OSError, ValueError):
            pass  # unreadable marker: extract again
    marker.unlink(missing_ok=True)
    log.info("extracting %s -> %s", archive, target)
    safe_extract(archive, target)
    marker.write_text(json.dumps(stamp))
    return target
