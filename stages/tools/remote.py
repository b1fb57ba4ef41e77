"""Set up the team's DVC remote (and optionally a shared cache) from environment variables.

Inputs:  environment variables (nothing secret is ever written to .dvc/config):
           CXR_REMOTE_URL       required: /shared/folder, s3://bucket/prefix or
                                ssh://user@host[:port]/path
           CXR_REMOTE_NAME      remote name (default: storage)
           CXR_S3_ENDPOINT      S3-compatible server (MinIO, Ceph, rclone serve s3), e.g.
                                http://minio.lan:9000; unset for AWS itself
           CXR_S3_REGION        optional region
           AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   S3 credentials
           AWS_PROFILE          or a profile of ~/.aws/credentials instead of keys
           CXR_SSH_KEY          private key file for ssh:// (default: ssh-agent / ~/.ssh keys)
           CXR_SSH_USER         ssh user when the URL has none
           CXR_SHARED_CACHE     `shared-cache`: one cache folder for everybody on this machine
Outputs: `dvc remote add -d` / `dvc remote modify` calls: the URL, endpoint and region go to
         .dvc/config (commit them once for the team), credentials and key paths always to
         .dvc/config.local (git-ignored, per person); with --local everything goes there.
Run:     python -m stages.remote setup [--local] [--dry-run]
         python -m stages.remote shared-cache [--dry-run]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from stages.common.utils import ArgumentParser, StageError, log, run_cli

DEFAULT_NAME = "storage"
SECRET_OPTIONS = {"secret_access_key", "session_token", "password", "passphrase"}
# env var -> (dvc remote option, secret or personal: always --local)
S3_OPTIONS = {
    "CXR_S3_ENDPOINT": ("endpointurl", False),
    "CXR_S3_REGION": ("region", False),
    "AWS_ACCESS_KEY_ID": ("access_key_id", True),
    "AWS_SECRET_ACCESS_KEY": ("secret_access_key", True),
    "AWS_SESSION_TOKEN": ("session_token", True),
    "AWS_PROFILE": ("profile", True),
}
SSH_OPTIONS = {
    "CXR_SSH_KEY": ("keyfile", True),
    "CXR_SSH_USER": ("user", True),
}


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return "local"
    if scheme in ("s3", "ssh"):
        return scheme
    raise StageError(
        f"CXR_REMOTE_URL={url!r}: unsupported scheme {scheme!r}; use a folder, s3://bucket/prefix "
        "or ssh://user@host[:port]/path (other DVC remotes: `dvc remote add` by hand)"
    )


def plan_remote(env: Mapping[str, str], local: bool = False) -> list[list[str]]:
    """The `dvc ...` argument lists that configure the remote described by ``env``."""
    url = env.get("CXR_REMOTE_URL", "").strip()
    if not url:
        raise StageError(
            "CXR_REMOTE_URL is not set: export it (a shared folder, s3://bucket/prefix or "
            "ssh://user@host/path) and run `make remote` again"
        )
    name = env.get("CXR_REMOTE_NAME", "").strip() or DEFAULT_NAME
    scheme = _scheme(url)
    if scheme == "local":
        # A folder remote: absolute, so every clone on the machine finds the same place.
        url = str(Path(url.removeprefix("file://")).expanduser().resolve())
    where = ["--local"] if local else []
    commands = [["remote", "add", *where, "--force", "--default", name, url]]
    options = {"s3": S3_OPTIONS, "ssh": SSH_OPTIONS}.get(scheme, {})
    ignored = sorted(k for k in {**S3_OPTIONS, **SSH_OPTIONS} if env.get(k) and k not in options)
    if ignored and any(k.startswith("CXR_") for k in ignored):
        log.warning("%s do not apply to a %s remote: ignored", ignored, scheme)
    for var, (option, personal) in options.items():
        value = env.get(var, "").strip()
        if value:
            if option == "keyfile":
                value = str(Path(value).expanduser().resolve())
            scope = ["--local"] if (local or personal) else []
            commands.append(["remote", "modify", *scope, name, option, value])
    if scheme == "s3" and env.get("CXR_S3_ENDPOINT", "").startswith("http://"):
        log.warning("S3 endpoint is plain http: credentials travel unencrypted outside loopback")
    return commands


def plan_shared_cache(env: Mapping[str, str]) -> list[list[str]]:
    """One cache folder for every clone on this machine, group-writable, files linked not copied.

    Links (symlink/hardlink) make checkout instant and save the space of a second copy; the
    workspace files are then read-only links into the cache (stages write new files anyway).
    """
    cache = env.get("CXR_SHARED_CACHE", "").strip()
    if not cache:
        raise StageError("CXR_SHARED_CACHE is not set: export the shared cache folder")
    path = str(Path(cache).expanduser().resolve())
    return [
        ["cache", "dir", "--local", path],
        ["config", "--local", "cache.shared", "group"],
        ["config", "--local", "cache.type", "reflink,hardlink,symlink,copy"],
    ]


def shown(command: Sequence[str]) -> str:
    """The command as printed: secret values masked."""
    parts = list(command)
    if len(parts) >= 2 and parts[0:2] == ["remote", "modify"] and parts[-2] in SECRET_OPTIONS:
        parts[-1] = "****"
    return "dvc " + " ".join(parts)


def apply(commands: list[list[str]], repo: Path = Path("."), dry_run: bool = False) -> None:
    """Print each command (secrets masked) and run it with DVC's own command line in this
    process: one start-up for all of them instead of one `dvc` process per command."""
    if not dry_run:
        try:
            from dvc.cli import main as dvc_main  # noqa: PLC0415  (not needed for --dry-run)
        except ImportError as exc:
            raise StageError("dvc is not installed in this environment: run `make setup`") from exc
    cwd = Path.cwd()  # `--cd` moves this process; the caller's working directory comes back
    dvc_log = logging.getLogger("dvc")
    propagate, dvc_log.propagate = dvc_log.propagate, False  # DVC prints its own messages
    try:
        for command in commands:
            print(shown(command), flush=True)
            if not dry_run and dvc_main(["--cd", str(repo.resolve()), *command]) != 0:
                raise StageError(f"{shown(command)} failed (DVC's message above)")
    finally:
        os.chdir(cwd)
        dvc_log.propagate = propagate


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Configure DVC remote / shared cache from env.")
    parser.add_argument("action", choices=["setup", "shared-cache"])
    parser.add_argument(
        "--local", action="store_true", help="everything in .dvc/config.local (a personal remote)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root")
    args = parser.parse_args(argv)
    if args.action == "setup":
        commands = plan_remote(os.environ, local=args.local)
    else:
        commands = plan_shared_cache(os.environ)
    apply(commands, args.repo, args.dry_run)


if __name__ == "__main__":
    run_cli(main)
