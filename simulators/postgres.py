"""Scratch PostgreSQL databases for tests and benchmarks: made on a server the caller names, dropped after."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def scratch_database(admin_dsn: str, prefix: str, connect_timeout: int = 5) -> Iterator[str]:
    """A new, uniquely named database on the server `admin_dsn` reaches (`prefix` + a random tag), dropped
    afterwards, sessions and all; its DSN. A server that does not answer raises psycopg.OperationalError."""
    import psycopg
    from psycopg import conninfo, sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}".lower()
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=connect_timeout) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield conninfo.make_conninfo(admin_dsn, dbname=name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
