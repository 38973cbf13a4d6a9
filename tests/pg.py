"""A real, throwaway PostgreSQL server for tests: a cluster in a temporary folder on a free loopback port.

`initdb` refuses to run as root, and CI and the development machines run as root: there the server runs as
the `postgres` system user (`runuser -u postgres --`), in a folder that user owns. The tests that need it skip,
saying why, only when no server can be started (no binaries, no such user).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port


class NoPostgres(Exception):
    """Why no server could be started here."""


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl live: `pg_config --bindir`, else Debian's /usr/lib/postgresql/N/bin."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").is_file():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise NoPostgres("no PostgreSQL server binaries (initdb): install Debian's `postgresql` package")
    return Path(found[-1]).parent


def _as_server_user() -> list[str]:
    """The command prefix that runs initdb/pg_ctl: as the `postgres` user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise NoPostgres("running as root and no `runuser` to start PostgreSQL as another user")
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        raise NoPostgres("running as root and no `postgres` system user to run the server as") from None
    return ["runuser", "-u", "postgres", "--"]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise NoPostgres(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster, yield its base URL `postgresql+psycopg://postgres@127.0.0.1:PORT`, stop and delete it."""
    bindir, prefix = postgres_bindir(), _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="archlab-pg-"))  # under /tmp: the server user must reach it
    try:
        if prefix:
            shutil.chown(folder, "postgres", "postgres")
        data, port = folder / "data", free_port()
        _run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
             "initdb")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
              "start"], "pg_ctl start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A fresh database on the server → its SQLAlchemy URL (what Optuna and MLflow take)."""
    import psycopg
    with psycopg.connect(server_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
