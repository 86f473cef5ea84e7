"""Storage evidence over a real mosquitto and real miner processes: miners answer from disk only, sign what they
answer with their miner key, retrieval records are durable, and the client seeds only from a checkpoint that is
final against the ledger's active miners. In-process cases (no broker) drive `StorageServer.handle` directly."""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carechain import entries, envelope, topics
from carechain.checkpoint import Checkpoint, parse_note, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.identity import Identity
from carechain.seed import checkpoint_seed
from carechain.storage.attestations import (
    AttestationError,
    AuditChallenge,
    audit_verdict,
    challenges_for,
    parse_audit_answer,
    parse_retrieval_answer,
    parse_retrieval_request,
    request_id,
    verify_store_receipt,
)
from carechain.storage.audit import ShareRef, draw_challenges
from carechain.storage.codec import StorageParams, share_root
from carechain.storage.keyfile import load_dataset_key
from carechain.transport import connect_client
from chain_bridge.storage_client import SeedRefused, StorageClient, key_path, verified_seed
from chain_miner.storage_server import ShareStore, StorageServer
from contract_rules.bonds import MIN_BOND
from contract_rules.runtime import State
from simulators.miners import clear_retained
from tests.test_storage_network import StorageMiner, running_fleet

PARAMS = StorageParams(segment_size=16 * 1024 - 16, k=2, n=4, chunk_size=256)
SEED = bytes(range(32))
TIMEOUT_S = 3.0
CHUNK = 256


# -- in process: the miner reads every answer from disk -----------------------------------------------------

def _server(tmp_path: Path) -> tuple[StorageServer, Identity, ShareRef, list[AuditChallenge]]:
    key = Identity.generate()
    server = StorageServer(key, ShareStore(tmp_path / "shares"))
    data = os.urandom(16 * CHUNK)
    stored = server.handle({"op": "put", "dataset": "ds", "segment": 0, "version": 1, "share": 3, "data": data,
                            "chunk_size": CHUNK})
    assert stored is not None and stored["ok"] is True
    ref = ShareRef("ds", 0, 1, 3, share_root(data, CHUNK), len(data))
    # The store receipt signs what the miner received: this share's place, root, length and chunk size.
    assert verify_store_receipt(key.public_key, stored["receipt"], "ds", 0, 1, 3, ref.root.hex(), len(data), CHUNK)
    assert not verify_store_receipt(key.public_key, stored["receipt"], "ds", 0, 1, 3, bytes(32).hex(), len(data),
                                    CHUNK)
    challenges = [AuditChallenge(c, CHUNK) for c in draw_challenges(SEED, key.device_id, [ref], 6, CHUNK)]
    return server, key, ref, challenges


def _audit(server: StorageServer, challenges: list[AuditChallenge], epoch: int = 3) -> bytes:
    answer = server.handle({"op": "audit", "chunk_size": CHUNK, "epoch": epoch, "seed": SEED, "challenges": [
        [c.challenge.ref.dataset_id, c.challenge.ref.segment, c.challenge.ref.version, c.challenge.ref.share,
         c.challenge.chunk] for c in challenges]})
    assert answer is not None and answer["ok"] is True, answer
    return bytes(answer["attestation"])


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_share_file_lost_on_disk_fails_the_very_next_audit(tmp_path: Path, damage: str) -> None:
    server, key, ref, challenges = _server(tmp_path)
    assert audit_verdict(challenges, parse_audit_answer(_audit(server, challenges), key.public_key)).passed
    path = server.store.path(ref.dataset_id, ref.segment, ref.version, ref.share)
    if damage == "deleted":
        path.unlink()
    else:
        raw = bytearray(path.read_bytes())
        for chunk in {c.challenge.chunk for c in challenges}:  # one flipped bit in every challenged chunk (once:
            raw[chunk * CHUNK] ^= 0x01  # a chunk drawn twice must not get its bit flipped back)
        path.write_bytes(bytes(raw))
    parsed = parse_audit_answer(_audit(server, challenges), key.public_key)
    verdict = audit_verdict(challenges, parsed)
    assert not verdict.passed, verdict
    if damage == "deleted":
        assert parsed.answers == (None,) * len(challenges)


def test_an_audit_answer_is_signed_by_the_miner_for_its_epoch_and_seed(tmp_path: Path) -> None:
    server, key, _, challenges = _server(tmp_path)
    signed = _audit(server, challenges, epoch=11)
    parsed = parse_audit_answer(signed, key.public_key)
    assert (parsed.epoch, parsed.miner, parsed.seed) == (11, key.device_id, SEED)
    assert envelope.parse(signed, max_bytes=1 << 20).kid == key.device_id == server.miner_id
    with pytest.raises(AttestationError):
        parse_audit_answer(signed, Identity.generate().public_key)
    forged = bytearray(signed)
    forged[-1] ^= 0x01
    with pytest.raises(AttestationError):
        parse_audit_answer(bytes(forged), key.public_key)


def test_a_retrieval_is_answered_only_when_signed_for_this_miner(tmp_path: Path) -> None:
    server, key, ref, _ = _server(tmp_path)
    fields = {"dataset": ref.dataset_id, "segment": 0, "version": 1, "share": 3}
    unsigned = server.handle({"op": "get", **fields})
    assert unsigned is not None and unsigned["ok"] is False and "signed retrieval request" in unsigned["error"]
    requester = Identity.generate()
    other = envelope.sign(requester, {"v": 1, **fields, "miner": Identity.generate().device_id, "nonce": 1, "ts": 5})
    refused = server.handle({"op": "get", "request": other, "chunk_size": CHUNK})
    assert refused is not None and refused["ok"] is False and "not " + server.miner_id in refused["error"]
    request = envelope.sign(requester, {"v": 1, **fields, "miner": server.miner_id, "nonce": 2, "ts": 5})
    got = server.handle({"op": "get", "request": request, "chunk_size": CHUNK})
    assert got is not None and got["ok"] is True
    answer = parse_retrieval_answer(got["answer"], key.public_key)
    assert answer.request == request_id(request)
    assert (answer.root, answer.data_hash) == (ref.root.hex(), hashlib.sha256(got["data"]).hexdigest())


# -- over the network ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker) -> Iterator[list[StorageMiner]]:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    kinds = [None] * 4 + ["ignore-retrievals"]
    with running_fleet(tmp_path_factory.mktemp("storage-evidence-fleet"), broker.config, kinds) as miners:
        yield miners


@pytest.mark.integration
def test_a_miner_process_fails_its_next_audit_once_its_share_file_is_gone(fleet, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    honest = fleet[:4]
    with StorageClient(broker.config, timeout=TIMEOUT_S) as client:
        m = client.put(os.urandom(2 * PARAMS.segment_size), [h.id for h in honest], SEED, tmp_path / "d.json",
                       params=PARAMS)
        first = client.audit(m, SEED, challenges=8, epoch=1)
        assert all(v.passed for v in first.values()), first
        victim = honest[0]
        for p in victim.share_files():
            if p.parent.name == m.dataset_id:
                p.unlink()
        again = client.audit(m, SEED, challenges=8, epoch=1)
    assert not again[victim.id].passed and again[victim.id].failed == 8
    assert all(v.passed for miner, v in again.items() if miner != victim.id)
    # What it signed says so: every answer null, under its own key.
    signed = again[victim.id].attestation
    assert signed is not None
    assert parse_audit_answer(signed, victim.key.public_key).answers == (None,) * 8


@pytest.mark.integration
def test_audit_verdicts_carry_each_miners_signed_answer(fleet, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    honest = fleet[:4]
    with StorageClient(broker.config, timeout=TIMEOUT_S) as client:
        m = client.put(os.urandom(PARAMS.segment_size), [h.id for h in honest], SEED, tmp_path / "d.json",
                       params=PARAMS)
        verdicts = client.audit(m, SEED, challenges=4, epoch=9)
    holdings: dict[str, list[ShareRef]] = {}
    for rec in m.segments:
        for sh in rec.shares:
            holdings.setdefault(sh.miner, []).append(
                ShareRef(m.dataset_id, rec.index, rec.version, sh.index, bytes.fromhex(sh.root), sh.length))
    keys = {h.id: h.key.public_key for h in honest}
    assert set(verdicts) == set(holdings)
    for miner, v in verdicts.items():
        assert v.passed and v.attestation is not None
        parsed = parse_audit_answer(v.attestation, keys[miner])  # the miner's key, and no other, verifies it
        assert (parsed.epoch, parsed.miner, parsed.seed) == (9, miner, SEED)
        # Anyone recomputes the verdict from the signed answer and the roots alone.
        drawn = [AuditChallenge(c, PARAMS.chunk_size)
                 for c in draw_challenges(SEED, miner, holdings[miner], 4, PARAMS.chunk_size)]
        assert audit_verdict(drawn, parsed).passed
        other = next(k for i, k in keys.items() if i != miner)
        with pytest.raises(AttestationError):
            parse_audit_answer(v.attestation, other)


@pytest.mark.integration
def test_retrieval_records_are_signed_and_survive_a_client_restart(fleet, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    honest, ignorer = fleet[:3], fleet[4]
    requester = Identity.generate()
    records = tmp_path / "records"
    data = os.urandom(PARAMS.segment_size)
    with StorageClient(broker.config, timeout=TIMEOUT_S, identity=requester, record_dir=records) as client:
        m = client.put(data, [h.id for h in honest] + [ignorer.id], SEED, tmp_path / "d.json", params=PARAMS)
        key = load_dataset_key(key_path(tmp_path / "d.json"), m.dataset_id)
        assert client.get(m, key, prefer=[ignorer.id]) == data  # asked first, never answers; others fill in
        before = list(client.retrieval_log)
    assert (ignorer.id, False) in [(r.miner, r.ok) for r in before] and any(r.ok for r in before)
    assert (records / "retrievals.jsonl").stat().st_mode & 0o777 == 0o600

    with StorageClient(broker.config, timeout=TIMEOUT_S, identity=requester, record_dir=records) as restarted:
        assert restarted.retrieval_log == before
        filed = restarted.retrieval_entries()
    keys = {h.id: h.key.public_key for h in fleet}
    assert len(filed) == len(before)
    for entry, r in zip(filed, before, strict=True):
        assert entry.type == entries.STORAGE_RETRIEVAL
        signed = envelope.parse(entry.cose)
        assert signed.kid == requester.device_id and signed.verify(requester.public_key)
        assert signed.payload == {"v": 1, "request": r.request, "answer": r.answer}
        asked = parse_retrieval_request(r.request, requester.public_key)
        assert asked.miner == r.miner and asked.dataset == m.dataset_id
        if r.miner == ignorer.id:
            assert r.answer is None and not r.ok
        else:
            assert r.answer is not None and r.ok
            answer = parse_retrieval_answer(r.answer, keys[r.miner])
            root = m.segments[asked.segment].shares[asked.share].root
            assert (answer.request, answer.root) == (request_id(r.request), root)


_WILL = "will" in inspect.signature(connect_client).parameters


@pytest.mark.integration
@pytest.mark.skipif(not _WILL, reason="needs carechain.transport.connect_client(will=...)")
def test_a_killed_miner_vanishes_from_discovery_by_its_last_will(broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    miner = StorageMiner(tmp_path / "doomed", broker.config)
    try:
        miner.start()
        miner.wait_ready()
        with StorageClient(broker.config, timeout=TIMEOUT_S) as client:
            assert miner.id in client.discover(settle_s=1.0)
            assert client.hellos[miner.id]["pk"] == miner.key.public_key  # signed, checked against its id
            miner.kill()  # no clean disconnect: only the broker's last will can clear the hello
            deadline = time.monotonic() + 60
            while miner.id in client.hellos and time.monotonic() < deadline:
                time.sleep(0.1)
            assert miner.id not in client.hellos
    finally:
        miner.kill()
        clear_retained(broker.config, "clear-doomed", [topics.store_hello(miner.id)])


# -- the seed: only from a checkpoint final against the ledger's active miners --------------------------------

LOG = "carechain.log/test"


def _ledger(miners: list[Identity], bonded: int, operator: Identity) -> State:
    """A ledger state with `miners` registered and the first `bonded` of them bonded (active)."""
    state = State(operators={operator.device_id: operator.public_key}, balances={}, supply=0, versions={})
    state.size = 100
    state.tables["parties"] = {m.device_id: {"role": "miner", "pk": m.public_key, "name": f"m{i}", "at": i}
                               for i, m in enumerate(miners)}
    state.tables["miner_ids"] = {m.device_id: i for i, m in enumerate(miners)}  # as the core's registration keeps
    state.tables["bonds"] = {m.device_id: {"role": "miner", "amount": MIN_BOND["miner"], "unbonding": 0,
                                           "release_ms": None, "suspended_at": None, "offences": []}
                             for m in miners[:bonded]}
    return state


def _note(operator: Identity, cosigners: list[Identity]) -> str:
    body = Checkpoint(LOG, 42, b"\x07" * 32).body()
    note = sign_note(body, LOG, operator.public_key, operator.sign)
    for m in cosigners:
        note = add_cosignature(note, cosign(body, Cosigner(f"carechain.miner/{m.device_id}", m.public_key), m.sign,
                                            1_700_000_000))
    return note


def test_the_seed_needs_a_majority_of_the_ledgers_active_miners() -> None:
    operator = Identity.generate()
    miners = [Identity.generate() for _ in range(5)]
    state = _ledger(miners, bonded=4, operator=operator)  # 4 active: 3 cosignatures make a checkpoint final
    # Three lines, but one from a registered miner without a bond: only 2 of the 4 active miners signed.
    with pytest.raises(SeedRefused, match="not_final"):
        verified_seed(_note(operator, [miners[0], miners[1], miners[4]]), state)
    # Cosignatures from keys that are not miners on the ledger count for nothing.
    with pytest.raises(SeedRefused, match="not_final"):
        verified_seed(_note(operator, [miners[0], miners[1], Identity.generate()]), state)
    # Not signed by the log (a genesis operator key): refused, whatever the cosignatures.
    with pytest.raises(SeedRefused, match="not_signed_by_the_bridge"):
        verified_seed(_note(Identity.generate(), miners[:4]), state)
    good = _note(operator, miners[:3])
    body, lines = parse_note(good)
    assert verified_seed(good, state) == checkpoint_seed(body, [line.signature for line in lines])


@pytest.mark.integration
def test_the_client_refuses_to_seed_from_a_broker_checkpoint_that_is_not_final(broker) -> None:  # type: ignore[no-untyped-def]
    operator = Identity.generate()
    miners = [Identity.generate() for _ in range(4)]
    state = _ledger(miners, bonded=4, operator=operator)
    ready = threading.Event()
    publisher = connect_client(broker.config, "storage-evidence-final", connected=ready)
    assert ready.wait(10)
    try:
        for note, final in ((_note(operator, miners[:2]), False), (_note(operator, miners[:3]), True)):
            publisher.publish(topics.FINAL_CHECKPOINT, note.encode(), qos=1, retain=True).wait_for_publish(10)
            with StorageClient(broker.config, timeout=TIMEOUT_S, ledger=lambda: state) as client:
                if final:
                    assert client.seed(settle_s=5.0) == verified_seed(note, state)
                else:
                    with pytest.raises(SeedRefused, match="not_final"):
                        client.seed(settle_s=5.0)
        with StorageClient(broker.config, timeout=TIMEOUT_S) as no_ledger, pytest.raises(SeedRefused):
            no_ledger.seed(settle_s=5.0)  # without the ledger it cannot count cosignatures: no seed at all
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        clear_retained(broker.config, "storage-evidence-final-clear", [topics.FINAL_CHECKPOINT])


# -- a locked-down broker: the storage miner logs in with its own login ---------------------------------------

@pytest.mark.integration
def test_a_storage_miner_serves_on_a_locked_down_broker_with_its_own_login(tmp_path: Path) -> None:
    from carechain.config import BrokerConfig
    from chain_bridge.broker import archive_user
    from simulators.mosquitto import mosquitto_binary
    from tests.locked_broker import BRIDGE, start_locked_broker

    if not mosquitto_binary():
        pytest.skip("needs mosquitto")
    keys = [Identity.generate() for _ in range(2)]
    locked = start_locked_broker(tmp_path / "locked", [], add_miners=[k.device_id for k in keys])
    plain = BrokerConfig(host=locked.mosquitto.host, port=locked.port)
    miners = []
    try:
        for i, k in enumerate(keys):
            m = StorageMiner(tmp_path / f"store{i}", plain, key=k)
            m.args += ["--credentials", str(locked.access.store_credentials[k.device_id])]
            miners.append(m)
            m.start()
        for m in miners:
            assert m.wait_ready()["miner"] == m.id
        owner = locked.config(BRIDGE).model_copy(update={"username": archive_user(BRIDGE)})
        params = StorageParams(segment_size=4096 - 16, k=1, n=2, chunk_size=256)
        with StorageClient(owner, timeout=TIMEOUT_S) as client:
            data = os.urandom(3000)
            manifest = client.put(data, [m.id for m in miners], SEED, tmp_path / "d.json", params=params)
            verdicts = client.audit(manifest, SEED, challenges=2, epoch=1)
            assert all(v.passed and v.attestation is not None for v in verdicts.values())
            key = load_dataset_key(key_path(tmp_path / "d.json"), manifest.dataset_id)
            assert client.get(manifest, key) == data
    finally:
        for m in miners:
            m.stop()
        locked.close()


@pytest.mark.integration
def test_the_audit_entry_records_signed_answers_to_the_challenges_the_rules_draw(fleet, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    honest = fleet[:4]
    operator = Identity.generate()
    state = _ledger([h.key for h in honest], bonded=4, operator=operator)
    with StorageClient(broker.config, timeout=TIMEOUT_S) as client:
        m = client.put(os.urandom(2 * PARAMS.segment_size), [h.id for h in honest], SEED, tmp_path / "d.json",
                       params=PARAMS)
        # The ledger's view of the dataset, as storage.commit v2 records it (carechain.storage.attestations).
        state.tables["storage_shares"] = {
            f"{m.dataset_id}:{s.index}:{s.version}": {
                "dataset": m.dataset_id, "segment": s.index, "version": s.version,
                "miners": [sh.miner for sh in s.shares], "roots": [sh.root for sh in s.shares],
                "length": s.shares[0].length, "chunk_size": PARAMS.chunk_size, "at": 1, "dropped_at": None}
            for s in m.segments}
        with pytest.raises(SeedRefused):
            client.audit_entry(state, _note(operator, [h.key for h in honest[:2]]), epoch=4)
        note = _note(operator, [h.key for h in honest[:3]])
        victim = honest[1]
        for p in victim.share_files():
            if p.parent.name == m.dataset_id:
                p.unlink()
        entry, verdicts = client.audit_entry(state, note, epoch=4)
        assert entry is not None
    seed = verified_seed(note, state)
    signed = envelope.parse(entry.cose)
    assert entry.type == entries.STORAGE_AUDIT and signed.kid == client.identity.device_id
    assert signed.verify(client.identity.public_key)
    fields = signed.payload
    assert (fields["v"], fields["epoch"], fields["seed_checkpoint"]) == (2, 4, note)
    assert sorted(fields["answers"]) == sorted(h.id for h in honest)
    for h in honest:
        parsed = parse_audit_answer(fields["answers"][h.id], h.key.public_key)
        assert (parsed.epoch, parsed.seed) == (4, seed)
        # Every miner re-checks the same way: challenges from the ledger and the seed, answers as signed.
        verdict = audit_verdict(challenges_for(state, seed, h.id, as_of=42), parsed)
        assert verdict.passed == (h is not victim) == verdicts[h.id].passed, verdict
