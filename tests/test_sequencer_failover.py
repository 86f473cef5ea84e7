"""Two bridge hosts on one PostgreSQL ledger: real mosquitto, two `carechain bridge` and two `carechain agent`
processes. Both hosts ingest and append (one MQTT shared subscription group), only the lease holder checkpoints;
the leader is killed (-9) mid-stream, the other host must take the lead, and every event the agents signed must
be in the log exactly once. Also the idle hot standby (`bridge.store.standby_ingest: false`). Times and the
per-host split are printed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import yaml

from carechain import topics
from carechain.checkpoint import parse_note
from carechain.config import BridgeConfig, BrokerConfig, MinerKey, StoreConfig
from carechain.cosignature import Cosigner, cosign
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from chain_bridge.bridge import Bridge
from chain_bridge.lease import LeaseLost, SequencerLease
from chain_bridge.ledger.postgres import PostgresLocation
from chain_bridge.ledger.reader import LedgerReader
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import (
    GENESIS_FILE,
    LOG_KEY_FILE,
    OPERATOR_KEY_FILE,
    log_key,
    operator_key,
    register_devices,
)
from simulators.fault_harness import AgentProcess, _cli, _env, event_counts, patient_devices
from simulators.mosquitto import REPO, Mosquitto, mosquitto_binary
from tests.conftest import LedgerFactory
from tests.locked_broker import login

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="the fail-over test runs a real mosquitto"),
]

PRODUCE_S = 8.0
PROFILES = ("heart_rate_band", "pulse_oximeter", "thermometer")


@dataclass
class BridgeHost:
    """One `carechain bridge` process; its stderr lines are kept with the monotonic time each arrived."""

    name: str
    data_dir: Path
    config: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(_cli("bridge", "--config", str(self.config), "--data-dir", str(self.data_dir)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=_env())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log.open("a") as sink:
            for line in self.proc.stderr:
                sink.write(line)
                sink.flush()
                self.lines.append((time.monotonic(), line))

    def said(self, text: str) -> float | None:
        """When the bridge first logged `text` (monotonic), or None."""
        return next((at for at, line in list(self.lines) if text in line), None)

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (at := self.said(text)) is not None:
                return at
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never said {text!r}; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stats(self) -> dict[str, object]:
        """The counters a stopped bridge printed as its last line on stdout."""
        assert self.proc is not None and self.proc.stdout is not None and self.proc.poll() is not None
        lines = self.proc.stdout.read().strip().splitlines()
        assert lines, f"{self.name} printed no counters; see {self.log}"
        stats: dict[str, object] = json.loads(lines[-1])
        return stats


def _checkpoint_count(location: PostgresLocation) -> int:
    import psycopg

    with psycopg.connect(location.dsn) as db:
        row = db.execute("SELECT count(*) FROM checkpoints").fetchone()
    return int(row[0]) if row else 0


def _drain(agents: list[AgentProcess]) -> tuple[int, dict[str, int]]:
    """Wait until the agents stopped producing and every outbox is empty; (events signed, per device)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not any(a.producing() for a in agents) and all(a.depth_and_signed()[0] == 0 for a in agents):
            break
        time.sleep(0.25)
    assert all(a.depth_and_signed()[0] == 0 for a in agents), "outboxes did not drain"
    signed = {dev: n for a in agents for dev, n in a.depth_and_signed()[1].items()}
    return sum(signed.values()), signed


def _assert_each_event_once(location: PostgresLocation, signed: dict[str, int]) -> Counter[tuple[str, int]]:
    counts = _event_counts(location)
    missing = [(dev, seq) for dev, n in signed.items() for seq in range(n) if (dev, seq) not in counts]
    assert missing == []
    assert [key for key, c in counts.items() if c > 1] == []  # no (device, seq) twice
    assert sum(counts.values()) == sum(signed.values())
    return counts


def _event_counts(location: PostgresLocation) -> Counter[tuple[str, int]]:
    """(device, seq) → how many leaves of the log hold it, from the leaf bytes themselves."""
    reader = LedgerReader(location)
    try:
        return event_counts(reader.leaves(0, reader.size()))
    finally:
        reader.close()


def _provision(work: Path, location: PostgresLocation, broker_port: int, *,
               standby_ingest: bool) -> tuple[list[BridgeHost], list[AgentProcess]]:
    """Two bridge data dirs with the same log key, operator key and genesis (as a deployment copies them to each
    host), devices registered on the shared ledger, and two agents with three simulated devices each."""
    first = work / "bridge-a"
    log_pk = log_key(first).public_key.hex()
    ledger = Ledger(location)
    inventory: list[InventoryDevice] = []
    agents = []
    for a in range(2):
        adir = work / f"agent{a}"
        devices, ids = patient_devices(ledger, first, adir, a, len(PROFILES), "failover", inventory)
        config = adir / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "broker": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
            "agent": {"data_dir": str(adir), "devices": devices, "bridge_public_key": log_pk,
                      "resend_after_s": 2.0, "speedup": 150.0, "window": 2000}}))
        agents.append(AgentProcess(f"agent{a}", config, adir / "outbox.db", adir / "agent.log", ids))
    register_devices(ledger, operator_key(first), inventory)
    ledger.close()
    second = work / "bridge-b"
    for name in (LOG_KEY_FILE, OPERATOR_KEY_FILE, GENESIS_FILE):
        (second / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(first / name, second / name)
    config = work / "bridge.yaml"
    config.write_text(yaml.safe_dump({
        "broker": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        "bridge": {"checkpoint_interval_s": 1.0, "store": {"backend": "postgresql", "dsn": location.dsn,
                                                           "standby_ingest": standby_ingest}}}))
    hosts = [BridgeHost(name, d, config, work / f"{name}.log") for name, d in (("bridge-a", first),
                                                                               ("bridge-b", second))]
    return hosts, agents


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


def test_two_hosts_both_append_only_the_lease_holder_checkpoints_and_a_kill_moves_the_lead(
        tmp_path: Path, postgres_dsn: str, mosquitto: Mosquitto) -> None:
    location = cast(PostgresLocation, LedgerFactory("postgresql", postgres_dsn).location(tmp_path / "ledger"))
    (leader, other), agents = _provision(tmp_path, location, mosquitto.port, standby_ingest=True)
    restarted = BridgeHost("bridge-a (restarted)", leader.data_dir, leader.config, tmp_path / "bridge-a2.log")
    try:
        leader.start()
        leader.wait_for("holds the sequencer lease; active", 60)
        leader.wait_for("bridge ready", 60)
        other.start()
        other.wait_for("bridge: ingest host", 60)
        other.wait_for("bridge ready", 60)
        for agent in agents:
            agent.start(PRODUCE_S)
        reader = LedgerReader(location)
        while reader.size() < 300:  # mid-stream: both hosts are appending
            assert leader.proc is not None and leader.proc.poll() is None, f"see {leader.log}"
            time.sleep(0.05)
        reader.close()
        assert leader.proc is not None
        leader.proc.kill()
        killed = time.monotonic()
        leader.proc.wait(10)
        checkpoints_at_kill = _checkpoint_count(location)
        leads = other.wait_for("this bridge now leads", 30)
        while _checkpoint_count(location) == checkpoints_at_kill:  # the new leader checkpoints
            assert other.proc is not None and other.proc.poll() is None, f"see {other.log}"
            assert time.monotonic() - killed < 60, f"no checkpoint after the take-over; see {other.log}"
            time.sleep(0.02)
        checkpointed = time.monotonic()
        restarted.start()  # the old leader comes back as an ingest host: the lead stays where it is
        restarted.wait_for("bridge: ingest host", 60)

        events, signed = _drain(agents)
        assert events > 300, "the scenario produced too little traffic to mean anything"
        restarted.stop()  # the ingest host first: the leader's last checkpoint covers every append
        other.stop()
        again, survivor = restarted.stats(), other.stats()
        _assert_each_event_once(location, signed)
        assert survivor["role"] == "leader" and again["role"] == "ingest"
        assert isinstance(survivor["ingest_host_anchored"], int) and survivor["ingest_host_anchored"] > 0, \
            "the second host appended nothing while the first one held the lease"
        assert again["checkpoints_issued"] == 0  # an ingest host never checkpoints
        # every checkpoint after the kill is the new leader's, and it issued none before
        assert survivor["checkpoints_issued"] == _checkpoint_count(location) - checkpoints_at_kill
        assert isinstance(survivor["anchored"], int) and isinstance(again["anchored"], int)
        first_share = events - survivor["anchored"] - again["anchored"]
        assert first_share > 0, "the first leader appended nothing"
        print(f"\ntwo hosts: {events} events, each once; appended by bridge-a (leader, then killed) {first_share}, "
              f"bridge-b {survivor['anchored']} ({survivor['ingest_host_anchored']} while bridge-a led), "
              f"bridge-a restarted as an ingest host {again['anchored']}; checkpoints: "
              f"{checkpoints_at_kill} before the kill, {survivor['checkpoints_issued']} by bridge-b after it")
        print(f"take-over after kill -9: bridge-b led {leads - killed:.2f} s and checkpointed "
              f"{checkpointed - killed:.2f} s later")
    finally:
        for agent in agents:
            agent.stop()
        for host in (leader, other, restarted):
            host.stop()


def test_the_idle_standby_takes_over_when_the_sequencer_is_killed_and_every_event_lands_once(
        tmp_path: Path, postgres_dsn: str, mosquitto: Mosquitto) -> None:
    location = cast(PostgresLocation, LedgerFactory("postgresql", postgres_dsn).location(tmp_path / "ledger"))
    (active, standby), agents = _provision(tmp_path, location, mosquitto.port, standby_ingest=False)
    try:
        active.start()
        active.wait_for("bridge ready", 60)
        standby.start()
        standby.wait_for("standby: waiting for the sequencer lease held by carechain-bridge", 60)
        for agent in agents:
            agent.start(PRODUCE_S)
        reader = LedgerReader(location)
        while reader.size() < 150:  # mid-stream: the active bridge is anchoring
            assert active.proc is not None and active.proc.poll() is None, f"see {active.log}"
            time.sleep(0.05)
        assert active.proc is not None
        active.proc.kill()
        killed = time.monotonic()
        active.proc.wait(10)
        size_at_death = reader.size()
        while reader.size() == size_at_death:  # until the standby appends
            assert standby.proc is not None and standby.proc.poll() is None, f"see {standby.log}"
            assert time.monotonic() - killed < 120, f"the standby never appended; see {standby.log}"
            time.sleep(0.02)
        appended = time.monotonic()
        reader.close()
        took_lease = standby.wait_for("sequencer lease taken over", 5)
        print(f"\nfail-over: the standby held the lease {took_lease - killed:.2f} s and appended "
              f"{appended - killed:.2f} s after kill -9 of the active bridge")

        events, signed = _drain(agents)
        assert events > 100, "the scenario produced too little traffic to mean anything"
        counts = _assert_each_event_once(location, signed)
        assert standby.said("holds the sequencer lease; active") is not None
        print(f"fail-over: {events} events signed, {len(counts)} anchored once each, 0 lost, 0 twice")
    finally:
        for agent in agents:
            agent.stop()
        for host in (active, standby):
            host.stop()


def _terminate(location: PostgresLocation, application_name: str) -> None:
    """End, from the server side, the sessions of one client (what a dead host's TCP timeout does)."""
    import psycopg

    with psycopg.connect(location.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                      (application_name,))


def test_one_lease_holder_at_a_time_a_holder_that_loses_its_session_is_told_and_a_standby_reconnects(
        postgres_dsn: str, tmp_path: Path) -> None:
    location = PostgresLocation(postgres_dsn)
    first, second = (SequencerLease(location, poll_s=0.05, name=f"carechain-bridge {n}") for n in ("one", "two"))
    try:
        assert first.try_acquire() and not second.try_acquire()
        assert first.holder().startswith(first.name) and "server pid" in second.holder()
        lost = threading.Event()
        reasons: list[LeaseLost] = []
        first.watch(lambda exc: (reasons.append(exc), lost.set()))
        _terminate(location, second.name)  # the standby's session ends too (a database restart): it reconnects
        _terminate(location, first.name)
        assert lost.wait(30) and "lease connection" in str(reasons[0])
        assert second.wait(lambda: False) and second.held
    finally:
        first.release()
        second.release()


def test_a_bridge_with_a_lease_starts_only_once_it_holds_it_and_stops_when_it_loses_it(
        postgres_dsn: str, tmp_path: Path) -> None:
    location = PostgresLocation(postgres_dsn)
    ledger = Ledger(location)
    holder, lease = SequencerLease(location), SequencerLease(location)
    assert holder.try_acquire()
    died = threading.Event()
    idle_standby = StoreConfig(backend="postgresql", dsn=location.dsn, standby_ingest=False)
    bridge = Bridge(BridgeConfig(data_dir=tmp_path, contracts=False, store=idle_standby), BrokerConfig(),
                    Identity.generate(), ledger, on_fatal=died.set, lease=lease)
    try:
        with pytest.raises(RuntimeError, match="await_lease"):
            bridge.start()
        assert bridge.await_lease(lambda: True) is False  # stopping while standing by
        holder.release()
        assert bridge.await_lease(lambda: False) is True and lease.held
        bridge._lease_lost(LeaseLost("the database no longer lists this session as the lease holder"))
        assert died.is_set() and bridge._stop.is_set()  # no batch after this one; the process exits non-zero
    finally:
        lease.release()
        ledger.close()


def test_an_ingest_host_appends_but_never_checkpoints_until_it_gains_the_lease_then_leads_without_a_restart(
        postgres_dsn: str, tmp_path: Path, mosquitto: Mosquitto) -> None:
    location = cast(PostgresLocation, LedgerFactory("postgresql", postgres_dsn).location(tmp_path / "ledger"))
    ledger, writer = Ledger(location), Ledger(location)  # `writer`: another host appending to the same log
    holder, lease = SequencerLease(location, poll_s=0.05), SequencerLease(location, poll_s=0.05)
    assert holder.try_acquire()
    store = StoreConfig(backend="postgresql", dsn=location.dsn, lease_poll_s=0.05)
    bridge = Bridge(BridgeConfig(data_dir=tmp_path, contracts=False, checkpoint_interval_s=0.05, store=store),
                    BrokerConfig(host="127.0.0.1", port=mosquitto.port), Identity.generate(), ledger, lease=lease)
    operator = Identity.generate()

    def grow() -> None:
        key = Identity.generate().public_key
        register_devices(writer, operator, [InventoryDevice("d", "thermometer", "o", "s", key, 0)])

    try:
        assert not bridge.try_lead()
        bridge.start()  # no await_lease: it ingests at once
        assert bridge.wait_ready(30)
        grow()
        time.sleep(0.5)  # ten checkpoint intervals
        assert not bridge.leading.is_set() and bridge.stats.role == "ingest"
        assert bridge.stats.checkpoints_issued == 0 and writer.checkpoint_count() == 0
        assert (topics.MINER_REQUEST_WILDCARD, 1) not in bridge._subscriptions  # proofs are the leader's
        holder.release()
        assert bridge.leading.wait(10), "the ingest host did not take the lead once the lease was free"
        assert (topics.MINER_REQUEST_WILDCARD, 1) in bridge._subscriptions
        deadline = time.monotonic() + 10
        while writer.checkpoint_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bridge.stats.checkpoints_issued >= 1 and bridge.stats.role == "leader"
        latest = writer.latest_checkpoint()
        assert latest is not None and latest[0] == writer.refresh()  # covering what the other host appended
    finally:
        bridge.stop()
        holder.release()
        ledger.close()
        writer.close()


def test_an_ingest_host_takes_finality_only_from_a_final_checkpoint_of_its_log_cosigned_by_its_miners(
        postgres_dsn: str, tmp_path: Path, mosquitto: Mosquitto) -> None:
    location = cast(PostgresLocation, LedgerFactory("postgresql", postgres_dsn).location(tmp_path / "ledger"))
    ledger, writer = Ledger(location), Ledger(location)
    holder, lease = SequencerLease(location, poll_s=0.05), SequencerLease(location, poll_s=0.05)
    assert holder.try_acquire()
    log_key, miner, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    cosigner = Cosigner("carechain.miner/m1", miner.public_key)
    cfg = BridgeConfig(data_dir=tmp_path, contracts=False, finality_threshold=1,
                       miners=[MinerKey(name=cosigner.name, public_key=miner.public_key.hex())],
                       store=StoreConfig(backend="postgresql", dsn=location.dsn, lease_poll_s=0.05))
    bridge = Bridge(cfg, BrokerConfig(host="127.0.0.1", port=mosquitto.port), log_key, ledger, lease=lease)
    leader = login(mosquitto.port)  # publishes as the leader would (retained, on the final topic)

    def final(signer: Identity, by: Identity, size_hint: str) -> bytes:
        register_devices(writer, Identity.generate(), [InventoryDevice(size_hint, "thermometer", "o", "s",
                                                                        Identity.generate().public_key, 0)])
        note = writer.issue_checkpoint(signer, bridge.origin)
        body, _ = parse_note(note)
        return (note + cosign(body, Cosigner(cosigner.name, by.public_key), by.sign, 1).line()).encode()

    try:
        bridge.start()
        assert bridge.wait_ready(30) and not bridge.leading.is_set()
        good = final(log_key, miner, "a")  # size 1
        forged = [final(log_key, stranger, "b"), final(stranger, miner, "c")]  # sizes 2, 3: not our miner, key
        for note in (*forged, good):  # the smaller good one last: taking a forged one would shadow it
            leader.publish(topics.FINAL_CHECKPOINT, note, retain=True)
        deadline = time.monotonic() + 10
        while bridge.final_size() < 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bridge.final_size() == 1
    finally:
        leader.close()
        bridge.stop()
        holder.release()
        ledger.close()
        writer.close()
