"""Alembic environment of the report store.

:meth:`overflowd.store.repository.Store.open` runs ``upgrade head`` programmatically and hands
its own connection (already inside a transaction, and on PostgreSQL holding an advisory lock)
through ``config.attributes["connection"]``; the migration then commits or rolls back with that
transaction. No ``alembic.ini`` is needed at run time. The alembic CLI still works for a DBA
given a config that sets ``script_location`` and ``sqlalchemy.url``; ``alembic upgrade head
--sql`` renders the SQL offline for review.

This file must stay importable without side effects other than running migrations: Alembic
executes it as a script each time a command runs.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from overflowd.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection in config.attributes and no sqlalchemy.url set")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
