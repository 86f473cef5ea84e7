"""The sequencer lease: which one of several bridge hosts sharing a PostgreSQL ledger ingests, appends and
checkpoints.

The lease is a session-level PostgreSQL advisory lock (`pg_try_advisory_lock`) held on a connection of its own.
The server ends the session of a process that dies (at once for a killed process, within the keepalive
probes for a host that vanished), which releases the lock, and a standby polling for it takes over. The lease
never guards the log by itself: every append also takes the writer lock and deduplicates under it, so even two
hosts that both believed they held the lease would never append an event twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from carechain.sqlite_store import StoreError
from chain_bridge.ledger.postgres import PostgresLocation, advisory_key

__all__ = ["LeaseLost", "SequencerLease"]

log = logging.getLogger("carechain.bridge")

# How often a standby asks for the lease, and the active bridge checks it still holds it: the take-over time
# is the server noticing the holder's session ended plus at most one poll.
POLL_S = 0.25


class LeaseLost(Exception):
    """The sequencer lease is no longer held (its connection broke, or the lock is gone)."""


class SequencerLease:
    """One bridge's claim on the sequencer role of the ledger at `location`."""

    def __init__(self, location: PostgresLocation, *, poll_s: float = POLL_S, name: str | None = None) -> None:
        self.poll_s = poll_s
        # What a standby's log says holds the lease (the session's application_name: 63 bytes at most).
        self.name = (name or f"carechain-bridge {socket.gethostname()} pid {os.getpid()}")[:63]
        self._location = location
        self._conn = location.open(application_name=self.name)
        schema = self._conn.execute("SELECT current_schema()").fetchone()
        self.key = advisory_key("sequencer", schema[0] if schema else "")
        self.held = False
        self._lock = threading.Lock()  # one statement at a time on the lease connection
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True if this bridge holds it now."""
        with self._lock:
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        self.held = bool(row and row[0])
        return self.held

    def holder(self) -> str:
        """Who holds the lease, as the database knows it: "carechain-bridge <host> pid <pid> (from <address>)"."""
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        with self._lock:
            row = self._conn.execute(
                "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 1 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
        if row is None:
            return "nobody (free)"
        name, address, backend = row
        return f"{name or 'an unnamed session'} (from {address or 'a local socket'}, server pid {backend})"

    def wait(self, stopping: Callable[[], bool], while_waiting: Callable[[], Any] = lambda: None) -> bool:
        """Block until this bridge holds the lease (True) or `stopping()` (False), calling `while_waiting`
        each poll (the hot standby keeps its ledger and contracts caught up)."""
        announced = ""
        unreachable = False
        while not stopping():
            try:
                self._reconnect_if_lost()
                if self.try_acquire():
                    if announced:
                        log.warning("sequencer lease taken over (it was held by %s): this bridge is now the "
                                    "active sequencer", announced)
                    return True
                holder = self.holder()
                if holder != announced:
                    log.warning("standby: waiting for the sequencer lease held by %s", holder)
                    announced = holder
                while_waiting()
                unreachable = False
            except (psycopg.Error, StoreError, OSError) as exc:  # a standby outlives a database restart
                if not unreachable:
                    log.warning("standby: cannot reach the ledger database (%s); trying again every %.2f s",
                                str(exc).strip(), self.poll_s)
                unreachable = True
            self._closed.wait(self.poll_s)
        return False

    def _reconnect_if_lost(self) -> None:
        """Open the lease connection anew if it broke while the lease was not held (a held one is lost)."""
        with self._lock:
            if (self._conn.closed or self._conn.broken) and not self.held:
                self._conn.close()
                self._conn = self._location.open(application_name=self.name)

    def check(self) -> None:
        """Raise `LeaseLost` unless this session is alive and still holds the lock."""
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        try:
            with self._lock:
                row = self._conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND "
                    "granted AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
                    (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
        except psycopg.Error as exc:
            self.held = False
            raise LeaseLost(f"the lease connection to {self._location.describe()} failed: {str(exc).strip()}") \
                from None
        if not row or not row[0]:
            self.held = False
            raise LeaseLost("the database no longer lists this session as the lease holder")

    def watch(self, on_lost: Callable[[LeaseLost], None]) -> None:
        """Check the lease every poll on a daemon thread; call `on_lost` once, at once, if it is lost."""
        def run() -> None:
            while not self._closed.wait(self.poll_s):
                try:
                    self.check()
                except LeaseLost as exc:
                    if not self._closed.is_set():
                        on_lost(exc)
                    return

        self._watcher = threading.Thread(target=run, name="sequencer-lease", daemon=True)
        self._watcher.start()

    def release(self) -> None:
        """Give the lease up (a clean stop: a standby takes over at its next poll) and close the connection."""
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            if self.held and not self._conn.closed:
                with contextlib.suppress(psycopg.Error):  # the session is gone, and the lock with it
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            self.held = False
            self._conn.close()
