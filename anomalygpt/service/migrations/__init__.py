"""Alembic migrations of the audit trail, applied by the service at start-up (audit.migrate)."""
