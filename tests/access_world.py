"""A whole access deployment with real processes, for tests/test_access_e2e.py and bench/access.py.

One `carechain bridge` (contracts on, finality = `threshold` of the miners), `carechain miner` processes
registered as parties (role miner, their cosigning key), a patient (record owner) and a doctor
(requester) registered with re-encryption keys, and one heart-rate device of the patient whose sealed
protocol-2 events are made with the agent's own sealing code (`edge_agent.sealing`) and published on its
event topic like an agent's. Access goes through the `carechain access` CLI; what the CLI does not expose
(a grant appended together with its revocation, an already-expired grant) goes through `record_access`
and `chain_bridge.contract_admin.submit`, the functions that CLI calls.

Every wait is bounded (`wait_for`) and fails with what it waited for and the processes' log tails.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from carechain import cbor, envelope, topics
from carechain.checkpoint import NoteError, parse_note
from carechain.config import BrokerConfig
from carechain.entries import Registration, registration_entry
from carechain.identity import Identity
from carechain.miner_messages import CosignatureMessage
from carechain.reencryption import PreKey
from carechain.sealed import DEFAULT_EPOCH_MS, epoch_of, split_wire
from carechain.transport import connect_client
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import DEFAULT_ALLOCATIONS, contract_genesis, ledger_path, log_key, operator_key
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from edge_agent.outbox import DataKey
from edge_agent.sealing import RecordOwner, new_epoch_key, reading_body, seal_reading, sign_epoch_key
from simulators.miners import CARECHAIN, GARBAGE_FLAG

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 90.0  # a bound so that a broken run fails instead of hanging; nothing asserts on timing
HOUR_MS = DEFAULT_EPOCH_MS


def wait_for(what: str, cond: Callable[[], bool], timeout: float = DEADLINE_S,
             context: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}" + (f"\n{context()}" if context else ""))
        time.sleep(0.05)


def now_ms() -> int:
    return int(time.time() * 1000)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


class Process:
    """A `carechain` process whose stdout and stderr go to one log file (read back for readiness)."""

    def __init__(self, name: str, args: Sequence[str], cwd: Path, log: Path) -> None:
        self.name, self.args, self.cwd, self.log = name, list(args), cwd, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, args: Sequence[str] | None = None) -> None:
        if args is not None:
            self.args = list(args)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=env, stdout=out, stderr=out)

    def output(self) -> str:
        """What this run (since the last start) wrote."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_output(self, text: str, timeout: float = DEADLINE_S) -> None:
        def seen() -> bool:
            if not self.running():
                raise AssertionError(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
            return text in self.output()

        wait_for(f"{self.name} to print {text!r}", seen, timeout, self.tail)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self) -> str:
        return f"--- {self.name} ({self.log}) ---\n{_tail(self.log)}"


@dataclass
class Party:
    """A registered party with its key files (Ed25519 identity and re-encryption key)."""

    identity: Identity
    pre: PreKey
    key_file: Path
    pre_file: Path

    @property
    def id(self) -> str:
        return self.identity.device_id

    @classmethod
    def create(cls, keys: Path, name: str) -> Party:
        identity, pre = Identity.generate(), PreKey.generate()
        identity.save(keys / f"{name}.key")
        pre.save(keys / f"{name}.pre")
        return cls(identity, pre, keys / f"{name}.key", keys / f"{name}.pre")


@dataclass(frozen=True)
class Sent:
    """A reading the device sealed and published, with its plaintext (what an opener must get back)."""

    seq: int
    ts: int
    epoch: int
    body: dict[str, Any]

    @property
    def plaintext(self) -> bytes:
        return cbor.encode(self.body)


@dataclass(frozen=True)
class Fragments:
    """A capsule-fragments message seen on a party's inbox (not verified here)."""

    party: str
    access: int
    miner: str
    raw: bytes


class Observer:
    """An auditor on the (open test) broker: inboxes, cosignatures, final checkpoints, fault evidence."""

    def __init__(self, broker: BrokerConfig, parties: Sequence[str], client_id: str) -> None:
        self._lock = threading.Lock()
        self.fragments: list[Fragments] = []
        self.pages: dict[str, int] = {}
        self.cosigned: dict[int, set[str]] = {}  # tree size -> cosigner names
        self.finals: list[tuple[int, str]] = []  # (tree size, note)
        self.evidence: list[bytes] = []
        self.connected = threading.Event()
        subs = [(topics.party_inbox(p), 1) for p in parties]
        subs += [(topics.MINER_COSIG_WILDCARD, 1), (topics.FINAL_CHECKPOINT, 1), (topics.ACCESS_EVIDENCE, 1)]
        self.client = connect_client(broker, client_id, on_message=self._on_message, connected=self.connected,
                                     subscriptions=subs)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if not payload:
            return
        with self._lock:
            party = topics.party_of_inbox_topic(msg.topic)
            if party is not None:
                try:  # a miner's capsule fragments, or a records page (the bridge signs those too)
                    sign1 = envelope.parse(payload, max_bytes=1 << 21, max_depth=6)
                    if "frags" in sign1.payload:
                        self.fragments.append(Fragments(party, int(sign1.payload["access"]), sign1.kid, payload))
                    else:
                        self.pages[party] = self.pages.get(party, 0) + 1
                except (envelope.EnvelopeError, KeyError, TypeError, ValueError):
                    self.pages[party] = self.pages.get(party, 0) + 1
            elif msg.topic == topics.FINAL_CHECKPOINT:
                try:
                    size = int(parse_note(payload.decode())[0].split("\n")[1])
                except (NoteError, IndexError, ValueError, UnicodeDecodeError):
                    return
                self.finals.append((size, payload.decode()))
            elif msg.topic == topics.ACCESS_EVIDENCE:
                self.evidence.append(payload)
            else:
                try:
                    m = CosignatureMessage.model_validate_json(payload)
                except ValueError:
                    return
                self.cosigned.setdefault(m.tree_size, set()).add(m.miner)

    def fragments_for(self, access: int) -> list[Fragments]:
        with self._lock:
            return [f for f in self.fragments if f.access == access]

    def miners_released(self, access: int) -> set[str]:
        return {f.miner for f in self.fragments_for(access)}

    def final_size(self) -> int:
        with self._lock:
            return max((s for s, _ in self.finals), default=-1)

    def latest_final(self) -> str:
        with self._lock:
            return max(self.finals)[1] if self.finals else ""

    def cosigners_at_or_after(self, size: int) -> set[str]:
        """Miners that cosigned some checkpoint of at least `size` leaves."""
        with self._lock:
            return set().union(*(names for s, names in self.cosigned.items() if s >= size))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Miner:
    """One `carechain miner` process with a key made up front (registered as a party before it starts)."""

    def __init__(self, data_dir: Path, world: AccessWorld) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = Identity.generate()
        self.key.save(self.dir / "miner.key")
        self.world = world
        self.garbage = False
        # Its log goes beside the data dir, not in it: the plain-text scan covers exactly what the miner keeps.
        self.process = Process(f"miner {self.id}", [], self.dir, world.root / f"{data_dir.name}.log")

    @property
    def id(self) -> str:
        return self.key.device_id

    @property
    def name(self) -> str:
        return f"carechain.miner/{self.id}"

    def start(self, garbage: bool = False) -> None:
        """Start (again, from its data dir); `garbage`: as simulators.miners' garbage capsule-fragment miner."""
        self.garbage = garbage
        command = [sys.executable, "-m", "simulators.miners", GARBAGE_FLAG] if garbage else CARECHAIN
        w = self.world
        self.process.start([*command, "miner", "--data-dir", str(self.dir), "--broker", w.broker.address,
                            "--log-public-key", w.log_public_key.hex(), "--genesis", str(w.genesis_file), "--verbose"])

    def wait_ready(self) -> None:
        self.process.wait_output('"miner"')

    def stop(self) -> None:
        self.process.stop()


@dataclass
class AccessWorld:
    root: Path
    broker: BrokerConfig
    checkpoint_interval_s: float = 1.0
    n_miners: int = 5
    threshold: int = 3  # a majority of the 5 bonded miners: the bridge takes finality from the ledger
    max_packet_bytes: int | None = None  # every party's broker.max_packet_bytes (records pages fit below it)
    miners: list[Miner] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.bridge_dir = self.root / "bridge"
        self.keys = self.root / "keys"
        self.keys.mkdir(exist_ok=True)
        self.log_key = log_key(self.bridge_dir)
        self.log_public_key = self.log_key.public_key
        self.operator = operator_key(self.bridge_dir)
        self.miners = [Miner(self.root / f"miner{i}", self) for i in range(self.n_miners)]
        self.granted: list[int] = []  # every access record this world made, in order
        self.patient = Party.create(self.keys, "patient")
        self.doctor = Party.create(self.keys, "doctor")
        self.device = Identity.generate()
        self.device.save(self.keys / "band.key")
        self.config = self.root / "carechain.yaml"
        self.config.write_text(yaml.safe_dump({
            "broker": {"host": self.broker.host, "port": self.broker.port,
                       **({"max_packet_bytes": self.max_packet_bytes} if self.max_packet_bytes else {})},
            "bridge": {
                "data_dir": str(self.bridge_dir), "checkpoint_interval_s": self.checkpoint_interval_s,
            },
        }))
        # The deployment's genesis as the bridge writes it: its operators include the log key, so the access
        # rule takes the bridge's signature on a grant's seed checkpoint (and requesters its records pages).
        # The miners' bonds are funded by the genesis: finality counts bonded (active) miners only.
        self.genesis = contract_genesis(self.bridge_dir, {
            **DEFAULT_ALLOCATIONS, **{f"miner:{m.key.device_id}": MIN_BOND["miner"] for m in self.miners}})
        assert self.log_public_key in self.genesis.operators.values(), "the log key is not a genesis operator"
        self.genesis_file = self.bridge_dir / "contracts" / "genesis.json"
        self.bridge = Process("bridge", [*CARECHAIN, "bridge", "--config", str(self.config), "--verbose"], self.root,
                              self.root / "bridge.log")
        self.observer: Observer | None = None
        self._publisher: mqtt.Client | None = None
        self._seq = 0
        self._keys: dict[int, DataKey] = {}
        self._device_lock = threading.Lock()
        self._streaming = threading.Event()  # set: the band stops

    # -- set-up ---------------------------------------------------------------------------------------

    def register(self) -> None:
        """Miners, patient and doctor as parties, and the patient's heart-rate band, before the bridge runs."""
        ts = now_ms()
        regs = [ce.PartyRegistration(role="miner", pk=m.key.public_key, name=f"miner {i}", ts=ts)
                for i, m in enumerate(self.miners)]
        for role, party in (("patient", self.patient), ("doctor", self.doctor)):
            regs.append(ce.PartyRegistration(role=role, pk=party.identity.public_key, name=role, ts=ts,
                                             pre_pk=party.pre.public_key, pre_vk=party.pre.verifying_key))
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            submit(ledger, self.genesis, [
                *(ce.party_registration_entry(self.operator, r) for r in regs),
                *(ce.signed(m.key, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["miner"], nonce=1, ts=ts))
                  for m in self.miners)])
            reg = Registration(dev=self.device.device_id, pk=self.device.public_key, profile="heart_rate_band",
                               owner=self.patient.id, site="home", ts=ts)
            ledger.append_registrations([(registration_entry(self.operator, reg), reg)])
        finally:
            ledger.close()

    def start(self, before_processes: Callable[[], None] | None = None) -> None:
        """Register the parties and the band, run `before_processes` (e.g. `prefill`), then start the bridge
        and the miners and wait until each is ready."""
        from simulators.miners import clear_retained

        # A session broker may hold another test's retained notes: the grant's seed must be this log's.
        clear_retained(self.broker, f"access-world-clear-{os.getpid()}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT])
        self.register()
        if before_processes is not None:
            before_processes()
        self.observer = Observer(self.broker, [self.doctor.id, self.patient.id],
                                 f"access-world-observer-{os.getpid()}-{id(self)}")
        assert self.observer.connected.wait(30), "observer could not connect to the broker"
        ready = threading.Event()
        self._publisher = connect_client(self.broker, f"access-world-device-{self.device.device_id}",
                                         connected=ready)
        assert ready.wait(30), "device publisher could not connect"
        self.bridge.start()
        self.bridge.wait_output("bridge ready")
        for m in self.miners:
            m.start()
        for m in self.miners:
            m.wait_ready()

    def stop(self) -> None:
        self._streaming.set()
        with self._device_lock:  # the band's last publish is done
            pass
        for m in self.miners:
            m.stop()
        self.bridge.stop()
        for client in (self._publisher, self.observer.client if self.observer else None):
            if client is not None:
                client.disconnect()
                client.loop_stop()
        from simulators.miners import clear_retained

        clear_retained(self.broker, f"access-world-clear-{os.getpid()}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT])

    def logs(self) -> str:
        return "\n".join([self.bridge.tail(), *(m.process.tail() for m in self.miners)])

    # -- the device ---------------------------------------------------------------------------------

    def _publish(self, wire: bytes) -> None:
        assert self._publisher is not None
        info = self._publisher.publish(topics.events(self.device.device_id), wire, qos=1)
        info.wait_for_publish(30)

    def _seal(self, ts: int, value: int) -> tuple[list[bytes], Sent]:
        """The wire messages of one reading at `ts` (preceded by its epoch's epoch_key event when new)."""
        owner = RecordOwner(self.patient.id, self.patient.pre.public_key)
        wires = []
        epoch = epoch_of(ts, HOUR_MS)
        if epoch not in self._keys:
            self._keys[epoch] = key = new_epoch_key(self.device.device_id, epoch, HOUR_MS)
            self._seq += 1
            wires.append(sign_epoch_key(self.device, key, owner, ts)(self._seq))
        body = reading_body("heart_rate", {"bpm": value, "rr_intervals_1024": [1000 + value, 1001 + value]})
        self._seq += 1
        wires.append(seal_reading(self.device, self._keys[epoch], self._seq, ts, "heart_rate", body))
        return wires, Sent(self._seq, ts, epoch, body)

    def publish_readings(self, timestamps: Sequence[int]) -> list[Sent]:
        """Seal and publish one heart-rate reading per timestamp (ascending), an epoch_key event before the
        first reading of each epoch, as the agent does; wait until the bridge stored every ciphertext."""
        sent = []
        with self._device_lock:
            for ts in timestamps:
                wires, reading = self._seal(ts, 50 + len(self.sent) % 120)
                for wire in wires:
                    self._publish(wire)
                self.sent.append(reading)
                sent.append(reading)
            want = len(self.sent)
        wait_for(f"the bridge to store {want} ciphertexts", lambda: self.ciphertexts() >= want,
                 context=self.logs)
        return sent

    def prefill(self, timestamps: Sequence[int], batch: int = 2000) -> None:
        """The band's readings at `timestamps` (ascending) sealed as it would and appended straight into the
        bridge's ledger, as its ingest would (with their ciphertexts), before the bridge runs: a day of 1 Hz
        readings in seconds instead of a day."""
        from carechain.entries import event_entry
        from carechain.receipts import event_digest
        from chain_bridge.ledger.store import EventCandidate

        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            with self._device_lock:
                for start in range(0, len(timestamps), batch):
                    candidates = []
                    for ts in timestamps[start:start + batch]:
                        wires, reading = self._seal(ts, 50 + len(self.sent) % 120)
                        for wire in wires:
                            cose, ct = split_wire(wire)
                            kind = "heart_rate" if ct is not None else "epoch_key"
                            seq = envelope.parse(cose).payload["seq"]
                            candidates.append(EventCandidate(self.device.device_id, seq, event_entry(cose).encode(),
                                                             event_digest(cose), kind, version=2, ct=ct,
                                                             epoch=reading.epoch if ct is not None else None))
                        self.sent.append(reading)
                    ledger.append_events(candidates)
        finally:
            ledger.close()

    def stream(self, period_s: float = 1.0) -> None:
        """From now on the band sends a reading every `period_s` (as a worn band does): the log keeps
        growing, so entries appended by the CLI are checkpointed and cosigned."""
        def run() -> None:
            while not self._streaming.wait(period_s):
                with self._device_lock:
                    wires, reading = self._seal(now_ms(), 50 + len(self.sent) % 120)
                    for wire in wires:
                        self._publish(wire)
                    self.sent.append(reading)

        threading.Thread(target=run, name="band", daemon=True).start()

    def sent_between(self, from_ms: int, to_ms: int) -> list[Sent]:
        with self._device_lock:
            return [s for s in self.sent if from_ms <= s.ts <= to_ms]

    # -- the ledger, read-only --------------------------------------------------------------------------

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{ledger_path(self.bridge_dir)}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def ciphertexts(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM ciphertexts")[0][0])

    def ledger_size(self) -> int:
        row = self._query("SELECT MAX(idx) FROM entries")[0]
        return 0 if row[0] is None else int(row[0]) + 1

    def ciphertext_of(self, seq: int) -> bytes:
        """The stored ciphertext of the band's reading `seq`."""
        return bytes(self._query("SELECT ct FROM ciphertexts WHERE dev=? AND seq=?", self.device.device_id,
                                 seq)[0][0])

    def entry(self, index: int) -> bytes:
        return bytes(self._query("SELECT data FROM entries WHERE idx=?", index)[0][0])

    def state(self) -> Any:
        """The contract state of every committed leaf (a replay from the genesis)."""
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            return replay_ledger(ledger, self.genesis).state
        finally:
            ledger.close()

    def wait_final(self, size: int, timeout: float = DEADLINE_S) -> None:
        """Until a checkpoint of at least `size` leaves is final (published on cc/v1/log/final)."""
        observer = self.observer
        assert observer is not None
        wait_for(f"a final checkpoint covering {size} leaves", lambda: observer.final_size() >= size, timeout,
                 self.logs)

    # -- the CLI ----------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250", "NO_COLOR": "1"}
        return subprocess.run([*CARECHAIN, *args, "--config", str(self.config)], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        done = self.cli(*args, "--json", timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"carechain {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}\n{self.logs()}")
        return json_of(done.stdout)

    def request(self, requester: Party, *, last: str = "1h", purpose: str = "follow-up", valid_for: str = "24h",
                send: bool = True) -> Path:
        """`carechain access request` of `requester` for the patient's records; the request file."""
        out = self.root / f"request-{requester.id}-{time.monotonic_ns()}.json"
        args = ["access", "request", self.patient.id, "--key", str(requester.key_file), "--last", last,
                "--purpose", purpose, "--valid-for", valid_for, "--out", str(out)]
        self.cli_json(*args, *(["--send"] if send else []))
        return out

    def grant(self, request_file: Path, *, threshold: int = 3, shares: int = 5) -> int:
        """`carechain access grant` by the patient; the access record's index (the grant leaf)."""
        result = self.cli_json("access", "grant", str(request_file), "--key", str(self.patient.key_file),
                               "--pre-key", str(self.patient.pre_file), "--threshold", str(threshold),
                               "--shares", str(shares))
        self.granted.append(int(result["access"]))
        return int(result["access"])

    def open(self, access: int, requester: Party, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("access", "open", str(access), "--key", str(requester.key_file), "--pre-key",
                        str(requester.pre_file), "--timeout", str(timeout), "--json", timeout=timeout + 60)

    # -- entries the CLI cannot make (an expired grant; a grant and its revocation in one append) --------

    def append_grants(self, specs: Sequence[dict[str, Any]]) -> list[int]:
        """Append, in ONE transaction, for each spec: the doctor's request and the patient's grant (with
        `grant_ts`/`expires_ms` when given) and, if `revoke`, its revocation. The grants' leaf indexes."""
        from carechain.access import request_hash
        from record_access import build_grant, build_request, build_revoke
        from record_access.ledger_view import registered_miners

        assert self.observer is not None
        note = self.observer.latest_final()
        assert note, "no final checkpoint yet"
        miners = registered_miners(self.state())
        entries, grant_at = [], []
        # The band pauses and the bridge has stored all it sent: nobody else appends, so the leaf indexes
        # are known before the append (a revocation names its grant's leaf), and all go in one transaction.
        with self._device_lock:
            want = len(self.sent)
            wait_for("the bridge to store every reading sent", lambda: self.ciphertexts() >= want)
            ledger = Ledger(ledger_path(self.bridge_dir))
            try:
                # Sign the requests and grants first (the slow part); then take the leaf indexes once the bridge's
                # own appends (a final checkpoint's record, a clock attestation) have paused, to keep the window
                # in which another writer could shift them (and a revocation name the wrong leaf) short.
                built_specs = []
                for spec in specs:
                    now = now_ms()
                    ts = spec.get("grant_ts", now)
                    req = build_request(self.doctor.identity, owner=self.patient.id, devices=[], kinds=[],
                                        from_ms=now - HOUR_MS, to_ms=now, purpose=spec.get("purpose", "care"),
                                        expires_ms=now + 86_400_000, nonce=int.from_bytes(os.urandom(7), "big"),
                                        ts=min(ts, now))
                    built = build_grant(self.patient.identity, self.patient.pre, req,
                                        requester_pre_pk=self.doctor.pre.public_key, miners=miners,
                                        final_note=note, expires_ms=spec.get("expires_ms", now + 86_400_000), ts=ts)
                    assert built.request_hash == request_hash(req.leaf())
                    built_specs.append((spec, ts, req, built))
                base = _quiet_size(ledger)
                for spec, ts, req, built in built_specs:
                    entries += [req.entry, built.entry]
                    grant_at.append(base + len(entries) - 1)
                    if spec.get("revoke"):
                        entries.append(build_revoke(self.patient.identity, grant_at[-1], "changed my mind", ts + 1))
                leaves = submit(ledger, self.genesis, entries)
            finally:
                ledger.close()
        assert leaves == list(range(base, base + len(entries))), "another writer appended in between"
        self.granted += grant_at
        return grant_at


def _quiet_size(ledger: Ledger, quiet_s: float = 0.5, timeout_s: float = 15.0) -> int:
    """The ledger's size once it has not grown for `quiet_s` (or after `timeout_s`)."""
    size, since, deadline = ledger.refresh(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        now = ledger.refresh()
        if now != size:
            size, since = now, time.monotonic()
    return size


def json_of(stdout: str) -> dict[str, Any]:
    """The JSON object a `--json` command printed (the last one, when a warning line precedes it)."""
    text = stdout.strip()
    start = text.find("{")
    if start < 0:
        raise AssertionError(f"no JSON in output: {stdout[:2000]}")
    value: dict[str, Any] = json.loads(text[start:])
    return value


def scan_for_plaintext(dirs: Sequence[Path], needles: Sequence[bytes]) -> list[tuple[Path, bytes]]:
    """(file, needle) for every file under `dirs` whose bytes contain a needle."""
    found = []
    for d in dirs:
        for path in sorted(p for p in d.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [(path, n) for n in needles if n in data]
    return found
