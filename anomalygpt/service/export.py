"""`anomalygpt audit export`: the service's audit trail as CSV or JSON lines, oldest first.

    anomalygpt audit export --since 2026-12-01T00:00:00Z --format csv --out december.csv
    anomalygpt audit export --table chats --db postgresql://line@db-host/audit --format jsonl

Every column of the table, as stored (the *_json columns stay JSON text); times are ISO 8601 UTC. Rows are
streamed from the database to the output as they are read (memory stays bounded however large the table),
atomically to --out (a temp file renamed at the end; nothing is left on an error), or to stdout.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from anomalygpt.io import safe_text, write_lines_atomic

FORMATS = ("csv", "jsonl")
PROG = "anomalygpt audit"


@dataclass(frozen=True)
class ExportOptions:
    table: str  # a key of audit.TABLES
    since: datetime | None  # naive UTC, as the audit stores times
    format: str  # one of FORMATS
    db: str | None  # None: sqlite:///PROFILES/audit.db
    profiles: Path
    out: Path | None  # None: stdout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The audit trail of `anomalygpt serve`.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    export = verbs.add_parser("export", help="write the rows as CSV or JSON lines, oldest first")
    export.add_argument("--table", default="inspections", choices=("inspections", "profiles", "chats"))
    export.add_argument("--since", default=None, help="only rows from this time on (ISO 8601; no offset: UTC)")
    export.add_argument("--format", default="jsonl", choices=FORMATS)
    export.add_argument("--db", default=None, help="database URL (default: sqlite:///PROFILES/audit.db)")
    export.add_argument("--profiles", type=Path, default=Path("profiles"), help="the service's folder")
    export.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    return parser


def since_option(text: str | None) -> datetime | None:
    from anomalygpt.service.audit import parse_time

    return None if text is None else parse_time(text, "--since")


def database(db: str | None, profiles: Path) -> str:
    """The URL to read; a default SQLite file that does not exist is an error (never created by reading)."""
    from anomalygpt.service.audit import AUDIT_FILE, default_database

    if db is not None:
        return db
    if not (profiles / AUDIT_FILE).is_file():
        raise ValueError(
            f"--profiles: {profiles / AUDIT_FILE} does not exist (give the service's --profiles folder, or --db URL)"
        )
    return default_database(profiles)


def records(options: ExportOptions) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The table's column names and its rows (oldest first) as plain values."""
    from sqlalchemy import select
    from sqlalchemy.exc import DBAPIError

    from anomalygpt.service.audit import TABLES, AuditStore

    store = AuditStore(database(options.db, options.profiles), options.profiles / "blobs")
    model = TABLES[options.table]
    columns = [column.name for column in model.__table__.columns]
    created, key = model.__table__.c.created, model.__table__.c.id
    query = select(model).order_by(created, key)
    if options.since is not None:
        query = query.where(created >= options.since)

    def rows() -> Iterator[dict[str, Any]]:  # read 1,000 at a time (a server-side cursor on PostgreSQL)
        try:
            with store.sessions() as session:
                for row in session.scalars(query.execution_options(yield_per=1000)):
                    yield {name: plain(getattr(row, name)) for name in columns}
        except DBAPIError as error:  # e.g. the connection lost midway
            reason = str(error.orig or error).strip().splitlines()[0]
            raise ConnectionError(f"--db: reading the {options.table} table failed: {reason}") from error

    return columns, rows()


def plain(value: Any) -> Any:
    return value.isoformat(timespec="microseconds") + "Z" if isinstance(value, datetime) else value


@dataclass
class Counted:
    """Rows passed on one at a time, counted as they go."""

    rows: Iterator[dict[str, Any]]
    count: int = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            self.count += 1
            yield row


def export_lines(columns: list[str], rows: Iterable[dict[str, Any]], form: str) -> Iterator[str]:
    """The export piece by piece as the rows are read: one piece per row (after the CSV header)."""
    return map(json_line, rows) if form == "jsonl" else csv_lines(columns, rows)


def csv_lines(columns: list[str], rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        yield taken(buffer)
        writer.writerow(row)
    yield taken(buffer)


def taken(buffer: io.StringIO) -> str:
    """What the buffer holds, leaving it empty."""
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def json_line(row: dict[str, Any]) -> str:
    try:
        return json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n"
    except ValueError as error:  # NaN or infinity, which JSON cannot hold
        raise ValueError(f"row {row.get('id')!r}: {error}") from error


def fail(message: str) -> int:
    print(f"{PROG}: error: {safe_text(' '.join(message.split()))}", file=sys.stderr)
    return 2


def stop_writing_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into the closed pipe is not an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = ExportOptions(args.table, since_option(args.since), args.format, args.db, args.profiles, args.out)
        if options.out is not None and options.out.is_dir():
            raise ValueError(f"--out: {options.out} is a folder")
        columns, rows = records(options)
        counted = Counted(rows)
        lines = export_lines(columns, counted, options.format)
        if options.out is None:
            sys.stdout.writelines(lines)
            sys.stdout.flush()
        else:
            write_lines_atomic(options.out, lines)
    except BrokenPipeError:  # the reader stopped early (`| head`): what it read is what it asked for
        stop_writing_stdout()
        return 0
    except ModuleNotFoundError as error:
        print(
            f"{PROG}: error: needs the Python package {error.name} (pip install 'anomalygpt[serve]')", file=sys.stderr
        )
        return 2
    except (ValueError, OSError) as error:
        return fail(str(error))
    if options.out is not None:
        print(f"{PROG}: wrote {counted.count} rows to {options.out}", file=sys.stderr)
    return 0
