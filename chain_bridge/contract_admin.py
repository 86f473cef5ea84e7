"""Contract entries from the command line: replay the ledger, check an entry, append it; Rx files.

The shell around `contract_rules` that `carechain party|rx|policy|balance` use on the bridge host:
each command replays the ledger in the bridge data dir from its genesis, dry-runs the new entry with
`Runtime.check` (so a refused entry never reaches the log, and the user sees the contract's reason),
then appends it durably. The Rx body stays off the ledger in an Rx file (JSON) held by patient and
pharmacy; only its hash and terms are anchored.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from carechain.entries import Entry
from carechain.files import write_atomic
from carechain.identity import Identity, device_id_for, parse_public_key_hex
from chain_bridge.contract_gate import SNAPSHOT_EVERY, clock_attestation, wall_clock_ms
from chain_bridge.ledger.store import Ledger
from contract_rules import Genesis, Replica, Runtime
from contract_rules import transactions as ce
from contract_rules.replay import SnapshotError, genesis_hash
from contract_rules.runtime import OK

log = logging.getLogger("carechain.bridge")

class ContractRefused(Exception):
    """The contracts would reject the entry: nothing was appended."""

    def __init__(self, entry_type: str, reason: str) -> None:
        super().__init__(f"the contracts refuse this {entry_type}: {reason}")
        self.reason = reason


def replay_ledger(ledger: Ledger, genesis: Genesis) -> Runtime:
    """A runtime that has applied every committed leaf of `ledger`, in order.

    It starts from the newest contract snapshot in the ledger's database (the state is equal to a replay from
    leaf 0: tests/test_contract_snapshots.py) and leaves one behind when it applied many leaves, so the next
    command on a long log (an owner's `access grant`, `balance`) does not replay it all again.
    """
    replica = Replica(genesis)
    key = genesis_hash(genesis)
    found = ledger.contract_snapshot(key)
    if found is not None:
        try:
            replica.restore(found[1])
        except SnapshotError as exc:
            log.warning("contract snapshot at %d leaves not used (%s): replaying from the genesis", found[0], exc)
            replica.reset()
    start, size = replica.size, ledger.size
    replica.apply_leaves(ledger.leaves(start, size))
    if size - start >= SNAPSHOT_EVERY:
        try:
            ledger.save_contract_snapshot(size, key, replica.snapshot())
        except sqlite3.Error as exc:  # a cache beside the log: the next command replays a little more
            log.warning("could not save a contract snapshot at %d leaves: %s", size, exc)
    return replica.runtime


def submit(ledger: Ledger, genesis: Genesis, entries: Sequence[Entry], clock: Identity | None = None) -> list[int]:
    """Check `entries` in order against a replay of the ledger, then append them all; their leaf indexes.

    With `clock` (the bridge's operator key) a `clock.attest` goes in first when the attested time is stale,
    so rules that judge on time (settlement weeks, unbonding) see the time of this submission.
    Raises ContractRefused (nothing appended) if any would be rejected. Another process appending in
    between can still change the outcome; run these commands on the bridge host, one at a time.
    """
    runtime = replay_ledger(ledger, genesis)
    attest = clock_attestation(clock, runtime.state, wall_clock_ms()) if clock is not None else None
    batch = [attest, *entries] if attest is not None else list(entries)
    for entry in batch:
        reason = runtime.check(entry)
        if reason != OK:
            raise ContractRefused(entry.type, reason)
        runtime.apply(entry)
    return ledger.append_entries(batch)[len(batch) - len(entries):]


# -- Rx files ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RxFile:
    """A signed prescription as patient and pharmacy hold it: the body, the prescriber's signature and key."""

    rx: ce.Prescription
    signature: bytes
    prescriber_pk: bytes

    def to_json(self) -> dict[str, Any]:
        return {"rx": {**self.rx.model_dump(), "nonce": self.rx.nonce.hex()}, "rx_ref": self.rx.rx_ref(),
                "signature": self.signature.hex(), "prescriber_public_key": self.prescriber_pk.hex()}

    def write(self, path: Path) -> None:
        """Atomically and fsynced, readable by its owner only: it names a patient's medication."""
        write_atomic(Path(path), (json.dumps(self.to_json(), indent=2) + "\n").encode())


class RxFileError(ValueError):
    pass


def read_rx_file(path: Path) -> RxFile:
    try:
        raw = json.loads(Path(path).read_text())
        body = dict(raw["rx"])
        body["nonce"] = bytes.fromhex(body["nonce"])
        rx = ce.Prescription.model_validate(body)
        signed = RxFile(rx, bytes.fromhex(raw["signature"]),
                        parse_public_key_hex(raw["prescriber_public_key"], "prescriber_public_key"))
    except OSError as exc:
        raise RxFileError(f"{path}: cannot read: {exc.strerror}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RxFileError(f"{path}: rx.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RxFileError(f"{path}: not a signed Rx file (from `carechain rx issue`): {exc!r}") from None
    if device_id_for(signed.prescriber_pk) != rx.prescriber:
        raise RxFileError(f"{path}: prescriber_public_key is not the key of prescriber {rx.prescriber}")
    return signed


def rx_status(runtime: Runtime, rx: RxFile, now_ms: int) -> dict[str, Any]:
    """What the ledger says about an Rx file at `now_ms`: signature, anchor, revocation, expiry, fills left
    (an off-ledger check). `ok` says whether it would allow a sale now; when not, `problem` says why."""
    ref = rx.rx.rx_ref()
    record = runtime.state.table("rx").get(ref)
    status: dict[str, Any] = {"rx_ref": ref, "anchored": record is not None}
    if record is None:
        status.update(problem="rx_unknown: no rx.anchor for this rx_ref on the ledger", ok=False)
        return status
    party = runtime.state.table("parties").get(record["prescriber"])
    anchor = ce.RxAnchor(rx_ref=ref, patient_c=record["patient_c"], drug_c=record["drug_c"],
                         quantity=record["quantity"], refills=record["refills"], expires_ms=record["expires_ms"],
                         controlled=record["controlled"], ts=rx.rx.issued_ms)
    problem = None
    if party is None or party["pk"] != rx.prescriber_pk:
        problem = "the anchoring prescriber's registered key is not the key in this file"
    else:
        problem = ce.check_rx_against_anchor(rx.rx, rx.signature, rx.prescriber_pk, anchor)
    fills_left = 1 + record["refills"] - record["fills"]
    status.update(anchor_leaf=record["at"], prescriber=record["prescriber"], revoked_at=record["revoked_at"],
                  expires_ms=record["expires_ms"], fills_used=record["fills"], fills_left=fills_left,
                  open_quantity=record["open"], sale_leaves=list(record["sales"]))
    if problem is not None:
        status["problem"] = problem
    elif record["revoked_at"] is not None:
        status["problem"] = f"rx_revoked at leaf {record['revoked_at']}"
    elif record["expires_ms"] <= now_ms:
        status["problem"] = "rx_expired"
    # A sale is allowed while a fill is left, or while the open fill still has quantity to dispense.
    status["ok"] = "problem" not in status and fills_left + (record["open"] > 0) > 0
    return status
