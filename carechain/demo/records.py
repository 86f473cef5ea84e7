"""The demo's private records: a doctor in another city opens Alice's last hour of heart rate through 3-of-5 miners.

Everything goes through the real pieces (docs/access.md): Alice (a registered patient with a re-encryption
key) owns the health devices, whose readings the agent seals to her at the edge; five witness miners,
assembled as `carechain miner` assembles them (chain_miner.assembly), registered as miner parties and
bonded (carechain.demo.pharmacy_day), cosign the log; a checkpoint is final once a majority of the ledger's
active miners, 3 of the 5, cosigned it. The doctor signs a request and sends it to
Alice's inbox; Alice grants 3-of-5 with key fragments sealed to miners drawn from a final checkpoint; the
bridge appends request and grant after the contracts checked them; once the grant is under a final
checkpoint the chosen miners release capsule fragments to the doctor and the bridge serves the sealed
records; the doctor checks every fragment, decrypts, and checks every reading against its anchored hash
and its device's signature (record_access.client.open_access, as `carechain access open`). Then the
access log, and an outsider (the insurer) asking the bridge for the same records without a grant: refused.

Every wait is bounded; a step that does not happen in time is reported in the summary, never hidden.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain.config import BrokerConfig, Config
from carechain.entries import ENTRY_EVENT, Entry
from carechain.identity import Identity
from carechain.reencryption import PreKey
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from contract_rules import Genesis
from contract_rules import transactions as ce

MINERS = 5
THRESHOLD = 3  # the grant's m (of MINERS key fragments), and the majority of the 5 active miners finality needs
HOUR_MS = 3_600_000
STEP_TIMEOUT_S = 30.0  # a bound on each wait: a broken run fails instead of hanging
REFUSAL_QUIET_S = 1.0  # after the bridge counted the outsider's refusal: nothing may reach its inbox meanwhile
MEASURE_EVERY_S = 5.0  # while waiting for the grant to be final: one more reading of the band this often
DOCTOR_NAME = "Dr. Ines Moreau, cardiology (Lyon)"
MPC_TIMEOUT_S = 60.0  # one study computation of a demo miner (a few seconds on loopback): a hang fails loudly


class AccessDemoError(RuntimeError):
    """A step of the access demo did not happen as it must; the message says which."""


@dataclass
class Party:
    """A registered party with its keys: Ed25519 identity (signs) and re-encryption key pair."""

    name: str
    role: str
    identity: Identity
    pre: PreKey

    @property
    def id(self) -> str:
        return self.identity.device_id

    @classmethod
    def in_dir(cls, keys: Path, file: str, name: str, role: str) -> Party:
        """Load the party's keys from `keys`, or create them (0600) on a first run."""
        pre_file = keys / f"{file}.pre"
        pre = PreKey.load(pre_file) if pre_file.exists() else PreKey.generate()
        if not pre_file.exists():
            pre.save(pre_file)
        return cls(name, role, Identity.load_or_create(keys / f"{file}.key"), pre)

    def registration(self, ts: int) -> ce.PartyRegistration:
        return ce.PartyRegistration(role=self.role, pk=self.identity.public_key, name=self.name, ts=ts,
                                    pre_pk=self.pre.public_key, pre_vk=self.pre.verifying_key)


def keys_dir(root: Path) -> Path:
    """Where the demo keeps Alice's and the doctor's keys (each would hold only their own)."""
    return root / "parties"


def miner_dirs(root: Path) -> list[Path]:
    """The five miners' data directories under the demo's `root`."""
    return [root / "miners" / f"miner{i}" for i in range(MINERS)]


def load_miner_keys(root: Path) -> list[Identity]:
    """The five miners' keys (made on a first run): their party keys, with which they also post their bonds."""
    return [Identity.load_or_create(d / "miner.key") for d in miner_dirs(root)]


def load_alice(root: Path) -> Party:
    """Alice, the record owner: her keys (made on a first run) under the demo's `root`."""
    return Party.in_dir(keys_dir(root), "alice", "Alice", "patient")


def _wait(what: str, cond: Callable[[], bool], timeout: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AccessDemoError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _now_ms() -> int:
    return int(time.time() * 1000)


class RecordsDemo:
    """Alice, the doctor and the five miners (keys under `root`), and the access scenario once all runs."""

    def __init__(self, root: Path, alice: Party, genesis: Genesis, operator: Identity, ledger_file: Path) -> None:
        self.alice = alice
        self.doctor = Party.in_dir(keys_dir(root), "doctor", DOCTOR_NAME, "doctor")
        self.miner_dirs = miner_dirs(root)
        self.miner_keys = load_miner_keys(root)
        self.genesis, self.operator, self.ledger_file = genesis, operator, ledger_file
        self.miners: list[Any] = []  # chain_miner.assembly.AssembledMiner, once started

    @staticmethod
    def miner_name(key: Identity) -> str:
        return f"carechain.miner/{key.device_id}"

    def register(self, ts: int) -> None:
        """Alice (patient), the doctor and the miners as parties, before any device of Alice's is registered
        (idempotent across runs on one data dir)."""
        ledger = Ledger(self.ledger_file)
        try:
            parties = replay_ledger(ledger, self.genesis).state.table("parties")
            regs = [p.registration(ts) for p in (self.alice, self.doctor) if p.id not in parties]
            regs += [ce.PartyRegistration(role="miner", pk=k.public_key, name=f"demo miner {i}", ts=ts)
                     for i, k in enumerate(self.miner_keys) if k.device_id not in parties]
            if regs:
                submit(ledger, self.genesis, [ce.party_registration_entry(self.operator, r) for r in regs])
        finally:
            ledger.close()

    # -- the miners ------------------------------------------------------------------------------------

    def start_miners(self, cfg: Config, log_public_key: bytes, genesis_file: Path) -> None:
        """Assemble and start the five miners as `carechain miner` does, each on its own data dir, each with
        its `miner.mpc_listen` on a free loopback port range below the ephemeral ports (each study computation
        listens on one port of its range): they run the data market's studies they aggregate by themselves
        (chain_miner.study_runner; carechain.demo.market waits for them)."""
        from chain_miner.assembly import assemble_miner
        from simulators.ports import listen_port_ranges

        ports = listen_port_ranges(len(self.miner_dirs), cfg.miner.mpc_ports)
        for mdir, key, port in zip(self.miner_dirs, self.miner_keys, ports, strict=True):
            miner_cfg = cfg.model_copy(update={"miner": cfg.miner.model_copy(update={
                "mpc_listen": f"127.0.0.1:{port}", "mpc_timeout_s": MPC_TIMEOUT_S})})
            assembled = assemble_miner(miner_cfg, data_dir=mdir, key=mdir / "miner.key",
                                       log_public_key=log_public_key.hex(), name=self.miner_name(key),
                                       genesis=genesis_file)
            self.miners.append(assembled)
            assembled.miner.start()
            # One at a time: the embedded broker (amqtt) mishandles many sessions subscribing at once.
            _wait(f"miner {key.device_id} to connect", assembled.miner.connected.is_set)

    def stop_miners(self) -> None:
        for assembled in self.miners:
            assembled.miner.stop()
            assembled.close()
        self.miners = []

    def miner_stats(self) -> dict[str, int]:
        """The miners' counters, summed (cosigned, access_released, ...)."""
        total: dict[str, int] = {}
        for assembled in self.miners:
            for key, n in assembled.miner.stats.items():
                total[key] = total.get(key, 0) + n
        return total

    # -- the scenario ----------------------------------------------------------------------------------

    def run(self, broker: BrokerConfig, bridge: Any, band: str, outsider: Identity,
            measure: Callable[[], None]) -> dict[str, Any]:
        """Request → grant → final → fragments → open; the access log; an outsider refused. The summary's
        `access` section (`opened`, `logged`, `refused_without_grant` and what they rest on).

        `measure()` makes Alice's band take one more reading: the bridge checkpoints when its log grows
        through its own appends, so the grant (appended beside it, as `carechain access grant` does) is
        checkpointed, cosigned and final with the next reading."""
        result: dict[str, Any] = {"opened": False, "logged": 0, "refused_without_grant": False, "error": None,
                                  "doctor": self.doctor.id, "doctor_name": self.doctor.name, "owner": self.alice.id,
                                  "device": band, "log": []}
        try:
            self._run(broker, bridge, band, outsider, measure, result)
        except Exception as exc:  # reported in the summary, never hidden (the exit status says it failed)
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["log"] = self._log_rows()
        result["logged"] = len(result["log"])
        if result["error"] is None and not result["refused_without_grant"]:
            result["error"] = "the outsider's request was not refused"
        return result

    def _run(self, broker: BrokerConfig, bridge: Any, band: str, outsider: Identity, measure: Callable[[], None],
             result: dict[str, Any]) -> None:
        from carechain.access import request_hash
        from record_access import access_context, build_grant, build_request, parse_request_leaf
        from record_access.client import fetch_final_checkpoint, open_access, send_request
        from record_access.ledger_view import party_with_pre_keys, registered_miners

        _wait("a final checkpoint (3 of the 5 miners cosigning)", lambda: bridge.final_size() >= 0)
        note = fetch_final_checkpoint(broker, timeout=STEP_TIMEOUT_S)

        # The doctor asks, over MQTT to Alice's inbox.
        now = _now_ms()
        with _Inbox(broker, self.alice.id, "alice") as alice_inbox:
            request = build_request(self.doctor.identity, owner=self.alice.id, devices=[band], kinds=["heart_rate"],
                                    from_ms=now - HOUR_MS, to_ms=now, purpose="second opinion on palpitations",
                                    expires_ms=now + HOUR_MS, nonce=int.from_bytes(os.urandom(7), "big"), ts=now)
            send_request(broker, request)
            leaf = alice_inbox.get(f"the doctor's request in Alice's inbox ({alice_inbox.topic})")

        # Alice checks it against the doctor's registered key and grants 3-of-5.
        state = self._state()
        doctor = party_with_pre_keys(state, self.doctor.id)
        received = parse_request_leaf(leaf, doctor.pk)
        assert doctor.pre_pk is not None  # party_with_pre_keys guarantees it
        grant = build_grant(self.alice.identity, self.alice.pre, received, requester_pre_pk=doctor.pre_pk,
                            miners=registered_miners(state), final_note=note, threshold=THRESHOLD, shares=MINERS,
                            expires_ms=now + HOUR_MS, ts=_now_ms())
        ledger = Ledger(self.ledger_file)
        try:
            leaves = submit(ledger, self.genesis, [received.entry, grant.entry])
        finally:
            ledger.close()
        index = leaves[-1]
        result.update(access=index, request=request_hash(received.leaf()).hex(), miners=grant.grant.miners,
                      threshold=THRESHOLD)
        # The doctor connects at once (miners release only to a connected inbox or a persistent session, and the
        # embedded broker keeps none for a client it has not seen yet); the open asks the bridge again and
        # again until the grant is final, then collects fragments and pages.
        ctx = access_context(self._state(), index)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="demo-doctor") as doctor_thread:
            opening = doctor_thread.submit(open_access, broker, self.doctor.identity, self.doctor.pre, ctx,
                                           timeout=2 * STEP_TIMEOUT_S, now_ms=_now_ms, workers=1)
            last_reading = [0.0]

            def final() -> bool:
                if bridge.final_size() > index:
                    return True
                if time.monotonic() - last_reading[0] > MEASURE_EVERY_S:
                    last_reading[0] = time.monotonic()
                    measure()
                return False

            _wait(f"a final checkpoint covering the grant (leaf {index})", final)
            opened = opening.result(timeout=2 * STEP_TIMEOUT_S + 5)
        expected = self._anchored_heart_rate(band, now - HOUR_MS, now)
        result.update(readings=len(opened.readings), expected=expected, epochs=opened.epochs,
                      answered_by=opened.miners, faults=[f.miner for f in opened.faults],
                      problems=[p.to_json() for p in opened.problems[:10]], open_seconds=round(opened.seconds, 3),
                      bpm=[r["bpm"] for r in opened.readings if "bpm" in r][:12])
        result["opened"] = (not opened.problems and len(opened.readings) == expected > 0
                            and len(opened.miners) >= THRESHOLD)
        if not result["opened"]:
            raise AccessDemoError(f"opened {len(opened.readings)} of {expected} readings with "
                                  f"{len(opened.problems)} problem(s), fragments from {len(opened.miners)} miners")

        result["refused_without_grant"] = self._outsider_refused(broker, bridge, outsider, index)
        result["refusal"] = {"who": outsider.device_id, "asked_for": index, "reason": "not_requester"}

    def _outsider_refused(self, broker: BrokerConfig, bridge: Any, outsider: Identity, index: int) -> bool:
        """The outsider (registered, no grant) asks the bridge for the doctor's records: the bridge must
        count the refusal, and neither it nor any miner may send anything to the outsider's inbox."""
        from carechain import topics
        from carechain.access import sign_records_request

        if bridge.records is None:
            raise AccessDemoError("the bridge runs no record server (contracts off?)")
        before = bridge.records.stats["not_requester"]
        with _Inbox(broker, outsider.device_id, "outsider") as inbox:
            inbox.client.publish(topics.ACCESS_RECORDS, sign_records_request(outsider, index, 0),
                                 qos=1).wait_for_publish(STEP_TIMEOUT_S)
            _wait("the bridge to decide the outsider's records request",
                  lambda: bridge.records.stats["not_requester"] > before)
            time.sleep(REFUSAL_QUIET_S)
            return inbox.empty()

    # -- reading the ledger ----------------------------------------------------------------------------

    def _state(self) -> Any:
        ledger = Ledger(self.ledger_file)
        try:
            return replay_ledger(ledger, self.genesis).state
        finally:
            ledger.close()

    def _anchored_heart_rate(self, band: str, from_ms: int, to_ms: int) -> int:
        """Heart-rate events of the band anchored with a ts in [from_ms, to_ms] (what the grant covers)."""
        from carechain import envelope

        ledger = Ledger(self.ledger_file)
        try:
            count = 0
            for i in range(ledger.size):
                entry = Entry.decode(ledger.entry(i))
                if entry.type != ENTRY_EVENT:
                    continue
                payload = envelope.parse(entry.cose).payload
                if payload["dev"] == band and payload["kind"] == "heart_rate" and from_ms <= payload["ts"] <= to_ms:
                    count += 1
            return count
        finally:
            ledger.close()

    def _log_rows(self) -> list[dict[str, Any]]:
        from record_access import access_log

        try:
            entries = access_log(self._state())
        except Exception:  # the log is read from the ledger; a broken ledger is reported by the caller
            return []
        now = _now_ms()
        return [{**e.to_json(), "status": e.status(now)} for e in entries]


class _Inbox:
    """A party's inbox subscription (cc/v1/party/{id}/inbox) for the length of a `with` block."""

    def __init__(self, broker: BrokerConfig, party: str, who: str) -> None:
        from carechain import topics

        self.broker, self.party, self.topic = broker, party, topics.party_inbox(party)
        self.client_id = f"carechain-demo-{who}-{os.urandom(4).hex()}"
        self._got: queue.Queue[bytes] = queue.Queue()

    def __enter__(self) -> _Inbox:
        from carechain.transport import connect_client

        ready = threading.Event()
        self.client = connect_client(self.broker, self.client_id, subscriptions=[(self.topic, 1)], connected=ready,
                                     on_message=self._on_message)
        if not ready.wait(STEP_TIMEOUT_S):
            self.__exit__()
            raise AccessDemoError(f"could not subscribe {self.topic} within {STEP_TIMEOUT_S:.0f} s")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        if msg.topic == self.topic and msg.payload:  # a broker may deliver other topics' retained messages
            self._got.put(bytes(msg.payload))

    def get(self, what: str) -> bytes:
        try:
            return self._got.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise AccessDemoError(f"gave up after {STEP_TIMEOUT_S:.0f} s waiting for {what}") from None

    def empty(self) -> bool:
        return self._got.empty()
