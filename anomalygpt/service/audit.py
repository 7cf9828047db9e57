"""The audit trail: every profile and inspection the service acknowledged, in a SQL database (SQLAlchemy 2).

SQLite in WAL mode is the embedded default; nothing here is SQLite-specific except its connection pragmas, so
another dialect (PostgreSQL) takes the same tables. Overlays and maps live beside the database as content-addressed
files (named by their sha256), written atomically before the row that names them is committed: a crash can leave
an unreferenced file, never a row without its files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Float, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from anomalygpt.io import write_bytes_atomic

BLOB_SUFFIXES = {"overlay": ".png", "map": ".npy"}


class Base(DeclarativeBase):
    pass


class ProfileRow(Base):
    __tablename__ = "profiles"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per name
    created: Mapped[datetime] = mapped_column(DateTime(), index=True)
    key_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    file: Mapped[str] = mapped_column(String(200))  # the profile's file name inside the profiles folder
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 of the profile file
    n_references: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_width: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    preset: Mapped[str] = mapped_column(String(200))
    references_json: Mapped[str] = mapped_column(Text)  # [{"name", "sha256", "bytes"}] of the uploaded images
    warnings_json: Mapped[str] = mapped_column(Text)
    latency_ms: Mapped[float] = mapped_column(Float)


class InspectionRow(Base):
    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(), index=True)
    key_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    profile_id: Mapped[str] = mapped_column(String(32), index=True)
    profile_version: Mapped[int] = mapped_column(Integer)
    profile_checksum: Mapped[str] = mapped_column(String(64))
    image_name: Mapped[str] = mapped_column(String(300))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_bytes: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_width: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16), index=True)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    sensitivity: Mapped[float] = mapped_column(Float)
    regions_json: Mapped[str] = mapped_column(Text)
    result_json: Mapped[str] = mapped_column(Text)  # the whole Inspection.to_dict(), as answered
    overlay_sha256: Mapped[str] = mapped_column(String(64))
    map_sha256: Mapped[str] = mapped_column(String(64))
    preset: Mapped[str] = mapped_column(String(200))
    versions_json: Mapped[str] = mapped_column(Text)  # package versions that computed it
    latency_ms: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class InspectionFilter:
    profile: str | None = None
    since: datetime | None = None
    verdict: str | None = None
    limit: int = 50
    offset: int = 0


def utc_now() -> datetime:
    """Naive UTC: every dialect stores and compares it the same way (SQLite drops offsets)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds") + "Z"


def sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the one writer; FULL sync makes an acknowledged row survive a power cut."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str) -> Engine:
    """An engine for url, tables created; SQLite gets WAL and may be used from the service's threads."""
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"check_same_thread": False} if is_sqlite else {})
    if is_sqlite:
        event.listen(engine, "connect", sqlite_pragmas)
    Base.metadata.create_all(engine)
    return engine


class BlobStore:
    """Content-addressed files: <root>/<first two hex digits>/<sha256><suffix>, written atomically once."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str, suffix: str) -> Path:
        return self.root / digest[:2] / f"{digest}{suffix}"

    def put(self, data: bytes, suffix: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest, suffix)
        if not target.exists():  # same content, same name: an existing file is already this one
            write_bytes_atomic(target, data)
        return digest


class AuditStore:
    """Rows of the audit trail; each add_* commits one transaction (all or nothing)."""

    def __init__(self, url: str, blob_root: Path) -> None:
        self.engine = open_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.blobs = BlobStore(blob_root)

    def add(self, rows: Sequence[Base]) -> None:
        with self.sessions.begin() as session:
            session.add_all(rows)

    def next_version(self, name: str) -> int:
        with self.sessions() as session:
            latest = session.scalar(select(func.max(ProfileRow.version)).where(ProfileRow.name == name))
        return (latest or 0) + 1

    def profile(self, profile_id: str) -> ProfileRow | None:
        with self.sessions() as session:
            return session.get(ProfileRow, profile_id)

    def profiles(self) -> list[ProfileRow]:
        with self.sessions() as session:
            return list(session.scalars(select(ProfileRow).order_by(ProfileRow.created, ProfileRow.id)))

    def inspection(self, inspection_id: str) -> InspectionRow | None:
        with self.sessions() as session:
            return session.get(InspectionRow, inspection_id)

    def inspections(self, where: InspectionFilter) -> tuple[list[InspectionRow], int]:
        """One page of inspections, newest first, and how many match in all."""
        query = select(InspectionRow)
        if where.profile is not None:
            query = query.where(InspectionRow.profile_id == where.profile)
        if where.since is not None:
            query = query.where(InspectionRow.created >= where.since)
        if where.verdict is not None:
            query = query.where(InspectionRow.verdict == where.verdict)
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            page = query.order_by(InspectionRow.created.desc(), InspectionRow.id).limit(where.limit)
            rows = list(session.scalars(page.offset(where.offset)))
        return rows, int(total)


def profile_json(row: ProfileRow) -> dict[str, Any]:
    """What the API answers about a profile."""
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "created": iso_utc(row.created),
        "checksum": row.checksum,
        "n_references": row.n_references,
        "image_size": [row.image_height, row.image_width],
        "threshold": row.threshold,
        "preset": row.preset,
        "references": json.loads(row.references_json),
        "warnings": json.loads(row.warnings_json),
    }


def inspection_json(row: InspectionRow) -> dict[str, Any]:
    """The inspection as answered, with its audit fields and links to its files."""
    return {
        **json.loads(row.result_json),
        "id": row.id,
        "created": iso_utc(row.created),
        "profile": row.profile_id,
        "profile_version": row.profile_version,
        "image_sha256": row.image_sha256,
        "latency_ms": row.latency_ms,
        "overlay_url": f"/v1/inspections/{row.id}/overlay",
        "map_url": f"/v1/inspections/{row.id}/map",
    }
