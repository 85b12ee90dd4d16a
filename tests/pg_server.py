"""A PostgreSQL server of the tests' own, as a process: Debian's server binaries, a fresh
cluster in a temporary directory, trust authentication on a loopback port, and nothing
left afterwards. The fast tests of the job queue's SQL run against it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

INSTALL = "install Debian's postgresql package (`apt-get install postgresql`) to run them"


def server_binaries() -> pathlib.Path | None:
    """The newest installed server's bin directory (Debian keeps one per major version)."""
    versions = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    found = [p for p in versions if (p / "pg_ctl").exists()]
    if found:
        return found[0]
    pg_ctl = shutil.which("pg_ctl")
    return pathlib.Path(pg_ctl).parent if pg_ctl else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _binaries() -> pathlib.Path:
    binaries = server_binaries()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail(f"no PostgreSQL server binaries: {INSTALL}")
        pytest.skip(f"no PostgreSQL server binaries: {INSTALL}")
    return binaries


def _own_directory() -> tuple[pathlib.Path, list[str]]:
    """A temporary directory, and the command prefix that runs the server's binaries in it:
    initdb and postgres refuse to run as root, so as root they run as Debian's postgres user."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="transvidio-pg-"))
    if os.geteuid() != 0:
        return directory, []
    account = pwd.getpwnam("postgres")
    os.chown(directory, account.pw_uid, account.pw_gid)
    return directory, ["runuser", "-u", "postgres", "--"]


def config_errors(conf: str) -> str | None:
    """What the server's own parser says of a postgresql.conf (an unknown name, a bad value),
    or None when it takes every line. `postgres -C` reads the file and exits: no cluster runs."""
    binaries = _binaries()
    directory, as_user = _own_directory()
    try:
        (directory / "data").mkdir(mode=0o700)
        (directory / "postgresql.conf").write_text(conf)
        if as_user:
            shutil.chown(directory / "data", "postgres", "postgres")
        done = subprocess.run(
            [*as_user, str(binaries / "postgres"), "-D", str(directory / "data"),
             f"--config-file={directory / 'postgresql.conf'}", "-C", "server_version"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return None if done.returncode == 0 else done.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[str]:
    """A started server; yields its conninfo (the superuser, database postgres)."""
    binaries = _binaries()
    directory, as_user = _own_directory()
    data, port = directory / "data", free_port()
    try:
        subprocess.run(
            [*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
        )
        options = f"-k {directory} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(directory / "log")
        subprocess.run(
            [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-w", "-l", log, "-o", options, "start"],
            check=True,
            capture_output=True,
        )
        try:
            yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        finally:
            subprocess.run(
                [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
