"""One Ledger shared by threads (the sequencer, the bridge's checkpoint loop refreshing it, a test or command
appending registrations): the in-memory tree must always be exactly the committed leaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from carechain.entries import Registration, registration_entry
from carechain.identity import Identity
from tests.conftest import LedgerFactory

OPERATOR = Identity.from_seed(b"\x41" * 32)


def test_refreshing_while_another_thread_appends_never_counts_a_leaf_twice(tmp_path: Path,
                                                                          ledger_factory: LedgerFactory) -> None:
    ledger = ledger_factory(tmp_path / "ledger.db")
    stop = threading.Event()

    def refresh_forever() -> None:
        while not stop.is_set():
            ledger.refresh()

    refresher = threading.Thread(target=refresh_forever)
    refresher.start()
    try:
        for _ in range(150):
            dev = Identity.generate()
            reg = Registration(dev=dev.device_id, pk=dev.public_key, profile="scale", owner="p", site="s",
                               ts=int(time.time() * 1000))
            [index] = ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
            assert index == ledger.size - 1 or index < ledger.size
    finally:
        stop.set()
        refresher.join()
    assert ledger.size == 150
    reopened = ledger_factory(tmp_path / "ledger.db")  # the stored leaves are contiguous and the roots agree
    assert reopened.size == 150 and reopened.tree.root() == ledger.tree.root()
    reopened.close()
    ledger.close()
