"""The events-index check of `carechain verify --full`, per event: one query per event against one query per
batch of `INDEX_BATCH` events (what the audit does), on SQLite and on PostgreSQL (when a server answers).

The audit checks, for every event leaf, that the store's (device, seq) index points at that leaf. On SQLite a
query is a function call; on PostgreSQL it is a round trip, which one query per event paid for every leaf, in
the audit's one ordered process (the part that workers do not spread). Both stores get the same `--events`
rows (1,000 devices); each figure is one run on this machine.

    python bench/audit_index.py [--events 20000] [--dsn "host=127.0.0.1 dbname=test"] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chain_bridge.ledger.integrity import INDEX_BATCH  # noqa: E402
from chain_bridge.ledger.log_source import SqliteLogSource  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402

Key = tuple[str, int]


def rows(events: int) -> list[tuple[str, int, int, bytes]]:
    return [(f"dev{i % 1000:04d}", i // 1000, i, bytes(32)) for i in range(events)]


def per_event_us(one: Callable[[str, int], int | None], many: Callable[[Sequence[Key]], dict[Key, int]],
                 keys: list[Key]) -> tuple[float, float]:
    """(µs per event with one query each, µs per event in batches of INDEX_BATCH), each checked complete."""
    started = time.perf_counter()
    assert all(one(*key) is not None for key in keys)
    single = (time.perf_counter() - started) / len(keys) * 1e6
    started = time.perf_counter()
    found = 0
    for start in range(0, len(keys), INDEX_BATCH):
        found += len(many(keys[start:start + INDEX_BATCH]))
    batched = (time.perf_counter() - started) / len(keys) * 1e6
    assert found == len(keys)
    return single, batched


def sqlite_figures(events: int, work: Path) -> tuple[float, float]:
    path = work / "ledger.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO events (device_id, seq, idx, leaf_hash) VALUES (?, ?, ?, ?)", rows(events))
    db.commit()
    db.close()
    with SqliteLogSource(path) as log:
        return per_event_us(log.event_index, log.event_indexes, [(d, s) for d, s, _i, _h in rows(events)])


def postgres_figures(events: int, dsn: str) -> tuple[float, float] | str:
    with contextlib.ExitStack() as held:
        try:
            from chain_bridge.ledger.postgres import PostgresLocation, PostgresLogSource
            from simulators.postgres import scratch_database

            scratch = held.enter_context(scratch_database(dsn, "cc_bench_audit_index", connect_timeout=3))
        except Exception as exc:  # no driver, no server: say so and report SQLite alone
            return f"skipped ({type(exc).__name__}: {str(exc).strip()[:120]})"
        location = PostgresLocation(scratch)
        Ledger(location).close()
        with location.open() as conn, conn.cursor().copy(
                "COPY events (device_id, seq, idx, leaf_hash) FROM STDIN") as copy:
            for row in rows(events):
                copy.write_row(row)
        log = PostgresLogSource(location)
        try:
            return per_event_us(log.event_index, log.event_indexes, [(d, s) for d, s, _i, _h in rows(events)])
        finally:
            log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--dsn", default="host=127.0.0.1 dbname=test", help="a PostgreSQL server to create a "
                        "scratch database on (dropped after)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report: dict[str, object] = {"events": args.events, "batch": INDEX_BATCH,
                                     "sqlite": sqlite_figures(args.events, Path(tmp))}
    report["postgresql"] = postgres_figures(args.events, args.dsn)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"events index check, {args.events:,} events, µs per event: one query each → batches of {INDEX_BATCH}")
    for store in ("sqlite", "postgresql"):
        got = report[store]
        if isinstance(got, tuple):
            print(f"  {store:>10}: {got[0]:7.1f} → {got[1]:5.2f}  ({got[0] / got[1]:.0f}x)")
        else:
            print(f"  {store:>10}: {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
