"""Alembic's environment for the audit trail: runs on the connection audit.migrate hands over (one transaction).

Run by hand (`alembic -c <ini>`), it connects to the ini's `sqlalchemy.url` instead.
"""

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from anomalygpt.service.audit import Base


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise ValueError("alembic: set sqlalchemy.url, or let anomalygpt serve migrate at start-up")
    with create_engine(url).begin() as opened:
        run_on(opened)


run()
