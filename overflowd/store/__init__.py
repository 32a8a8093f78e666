"""The report store: SQLAlchemy models, the repository and its Alembic migrations.

Import from here; :mod:`overflowd.store.repository` is the one module that talks to the
database, and the only thing services need is :class:`Store`.
"""

from __future__ import annotations

from overflowd.store.repository import (
    VIAS,
    ObserverRow,
    Store,
    StoredReport,
    StoreStatistics,
    address_to_key,
    default_url,
    key_to_address,
    network_range,
)

__all__ = [
    "VIAS",
    "ObserverRow",
    "Store",
    "StoreStatistics",
    "StoredReport",
    "address_to_key",
    "default_url",
    "key_to_address",
    "network_range",
]
