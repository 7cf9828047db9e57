"""A throwaway PostgreSQL server for the service's tests and benches: initdb into a temporary folder, trust
authentication, a Unix socket in that folder only (no TCP listener), removed when stopped.

PostgreSQL refuses to run as root; as root the server runs as the `postgres` user (made by the Debian package),
else as `nobody`, through runuser.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg


def postgres_binary(name: str) -> str | None:
    """initdb / pg_ctl from PATH, else from the Debian package's versioned folder (not on PATH), newest first."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return candidates[-1] if candidates else None


def run_as() -> str | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.getuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    root: Path  # data folder, log and the Unix socket
    port: int  # names the socket file (.s.PGSQL.<port>); nothing listens on TCP
    user: str | None
    pg_ctl: str

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.root}&port={self.port}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        command = [self.pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"]
        subprocess.run(as_user(self.user, command), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def as_user(user: str | None, command: list[str]) -> list[str]:
    return command if user is None else ["runuser", "-u", user, "--", *command]


def start_postgres(durable: bool = False) -> PostgresServer:
    """A running server; `durable` keeps fsync on (benches that kill processes), tests turn it off for speed.
    RuntimeError when initdb is missing or the server does not start."""
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    user = run_as()
    root = Path(tempfile.mkdtemp(prefix="anomalygpt-pg-"))
    if user is not None:
        shutil.chown(root, user)
    port = free_port()
    options = f"-p {port} -k {root} -c listen_addresses='' -c max_connections=100"
    options += "" if durable else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    steps = [
        [initdb, "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        [pg_ctl, "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-t", "60", "-o", options, "start"],
    ]
    for step in steps:
        done = subprocess.run(as_user(user, step), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"{Path(step[0]).name} failed ({done.returncode}): {done.stderr[-800:]} {log[-800:]}")
    return PostgresServer(root, port, user, pg_ctl)
