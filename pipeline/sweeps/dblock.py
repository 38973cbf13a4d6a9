"""A lock held by the database server of a study, for workers on several machines.

Workers on one machine serialise "count the budget, then ask a trial" with a file lock beside the storage.
Workers on other machines share no disk, only the database: PostgreSQL's advisory locks and MySQL's GET_LOCK
are held by a connection, so the server releases them when a worker dies, even by SIGKILL.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

SERVER_SCHEMES = ("postgresql", "mysql")  # the RDB storages whose servers offer a named lock


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's pg_advisory_lock(bigint)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextlib.contextmanager
def server_lock(url: str, name: str) -> Iterator[None]:
    """Hold the lock `name` on the server at `url` (a SQLAlchemy URL) for the block."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool
    engine = sa.create_engine(url, poolclass=NullPool)  # one connection per hold: nothing idle left open
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                acquire, release = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
                args = {"key": lock_key(name)}
            else:  # mysql: a name of at most 64 characters; -1 waits as long as it takes
                acquire, release = "SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)"
                args = {"key": name[:64]}
            conn.execute(sa.text(acquire), args)
            conn.commit()  # the lock belongs to the session, not to this transaction
            try:
                yield
            finally:
                conn.execute(sa.text(release), args)
                conn.commit()
    finally:
        engine.dispose()
