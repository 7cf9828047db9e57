"""`anomalygpt serve`: load the models once and serve inspections over HTTP (uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from anomalygpt.io import safe_text

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    profiles: Path  # profile files, the SQLite audit database and the overlay/map files live here
    db: str | None  # a SQLAlchemy URL; None: SQLite (WAL) in the profiles folder
    preset: str | None
    api_key_file: Path | None
    batch_wait_ms: float  # how long the first request of a batch waits for others to join it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt serve", description="HTTP inspection service with an audit trail."
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--profiles", type=Path, default=Path("profiles"), help="folder of profiles and the audit")
    parser.add_argument("--db", default=None, help="database URL (default: sqlite:///PROFILES/audit.db, WAL)")
    parser.add_argument("--preset", default=None, help="preset name or JSON path (default: the default preset)")
    parser.add_argument(
        "--api-key-file", type=Path, default=None, help="'name:key' lines; then every /v1 route needs a key"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="micro-batch gathering wait (default 5)")
    return parser


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(options: ServeOptions) -> None:
    """ValueError for options that cannot serve, before the models load."""
    if not 0 < options.port < 65536:
        raise ValueError(f"--port: {options.port} is not a TCP port (1 to 65535)")
    if not 0 <= options.batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms: {options.batch_wait_ms:g} is outside 0 to 1000")
    if options.profiles.exists() and not options.profiles.is_dir():
        raise ValueError(f"--profiles: {options.profiles} is a file, not a folder")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = ServeOptions(
        args.host, args.port, args.profiles, args.db, args.preset, args.api_key_file, args.batch_wait_ms
    )
    try:
        check(options)
        from anomalygpt.config import DEFAULT_PRESET
        from anomalygpt.service.app import create_app, read_api_keys

        keys = read_api_keys(options.api_key_file) if options.api_key_file is not None else None
        app = create_app(options.profiles, options.db, options.preset or DEFAULT_PRESET, keys, options.batch_wait_ms)
    except ModuleNotFoundError as error:
        print(
            f"anomalygpt serve: error: needs the Python package {error.name} (pip install 'anomalygpt[serve]')",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as error:
        print(f"anomalygpt serve: error: {safe_text(error)}", file=sys.stderr)
        return 2
    if not is_loopback(options.host):
        print(
            f"anomalygpt serve: warning: listening on {options.host}, reachable from other machines"
            + ("" if keys else " without API keys (--api-key-file)"),
            file=sys.stderr,
        )
    import uvicorn

    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0
