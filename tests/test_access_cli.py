"""`carechain keys new --pre`, `party register --pre-key` and `carechain access request|grant|open|revoke|log`
on a real bridge data dir; `open` against a private mosquitto, the bridge's real record server, and capsule
fragments re-encrypted with the miners' real key fragments."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fhir.resources.R4B.bundle import Bundle

from carechain import access, envelope, events, reencryption, sealed, topics
from carechain.checkpoint import Checkpoint, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry, Registration, registration_entry
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.record_server import RecordServer
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key
from contract_rules.access import granted_epochs
from tests.test_cli import run, text
from tests.test_record_opening import DEVICE, MINERS

if TYPE_CHECKING:
    from tests.conftest import TestBroker

EPOCH_MS = 60_000


def out_json(result) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, text(result)
    return json.loads(result.stdout)



def write_final_note(bdir: Path, path: Path, miners: list[Identity]) -> Path:
    """`path`: a checkpoint of the bridge's ledger signed by its operator key (a genesis operator) and cosigned by
    `miners` (named miner-<i>), as a final checkpoint the rules take a seed from."""
    ledger = Ledger(ledger_path(bdir))
    try:
        body = Checkpoint("carechain.test/log", ledger.size, ledger.tree.root()).body()
    finally:
        ledger.close()
    op = operator_key(bdir)
    note = sign_note(body, "carechain.test/log", op.public_key, op.sign)
    for i, m in enumerate(miners):
        note = add_cosignature(note, cosign(body, Cosigner(f"miner-{i}", m.public_key), m.sign, 1))
    path.write_text(note)
    return path

class Deployment:
    """A bridge data dir with a patient, a doctor, six miners and a heart-rate band sealing two epochs."""

    def __init__(self, tmp: Path, broker: TestBroker | None = None) -> None:
        self.tmp = tmp
        self.bdir = tmp / "bridge"
        config = tmp / "carechain.yaml"
        config.write_text("bridge:\n  genesis_allocations:\n    'pool:miners': 1\n")
        self.opts = ["--config", str(config), "--data-dir", str(self.bdir)]
        self.broker = ["--broker", f"{broker.host}:{broker.port}"] if broker else []
        for who in ("alice", "doctor"):
            Identity.generate().save(tmp / f"{who}.key")
            assert out_json(run("keys", "new", "--pre", tmp / f"{who}.pre", "--json"))["pre_public_key"]
        self.alice = out_json(run("party", "register", "patient", tmp / "alice.key", "--name", "Alice", "--pre-key",
                                  tmp / "alice.pre", *self.opts, "--json"))["party_id"]
        self.doctor = out_json(run("party", "register", "doctor", tmp / "doctor.key", "--name", "Dr Berg",
                                   "--pre-key", tmp / "doctor.pre", *self.opts, "--json"))["party_id"]
        ledger = Ledger(ledger_path(self.bdir))
        try:
            from contract_rules import transactions as ce

            genesis = contract_genesis(self.bdir, {"pool:miners": 1})
            ledger.append_entries([ce.party_registration_entry(operator_key(self.bdir), ce.PartyRegistration(
                role="miner", pk=m.public_key, name=f"miner-{i}", ts=1)) for i, m in enumerate(MINERS)])
            reg = Registration(dev=DEVICE.device_id, pk=DEVICE.public_key, profile="heart_rate_band",
                               owner=self.alice, site="home", ts=1)
            ledger.append_registrations([(registration_entry(operator_key(self.bdir), reg), reg)])
            self.readings = self._seal(ledger, epochs=2, per_epoch=30)
            runtime = replay_ledger(ledger, genesis)
            assert all(r == "ok" for _, r in runtime.state.results), runtime.state.results
        finally:
            ledger.close()

    def _seal(self, ledger: Ledger, epochs: int, per_epoch: int) -> list[dict]:
        alice_pre = reencryption.PreKey.load(self.tmp / "alice.pre")
        now = int(time.time() * 1000)
        readings, seq = [], 0
        for epoch in range(now // EPOCH_MS - epochs, now // EPOCH_MS):
            key = os.urandom(32)
            capsule, key_ct = reencryption.encapsulate(alice_pre.public_key, key)
            body = events.EpochKey(epoch=epoch, epoch_ms=EPOCH_MS, owner=self.alice, capsule=capsule, key_ct=key_ct)
            cose = envelope.sign(DEVICE, events.make_payload(DEVICE.device_id, seq, epoch * EPOCH_MS, "epoch_key",
                                                             body, v=2))
            ledger.append_events([EventCandidate(DEVICE.device_id, seq, Entry("event", cose).encode(),
                                                 kind="epoch_key", version=2)])
            seq += 1
            for i in range(per_epoch):
                ts = epoch * EPOCH_MS + i * 1000
                ct = sealed.seal_body(key, os.urandom(12), DEVICE.device_id, seq, ts, "heart_rate", epoch,
                                      {"bpm": 70 + i})
                cose = envelope.sign(DEVICE, events.make_sealed_payload(DEVICE.device_id, seq, ts, "heart_rate", epoch,
                                                                        sealed.ciphertext_hash(ct)))
                ledger.append_events([EventCandidate(DEVICE.device_id, seq, Entry("event", cose).encode(),
                                                     kind="heart_rate", version=2, ct=ct, epoch=epoch)])
                readings.append({"dev": DEVICE.device_id, "seq": seq, "ts": ts, "kind": "heart_rate", "bpm": 70 + i})
                seq += 1
        return readings

    def final_checkpoint(self) -> Path:
        """The bridge's checkpoint of the ledger, signed by a genesis operator key and cosigned by 4 of 6 miners."""
        return write_final_note(self.bdir, self.tmp / "final.note", MINERS[:4])

    def request(self, who: str = "doctor", *extra: str) -> Path:
        req = self.tmp / f"{who}-req.json"
        got = out_json(run("access", "request", self.alice, "--key", self.tmp / f"{who}.key", "--last", "1h",
                           "--kind", "heart_rate", "--purpose", "follow-up after surgery", "--out", req, *extra,
                           *self.broker, "--json"))
        assert got["request_file"] == str(req) and stat.S_IMODE(req.stat().st_mode) == 0o600
        return req

    def grant(self, req: Path) -> dict:
        return out_json(run("access", "grant", req, "--key", self.tmp / "alice.key", "--pre-key",
                            self.tmp / "alice.pre", "--checkpoint", self.final_checkpoint(), *self.opts, "--json"))

    def miners_release(self, broker: TestBroker, index: int) -> None:
        """What each chosen miner publishes once the grant is final: its fragments for every granted epoch."""
        ledger = Ledger(ledger_path(self.bdir))
        try:
            runtime = replay_ledger(ledger, contract_genesis(self.bdir))
        finally:
            ledger.close()
        doctor_pre = reencryption.PreKey.load(self.tmp / "doctor.pre")
        alice_pre = reencryption.PreKey.load(self.tmp / "alice.pre")
        record = runtime.state.table("access")[str(index)]
        by_id = {m.device_id: m for m in MINERS}
        connected = threading.Event()
        client = connect_client(broker.config, f"miners-{os.urandom(3).hex()}", connected=connected)
        assert connected.wait(10)
        try:
            for miner_id, sealed_kfrag in zip(record["miners"], record["kfrags"], strict=True):
                kfrag = reencryption.verify_kfrag(access.open_sealed_kfrag(by_id[miner_id], sealed_kfrag),
                                                  alice_pre.public_key, alice_pre.verifying_key, doctor_pre.public_key)
                frags = [(d, e, reencryption.reencrypt(c, kfrag))
                         for d, e, c, _ in granted_epochs(runtime.state, record)]
                proof = access.GrantProof(size=index + 1, path=[], checkpoint=self.final_checkpoint().read_text())
                info = client.publish(topics.party_inbox(record["requester"]),
                                      access.sign_capsule_fragments(by_id[miner_id], index, frags, proof), qos=1)
                info.wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()


@pytest.fixture
def record_server(tmp_path: Path, broker: TestBroker):  # noqa: ANN201
    """The bridge's record server on the test broker, over the deployment's ledger (every grant counts as final)."""
    servers: list[RecordServer] = []

    def start(dep: Deployment) -> RecordServer:
        server = RecordServer(ledger_path(dep.bdir), contract_genesis(dep.bdir), lambda: 2**62, log_key(dep.bdir))
        connected = threading.Event()
        client = connect_client(broker.config, f"records-{os.urandom(3).hex()}", connected=connected,
                                subscriptions=[(topics.ACCESS_RECORDS, 1)],
                                on_message=lambda _c, _u, msg: server.submit(msg.payload))
        assert connected.wait(10)
        server.start(client)
        servers.append(server)
        clients.append(client)
        return server

    clients: list = []
    yield start
    for server in servers:
        server.stop()
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_keys_new_pre_writes_a_private_key_file_and_party_register_puts_its_public_halves_on_the_ledger(
        tmp_path: Path) -> None:
    made = out_json(run("keys", "new", "--pre", tmp_path / "a.pre", "--json"))
    assert stat.S_IMODE((tmp_path / "a.pre").stat().st_mode) == 0o600
    key = reencryption.PreKey.load(tmp_path / "a.pre")
    assert made == {"pre_public_key": key.public_key.hex(), "pre_verifying_key": key.verifying_key.hex(),
                    "key_file": str(tmp_path / "a.pre")}
    again = run("keys", "new", "--pre", tmp_path / "a.pre")
    assert again.exit_code == 2 and "refusing to overwrite" in text(again)
    dep_opts = ["--data-dir", str(tmp_path / "bridge")]
    researcher = Identity.generate()
    got = out_json(run("party", "register", "researcher", researcher.public_key.hex(), "--name", "Study 7",
                       "--pre-key", f"{key.public_key.hex()}:{key.verifying_key.hex()}", *dep_opts, "--json"))
    assert got["role"] == "researcher" and got["pre_public_key"] == key.public_key.hex()
    bad = run("party", "register", "doctor", Identity.generate().public_key.hex(), "--name", "x", "--pre-key", "abc",
              *dep_opts)
    assert bad.exit_code == 2 and "PUBLIC:VERIFYING" in text(bad)


def test_request_grant_log_and_revoke_on_the_bridge_host(tmp_path: Path) -> None:
    dep = Deployment(tmp_path)
    granted = dep.grant(dep.request())
    assert granted["requester"] == dep.doctor and granted["threshold"] == 3 and len(granted["miners"]) == 5
    assert granted["request_leaf"] == granted["access"] - 1
    # The same request cannot be granted twice: the contracts refuse it, and nothing is appended.
    twice = run("access", "grant", tmp_path / "doctor-req.json", "--key", tmp_path / "alice.key", "--pre-key",
                tmp_path / "alice.pre", "--checkpoint", tmp_path / "final.note", *dep.opts)
    assert twice.exit_code == 1 and "request_already_granted" in text(twice) and "nothing appended" in text(twice)
    # Only the owner grants: the doctor cannot authorize his own request.
    other = run("access", "grant", dep.request(), "--key", tmp_path / "doctor.key", "--pre-key",
                tmp_path / "doctor.pre", "--checkpoint", tmp_path / "final.note", *dep.opts)
    assert other.exit_code == 1 and "addressed to owner" in text(other)

    logged = out_json(run("access", "log", *dep.opts, "--fhir", tmp_path / "audit.json", "--json"))
    assert logged["count"] == 1
    (line,) = logged["accesses"]
    assert (line["index"], line["requester"], line["owner"], line["purpose"], line["status"]) == (
        granted["access"], dep.doctor, dep.alice, "follow-up after surgery", "active")
    bundle = Bundle.model_validate_json((tmp_path / "audit.json").read_text())
    assert bundle.entry[0].resource.agent[0].who.identifier.value == dep.doctor
    human = run("access", "log", *dep.opts)
    assert human.exit_code == 0 and "doctor" in text(human) and "follow-up after surgery" in text(human)

    revoked = out_json(run("access", "revoke", str(granted["access"]), "--key", tmp_path / "alice.key", "--reason",
                           "episode over", *dep.opts, "--json"))
    # Next leaf, or the one after a clock.attest the CLI puts first when the attested time went stale (a slow host).
    assert revoked["revoked_at_leaf"] in (granted["access"] + 1, granted["access"] + 2)
    assert out_json(run("access", "log", *dep.opts, "--json"))["accesses"][0]["status"] == "revoked"
    by_doctor = run("access", "revoke", str(granted["access"]), "--key", tmp_path / "doctor.key", "--reason", "x",
                    *dep.opts)
    assert by_doctor.exit_code == 1 and "nothing appended" in text(by_doctor)


def test_request_grant_and_open_through_the_record_server_and_three_of_five_miners(
        tmp_path: Path, broker: TestBroker, record_server) -> None:  # noqa: ANN001
    if broker.kind != "mosquitto":
        pytest.skip("queued messages for an offline persistent session need mosquitto")
    dep = Deployment(tmp_path, broker)
    record_server(dep)
    req = dep.request("doctor", "--send")  # also subscribes the doctor's inbox in a persistent session
    granted = dep.grant(req)
    dep.miners_release(broker, granted["access"])  # while the doctor is offline: the broker keeps them
    opened = out_json(run("access", "open", str(granted["access"]), "--key", tmp_path / "doctor.key", "--pre-key",
                          tmp_path / "doctor.pre", "--out", tmp_path / "readings.jsonl", "--timeout", "20",
                          *dep.opts, *dep.broker, "--json"))
    assert opened["readings"] == 60 and opened["epochs"] == 2 and len(opened["miners"]) == 5
    assert opened["problem_count"] == 0 and opened["faults"] == []
    assert stat.S_IMODE((tmp_path / "readings.jsonl").stat().st_mode) == 0o600
    got = [json.loads(line) for line in (tmp_path / "readings.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "index"} for r in got] == dep.readings

    # Revoked: the record server refuses, so the open ends with a clear error, not a hang.
    run("access", "revoke", str(granted["access"]), "--key", tmp_path / "alice.key", "--reason", "done", *dep.opts)
    refused = run("access", "open", str(granted["access"]), "--key", tmp_path / "doctor.key", "--pre-key",
                  tmp_path / "doctor.pre", "--timeout", "3", *dep.opts, *dep.broker)
    assert refused.exit_code == 1 and "revoked" in text(refused)


def test_open_without_a_grant_or_by_someone_else_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    dep = Deployment(tmp_path)
    none = run("access", "open", "999", "--key", tmp_path / "doctor.key", "--pre-key", tmp_path / "doctor.pre",
               *dep.opts)
    assert none.exit_code == 1 and "no access record at leaf 999" in text(none)
    granted = dep.grant(dep.request())
    stranger = run("access", "open", str(granted["access"]), "--key", tmp_path / "alice.key", "--pre-key",
                   tmp_path / "alice.pre", *dep.opts)
    assert stranger.exit_code == 1 and f"granted to {dep.doctor}" in text(stranger)


def test_every_access_command_has_help_with_an_example() -> None:
    for command in ("request", "grant", "open", "revoke", "log"):
        result = run("access", command, "--help", columns=200)
        assert result.exit_code == 0 and "Example" in text(result) and "--json" in text(result)
