"""The audit trail: every profile and inspection the service acknowledged, in a SQL database (SQLAlchemy 2).

SQLite in WAL mode is the embedded default, PostgreSQL (psycopg 3) the database several replicas share; nothing
here is dialect-specific except SQLite's connection pragmas and PostgreSQL's migration lock. The schema is made and
upgraded by the Alembic revisions in migrations/ (`alembic upgrade head`, run by `migrate` when the service starts).
Uploaded images, overlays and maps live beside the database as content-addressed files (named by their sha256),
written atomically before the row that names them is committed: a crash can leave an unreferenced file, never a
row without its files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from anomalygpt.io import write_bytes_atomic

BLOB_SUFFIXES = {"overlay": ".png", "map": ".npy", "image": ".img"}  # image: the upload's bytes as received
MIGRATIONS = Path(__file__).with_name("migrations")
AUDIT_FILE = "audit.db"  # the default database's file in the --profiles folder
FIRST_REVISION = "0001"  # the schema the first release made without Alembic
MIGRATION_LOCK = 0x616E6F6D  # PostgreSQL advisory lock id: replicas starting together migrate one after another
VERSION_TRIES = 5  # profile creations racing for the next version of one name
LAST_USE_STEP = timedelta(minutes=1)  # a key's last use is written at most this often (not on every request)


class Base(DeclarativeBase):
    pass


class ProfileRow(Base):
    __tablename__ = "profiles"
    __table_args__ = (Index("uq_profiles_name_version", "name", "version", unique=True),)

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
    # The share of good parts like the references its conformal threshold may flag; None: mean + z spreads (too few
    # references for a stated rate), or a profile made before migration 0005 (its inspections' calibration says)
    false_alarm_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
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


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # the key itself is never stored
    created: Mapped[datetime] = mapped_column(DateTime())
    last_used: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)  # to LAST_USE_STEP; None: never
    revoked: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)  # when; a revoked key answers 401


class QuestionCountRow(Base):
    __tablename__ = "question_counts"

    key_name: Mapped[str] = mapped_column(String(200), primary_key=True)  # "": the keyless service
    minute: Mapped[int] = mapped_column(Integer, primary_key=True)  # Unix time // 60
    count: Mapped[int] = mapped_column(Integer)  # questions asked, refused ones included


class ChatRow(Base):
    __tablename__ = "chat_answers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(), index=True)
    key_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    inspection_id: Mapped[str] = mapped_column(String(32), index=True)
    profile_id: Mapped[str] = mapped_column(String(32))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)  # exactly the text sent: what the claim checker passed
    answerer: Mapped[str] = mapped_column(String(32))  # "grounded" or "llm"
    checks_json: Mapped[str] = mapped_column(Text)  # the claim checker's report
    preset: Mapped[str] = mapped_column(String(200))
    versions_json: Mapped[str] = mapped_column(Text)
    latency_ms: Mapped[float] = mapped_column(Float)


TABLES = {"inspections": InspectionRow, "profiles": ProfileRow, "chats": ChatRow}  # what `audit export` writes


@dataclass(frozen=True)
class InspectionFilter:
    profile: str | None = None
    since: datetime | None = None
    verdict: str | None = None
    limit: int = 50
    offset: int = 0


def key_digest(key: str) -> str:
    """What is stored of an API key and compared with a request's: its sha256 (the key itself never is)."""
    return hashlib.sha256(key.encode()).hexdigest()


def utc_now() -> datetime:
    """Naive UTC: every dialect stores and compares it the same way (SQLite drops offsets)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time as naive UTC (the audit's clock); without an offset it is read as UTC. ValueError naming
    `what` (the option or field) otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as error:
        raise ValueError(f"{what}: {text!r} is not an ISO 8601 time (e.g. 2026-01-31T08:00:00Z)") from error
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo is not None else moment


def iso_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds") + "Z"


def sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the one writer; FULL sync makes an acknowledged row survive a power cut."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def default_database(profiles: Path) -> str:
    """The audit database when no --db is given: SQLite in the service's --profiles folder."""
    return f"sqlite:///{profiles / AUDIT_FILE}"


def database_url(url: str) -> str:
    """The URL SQLAlchemy opens: postgresql:// goes through psycopg 3 (SQLAlchemy's own default is psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def open_engine(url: str) -> Engine:
    """An engine for url, its schema migrated to the newest revision; SQLite gets WAL and may be used from the
    service's threads. ValueError for a URL SQLAlchemy cannot parse."""
    try:
        full = database_url(url)
        is_sqlite = full.startswith("sqlite")
        engine = create_engine(
            full, connect_args={"check_same_thread": False} if is_sqlite else {}, pool_pre_ping=not is_sqlite
        )
    except ArgumentError as error:  # a malformed URL, an unknown dialect or driver
        raise ValueError(f"--db: {url!r} is not a database URL (sqlite:///FILE or postgresql://...)") from error
    if is_sqlite:
        event.listen(engine, "connect", sqlite_pragmas)
    try:
        migrate(engine)
    except OperationalError as error:  # unreachable server, unknown database, a locked or unreadable file
        shown = make_url(full).render_as_string(hide_password=True)
        reason = str(error.orig or error).strip().splitlines()[0]
        raise ConnectionError(f"--db: cannot open the audit database {shown}: {reason}") from error
    return engine


def migrate(engine: Engine) -> None:
    """`alembic upgrade head` in one transaction; a database made before migrations existed is stamped first."""
    config = migration_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        if made_before_migrations(connection):
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")


def migration_config() -> Config:
    """Alembic's configuration for the migrations shipped in this package (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def made_before_migrations(connection: Connection) -> bool:
    tables = set(inspect(connection).get_table_names())
    return "inspections" in tables and "alembic_version" not in tables


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

    def add_profile(self, row: ProfileRow) -> None:
        """Commit the row as the name's next version; another replica taking that version first means retry."""
        for attempt in range(VERSION_TRIES):
            row.version = self.next_version(row.name)
            try:
                self.add([row])
                return
            except IntegrityError:
                if attempt == VERSION_TRIES - 1:
                    raise

    def add_key(self, name: str, key_sha256: str) -> None:
        """Store a new key's name and hash; ValueError when the name is taken."""
        try:
            self.add([ApiKeyRow(name=name, key_sha256=key_sha256, created=utc_now())])
        except IntegrityError as error:
            raise ValueError(f"an API key named {name!r} exists already") from error

    def has_keys(self) -> bool:
        """Whether any key was ever created here (revoked ones count: revoking the last key must not open the
        service)."""
        with self.sessions() as session:
            return session.scalar(select(ApiKeyRow.name).limit(1)) is not None

    def use_key(self, key_sha256: str) -> str | None:
        """The name of the unrevoked key with this hash, its use recorded; None when there is no such key."""
        now = utc_now()
        with self.sessions() as session:
            valid = select(ApiKeyRow).where(ApiKeyRow.key_sha256 == key_sha256, ApiKeyRow.revoked.is_(None))
            row = session.scalar(valid)
            if row is not None and (row.last_used is None or now - row.last_used >= LAST_USE_STEP):
                row.last_used = now
                session.commit()
        return None if row is None else row.name

    def key_revoked(self, key_sha256: str) -> bool:
        """Whether the key with this hash was created here and revoked since."""
        with self.sessions() as session:
            revoked = select(ApiKeyRow.name).where(ApiKeyRow.key_sha256 == key_sha256, ApiKeyRow.revoked.is_not(None))
            return session.scalar(revoked) is not None

    def api_keys(self) -> list[ApiKeyRow]:
        """Every key created here, revoked ones too, oldest first."""
        with self.sessions() as session:
            return list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created, ApiKeyRow.name)))

    def revoke_key(self, name: str) -> datetime:
        """Revoke the named key from now on (a key revoked before keeps its time); when it was revoked. ValueError
        for an unknown name."""
        with self.sessions.begin() as session:
            row = session.get(ApiKeyRow, name, with_for_update=True)
            if row is None:
                raise ValueError(f"no API key named {name!r} ('anomalygpt serve keys list' shows them)")
            row.revoked = row.revoked or utc_now()
            return row.revoked

    def count_question(self, key_name: str, minute: int) -> int:
        """Count one question of the key in this minute, in the row every replica sharing the database increments;
        how many it has asked in that minute, this one included."""
        try:
            return self.increment_questions(key_name, minute)
        except IntegrityError:  # another replica added the minute's row first: increment that one
            return self.increment_questions(key_name, minute)

    def increment_questions(self, key_name: str, minute: int) -> int:
        this = (QuestionCountRow.key_name == key_name, QuestionCountRow.minute == minute)
        with self.sessions.begin() as session:
            session.execute(update(QuestionCountRow).where(*this).values(count=QuestionCountRow.count + 1))
            count = session.scalar(select(QuestionCountRow.count).where(*this))  # its row stays locked till commit
            if count is not None:
                return count
            session.execute(delete(QuestionCountRow).where(QuestionCountRow.minute < minute - 1))  # minutes over
            session.add(QuestionCountRow(key_name=key_name, minute=minute, count=1))
        return 1

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
        "false_alarm_rate": row.false_alarm_rate,
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
