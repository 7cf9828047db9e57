"""`anomalygpt serve`: load the models once and serve inspections over HTTP (uvicorn).

`anomalygpt serve keys create NAME` makes an API key: it is printed once and only its sha256 is stored, in the
audit database the service reads (--profiles/--db as for serving). Once any key exists, every route but /healthz
needs one. `keys list` shows each key's name and times, `keys revoke NAME` refuses it from the next request on.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from anomalygpt.devices import add_device_option, with_device
from anomalygpt.io import safe_text

if TYPE_CHECKING:
    from anomalygpt.service.audit import AuditStore

LOOPBACK_NAMES = ("localhost",)
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a key's name lands in every audit row it signs
KEY_PREFIX = "agk_"  # recognisable in a leaked config file
LISTEN_BACKLOG = 2048  # connections queued before uvicorn accepts them (its default)


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    profiles: Path  # profile files, the SQLite audit database and the overlay/map files live here
    db: str | None  # a SQLAlchemy URL; None: SQLite (WAL) in the profiles folder
    preset: str | None
    api_key_file: Path | None
    batch_wait_ms: float  # how long the first request of a batch waits for others to join it
    answerer: str  # who answers POST /v1/chat: "llm" (as `anomalygpt chat`) or "grounded"
    questions_per_minute: int  # POST /v1/chat per API key
    inference_batch: int | None = None  # images per backbone pass; None: 1 on a CPU, the Inspector's on a GPU
    device: str | None = None  # --device: overrides the preset's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt serve",
        description="HTTP inspection service with an audit trail. 'anomalygpt serve keys create|list|revoke' "
        "manages API keys.",
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
    parser.add_argument(
        "--answerer",
        choices=("llm", "grounded"),
        default="llm",
        help="who answers /v1/chat: llm, the preset's LLM assistant with checked sentences (default, as "
        "'anomalygpt chat'); grounded: templates, no LLM",
    )
    parser.add_argument("--questions-per-minute", type=int, default=30, help="/v1/chat questions per key (30)")
    parser.add_argument(
        "--inference-batch",
        type=int,
        default=None,
        help="images per backbone pass of a gathered batch (default: 1 on a CPU, where it measured fastest; 16 on "
        "a GPU)",
    )
    add_device_option(parser)
    return parser


def keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt serve keys", description="API keys of the service (stored as sha256 only)."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="make a key, print it once")
    create.add_argument("name", help="the key's name, recorded with everything done with it (letters, digits, ._-)")
    listing = verbs.add_parser("list", help="name, created, last used and revoked time of every key (never the key)")
    revoke = verbs.add_parser("revoke", help="refuse the named key from its next request on, on every replica")
    revoke.add_argument("name", help="the key's name, as 'keys list' shows it")
    for verb in (create, listing, revoke):
        verb.add_argument("--profiles", type=Path, default=Path("profiles"), help="the service's folder")
        verb.add_argument("--db", default=None, help="database URL (default: sqlite:///PROFILES/audit.db)")
    return parser


def keys_main(argv: list[str]) -> int:
    """`anomalygpt serve keys create|list|revoke`; 2 with a one-line error for bad input."""
    args = keys_parser().parse_args(argv)
    if args.verb == "create" and not KEY_NAME.fullmatch(args.name):
        return fail(f"NAME: {args.name!r} must be 1-100 letters, digits, '.', '_' or '-'", "serve keys")
    try:
        check_profiles_folder(args.profiles)
        audit = key_store(args.profiles, args.db, create=args.verb == "create")
        if args.verb == "create":
            create_key(audit, args.name)
        elif args.verb == "list":
            list_keys(audit)
        else:
            revoked = audit.revoke_key(args.name)
            print(f"anomalygpt serve keys: {args.name!r} revoked at {short_time(revoked)}", file=sys.stderr)
    except (ValueError, OSError) as error:
        return fail(str(error), "serve keys")
    return 0


def key_store(profiles: Path, db: str | None, create: bool) -> AuditStore:
    """The audit database the keys live in; only `create` makes the default SQLite file (and its folder)."""
    from anomalygpt.service.audit import AuditStore, default_database
    from anomalygpt.service.export import database

    if not create:
        return AuditStore(database(db, profiles), profiles / "blobs")
    if db is None:
        profiles.mkdir(parents=True, exist_ok=True)
    return AuditStore(db or default_database(profiles), profiles / "blobs")


def create_key(audit: AuditStore, name: str) -> None:
    """A new key on stdout, once; its hash in the database."""
    from anomalygpt.service.audit import key_digest

    key = KEY_PREFIX + secrets.token_urlsafe(32)
    audit.add_key(name, key_digest(key))
    print(key)
    print(f"anomalygpt serve keys: created {name!r}; only its hash is stored, so copy it now", file=sys.stderr)


def list_keys(audit: AuditStore) -> None:
    """One line per key: name, created, last used, revoked ('-' for never); no key or hash."""
    table = [("name", "created", "last used", "revoked")]
    for row in audit.api_keys():
        table.append((row.name, short_time(row.created), short_time(row.last_used), short_time(row.revoked)))
    widths = [max(len(line[column]) for line in table) for column in range(4)]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def short_time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds") + "Z"


def fail(message: str, verb: str = "serve") -> int:
    print(f"anomalygpt {verb}: error: {safe_text(' '.join(message.split()))}", file=sys.stderr)
    return 2


def check_profiles_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--profiles: {folder} is a file, not a folder")


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
    if options.inference_batch is not None and not 1 <= options.inference_batch <= 64:
        raise ValueError(f"--inference-batch: {options.inference_batch} is outside 1 to 64")
    if options.questions_per_minute < 1:
        raise ValueError(f"--questions-per-minute: {options.questions_per_minute} is below 1")
    check_profiles_folder(options.profiles)


def main(argv: list[str]) -> int:
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    args = build_parser().parse_args(argv)
    options = ServeOptions(
        args.host,
        args.port,
        args.profiles,
        args.db,
        args.preset,
        args.api_key_file,
        args.batch_wait_ms,
        args.answerer,
        args.questions_per_minute,
        args.inference_batch,
        args.device,
    )
    try:
        check(options)
        from anomalygpt.config import DEFAULT_PRESET, load_preset
        from anomalygpt.service.app import Limits, create_app, read_api_keys

        keys = read_api_keys(options.api_key_file) if options.api_key_file is not None else None
        limits = Limits(questions_per_minute=options.questions_per_minute)
        preset = with_device(load_preset(options.preset or DEFAULT_PRESET), options.device)
        listening = listening_socket(options.host, options.port)  # before the models load: a taken port fails now
        app = create_app(
            options.profiles,
            options.db,
            preset,
            keys,
            options.batch_wait_ms,
            limits,
            answerer=options.answerer,
            inference_batch=options.inference_batch,
        )
    except ModuleNotFoundError as error:
        return fail(f"needs the Python package {error.name} (pip install 'anomalygpt[serve]')")
    except (ValueError, OSError) as error:
        return fail(str(error))
    if not is_loopback(options.host):
        print(
            f"anomalygpt serve: warning: listening on {options.host}, reachable from other machines"
            + ("" if keys else " without API keys (--api-key-file)"),
            file=sys.stderr,
        )
    shown = f"[{options.host}]" if ":" in options.host else options.host
    print(f"anomalygpt serve: listening on http://{shown}:{options.port} (Ctrl+C stops it)", file=sys.stderr)
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")).run([listening])
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn: a taken port is a one-line error before the models load, and the
    service says it listens only once the address is its own (uvicorn, at log level warning, says nothing)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        raise OSError(f"--host: {host} is not an address of this machine ({error.strerror or error})") from error
    family, kind, proto, _, address = found[0]
    listening = socket.socket(family, kind, proto)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
        listening.listen(LISTEN_BACKLOG)  # connections wait in the queue until uvicorn serves them
    except OSError as error:
        listening.close()
        reason = error.strerror or str(error)
        raise OSError(f"--host/--port: cannot listen on {host}:{port} ({reason}); is the port taken?") from error
    return listening
