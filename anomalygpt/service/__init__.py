"""`anomalygpt serve`: the HTTP inspection service (profiles, micro-batched inspections, API keys, audit trail).

A front end: it imports the core library, never the other way round. Needs fastapi, uvicorn, python-multipart and
sqlalchemy (the [serve] extra).
"""

from anomalygpt.service.app import Limits, create_app, read_api_keys

__all__ = ["Limits", "create_app", "read_api_keys"]
