"""Public anchoring (docs/anchoring.md): the calldata codec, the schedule and the "covered by" check as plain
values, then the anchorer and the chain client on an in-process chain (eth-tester with py-evm): real
transactions, real receipts, real gas. The local node (anvil) runs in tests/test_anchoring_anvil.py."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carechain.anchor import (
    ANCHOR_TAG,
    Anchor,
    AnchorError,
    AnchorSchedule,
    ChainFacts,
    anchor_of_note,
    calldata_gas,
    check_covered,
    check_inclusion,
    decode_calldata,
    encode_calldata,
    verify_coverage,
)
from carechain.checkpoint import Checkpoint, add_signature, sign_note
from carechain.config import AnchorConfig, Config, ConfigError
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree

web3 = pytest.importorskip("web3", reason="the anchoring extra (web3[tester]) is not installed")
pytest.importorskip("eth_tester", reason="the anchoring extra (web3[tester]) is not installed")

from hexbytes import HexBytes  # noqa: E402
from web3 import EthereumTesterProvider, Web3  # noqa: E402
from web3.types import Wei  # noqa: E402

from chain_bridge.anchoring import (  # noqa: E402
    ANCHORS_DB,
    Anchorer,
    AnchorRecords,
    AnchorReverted,
    EthereumChain,
    FeeTooHigh,
    InsufficientFunds,
    RpcUnreachable,
    WrongChain,
    load_account,
)

LOG = Identity.from_seed(b"\x42" * 32)
ORIGIN = f"carechain.log/{LOG.device_id}"


def tree_of(size: int) -> MerkleTree:
    tree = MerkleTree()
    for i in range(size):
        tree.append(leaf_hash(f"leaf {i}".encode()))
    return tree


def note_at(tree: MerkleTree, key: Identity = LOG, origin: str = ORIGIN) -> str:
    body = Checkpoint(origin, tree.size, tree.root()).body()
    return sign_note(body, origin, key.public_key, key.sign)


# -- the calldata codec ------------------------------------------------------------------------------------


@given(size=st.integers(0, 2**64 - 1), root=st.binary(min_size=32, max_size=32),
       origin=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=60))
def test_calldata_round_trips_every_tree_head(size: int, root: bytes, origin: str) -> None:
    anchor = Anchor(origin, size, root, b"\x01\x02\x03\x04", bytes(range(64)))
    data = encode_calldata(anchor)
    assert data.startswith(ANCHOR_TAG) and data.endswith(origin.encode())
    assert decode_calldata(data) == anchor


def test_an_anchor_carries_the_logs_signature_and_checks_with_the_log_key_alone() -> None:
    tree = tree_of(7)
    note = note_at(tree)
    witness = Identity.from_seed(b"\x07" * 32)
    cosigned = add_signature(note, "witness.example", witness.public_key, witness.sign)
    anchor = decode_calldata(encode_calldata(anchor_of_note(cosigned)))  # the witness's line is left out
    assert anchor.note() == note
    cp = anchor.verify(LOG.public_key)
    assert (cp.origin, cp.tree_size, cp.root_hash) == (ORIGIN, 7, tree.root())
    with pytest.raises(AnchorError, match="not signed by the log key"):
        anchor.verify(witness.public_key)
    forged = replace(anchor, root_hash=tree_of(8).root())  # the operator's signature does not cover it
    with pytest.raises(AnchorError, match="not signed by the log key"):
        forged.verify(LOG.public_key)


def test_inputs_that_are_not_anchors_are_refused_with_the_reason() -> None:
    good = encode_calldata(anchor_of_note(note_at(tree_of(3))))
    with pytest.raises(AnchorError, match="not a carechain anchor"):
        decode_calldata(b"\xa9\x05\x9c\xbb" + good)  # an ERC-20 transfer's selector in front
    with pytest.raises(AnchorError, match="this input is"):
        decode_calldata(good[:len(ANCHOR_TAG) + 40])
    with pytest.raises(AnchorError, match="not UTF-8"):
        decode_calldata(good[:-1] + b"\xff")
    with pytest.raises(AnchorError, match="extension lines"):
        body = Checkpoint(ORIGIN, 3, tree_of(3).root(), ("ext line",)).body()
        anchor_of_note(sign_note(body, ORIGIN, LOG.public_key, LOG.sign))
    other = Identity.from_seed(b"\x08" * 32)
    with pytest.raises(AnchorError, match="no signature by its origin"):
        anchor_of_note(sign_note(Checkpoint(ORIGIN, 3, tree_of(3).root()).body(), "someone.else",
                                 other.public_key, other.sign))


# -- the schedule ------------------------------------------------------------------------------------------


def test_one_anchor_per_n_checkpoints_or_t_seconds_never_per_checkpoint() -> None:
    s = AnchorSchedule(every_checkpoints=3, every_s=600)
    assert not s.due(0, -1)  # no checkpoint yet
    assert s.due(0, 10)  # the first one goes at once
    s.sent(10, now_s=0)
    for size in (11, 12):
        s.checkpoint_issued()
        assert not s.due(1, size)
    s.checkpoint_issued()
    assert s.due(2, 13)  # the third checkpoint since
    s.sent(13, now_s=2)
    s.checkpoint_issued()
    assert not s.due(601, 13)  # time is up, but nothing new to anchor
    assert s.due(602, 14)  # time is up and the log grew


def test_a_failed_anchor_is_due_again_and_a_success_is_never_undone() -> None:
    s = AnchorSchedule(every_checkpoints=100, every_s=3600)
    s.sent(5, 0)
    s.succeeded(5)
    s.sent(9, 10)
    assert not s.due(11, 9)
    s.failed()
    assert s.due(12, 9) and s.anchored_size == 5
    with pytest.raises(ValueError):
        AnchorSchedule(every_checkpoints=0, every_s=1)


# -- the "covered by" check ----------------------------------------------------------------------------------


def test_a_checkpoint_is_covered_by_any_later_anchor_of_the_same_tree() -> None:
    tree = tree_of(40)
    for old, new in [(1, 40), (17, 40), (40, 40), (0, 5)]:
        cp = Checkpoint(ORIGIN, old, tree.root(old))
        anchored = Checkpoint(ORIGIN, new, tree.root(new))
        check_covered(cp, anchored, tree.consistency_proof(old, new) if old else [])


def test_a_fork_a_smaller_anchor_or_another_log_is_not_covered() -> None:
    tree, fork = tree_of(20), tree_of(8)  # the fork rewrote history from leaf 8 on
    for i in range(12):
        fork.append(leaf_hash(f"rewritten {i}".encode()))
    cp = Checkpoint(ORIGIN, 12, tree.root(12))
    with pytest.raises(AnchorError, match="does not extend the checkpoint.*a fork"):
        check_covered(cp, Checkpoint(ORIGIN, 20, fork.root()), fork.consistency_proof(12, 20))
    rewritten = Checkpoint(ORIGIN, 12, tree_of(11).root())  # a checkpoint the anchored tree does not extend
    with pytest.raises(AnchorError, match="does not extend"):
        check_covered(rewritten, Checkpoint(ORIGIN, 20, tree.root()), tree.consistency_proof(12, 20))
    with pytest.raises(AnchorError, match="smaller than the checkpoint"):
        check_covered(Checkpoint(ORIGIN, 20, tree.root()), Checkpoint(ORIGIN, 12, tree.root(12)), [])
    with pytest.raises(AnchorError, match="is for log"):
        check_covered(cp, Checkpoint("other.log/x", 20, tree.root()), tree.consistency_proof(12, 20))


FACTS = ChainFacts(tx_hash=b"\xaa" * 32, chain_id=1, sender="0xAbC0000000000000000000000000000000000001", to=None,
                   input=b"", status=1, block_number=100, block_hash=b"\x01" * 32, canonical_hash=b"\x01" * 32,
                   block_timestamp=1_700_000_000, head_number=111)


def test_an_anchor_counts_only_succeeded_on_the_current_chain_and_deep_enough() -> None:
    assert check_inclusion(FACTS, 12) == 12
    assert check_inclusion(FACTS, 1, chain_id=1, sender="0xabc0000000000000000000000000000000000001") == 12
    cases = [
        (replace(FACTS, status=None, block_number=None, block_hash=None), {}, "not mined yet"),
        (replace(FACTS, status=0), {}, "reverted"),
        (replace(FACTS, canonical_hash=b"\x02" * 32), {}, "reorganised away"),
        (replace(FACTS, head_number=105), {}, "6 confirmation"),
        (FACTS, {"chain_id": 5}, "not on chain 5"),
        (FACTS, {"sender": "0x" + "11" * 20}, "not by the anchoring account"),
    ]
    for facts, kwargs, message in cases:
        with pytest.raises(AnchorError, match=message):
            check_inclusion(facts, 12, **kwargs)  # type: ignore[arg-type]


# -- the chain client and the anchorer on an in-process chain ----------------------------------------------


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


def fund(w3: Web3, address: str, wei: int = 10**18) -> None:
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": address, "value": Wei(wei)})


def make_anchorer(w3: Web3, tmp_path: Path, clock: list[float], *, funded: bool = True, **cfg: object) -> Anchorer:
    settings = AnchorConfig.model_validate({"enabled": True, "rpc_url": "http://unused.invalid",
                                            "every_checkpoints": 3, "every_minutes": 10, "confirmations": 2, **cfg})
    anchorer = Anchorer(settings, tmp_path, chain=EthereumChain(w3, "eth-tester"), clock=lambda: clock[0])
    if funded:
        fund(w3, anchorer.address)
    return anchorer


def test_the_anchorer_sends_one_transaction_per_n_checkpoints_and_records_it(w3: Web3, tmp_path: Path) -> None:
    clock = [1000.0]
    anchorer = make_anchorer(w3, tmp_path, clock)
    tree = tree_of(0)
    sent = []
    for _ in range(7):  # seven checkpoints: anchors at the 1st (first ever), then after 3 more, then 3 more
        tree.append(leaf_hash(str(tree.size).encode()))
        anchorer.offer(note_at(tree), tree.size)
        if (r := anchorer.tick()) is not None:
            sent.append(r.tree_size)
        clock[0] += 1
    assert sent == [1, 4, 7]
    records = {r.tree_size: r for r in anchorer.records.all()}
    assert set(records) == {1, 4, 7}
    tx = w3.eth.get_transaction(HexBytes(records[7].tx_hash))
    assert tx["from"] == tx["to"] == anchorer.address and tx["value"] == 0
    assert decode_calldata(bytes(tx["input"])).verify(LOG.public_key).root_hash == tree.root()
    anchorer.tick()  # eth-tester mines each transaction in a block of its own: all are mined now
    statuses = {r.tree_size: r.status for r in anchorer.records.all()}
    assert statuses == {1: "confirmed", 4: "confirmed", 7: "mined"}  # 2 confirmations asked; 7 has 1
    fund(w3, anchorer.address, 1)  # one more block
    anchorer.tick()
    covering = anchorer.records.covering(ORIGIN, 5)
    assert covering is not None and (covering.tx_hash, covering.status) == (records[7].tx_hash, "confirmed")
    assert covering.block_number == w3.eth.get_transaction_receipt(HexBytes(covering.tx_hash))["blockNumber"]
    assert anchorer.records.covering(ORIGIN, 8) is None
    assert anchorer.stats["sent"] == 3 and anchorer.stats["mined"] == 3
    inputs = [bytes(w3.eth.get_transaction(HexBytes(r.tx_hash))["input"]) for r in records.values()]
    assert anchorer.stats["gas_used"] == sum(map(calldata_gas, inputs))  # our gas formula is the chain's
    anchorer.stop()


def test_after_a_restart_the_cadence_goes_on_from_the_recorded_anchor(w3: Web3, tmp_path: Path) -> None:
    clock = [1000.0]
    first = make_anchorer(w3, tmp_path, clock)
    tree = tree_of(5)
    first.offer(note_at(tree), 5)
    assert first.tick() is not None
    first.stop()
    again = make_anchorer(w3, tmp_path, clock, funded=False)
    tree.append(leaf_hash(b"more"))
    again.offer(note_at(tree), 6)
    assert again.tick() is None  # one checkpoint and a few seconds since the recorded anchor: not due
    clock[0] += 600
    assert again.tick() is not None  # every_minutes=10 have passed
    assert [r.tree_size for r in again.records.all()] == [5, 6]
    again.stop()


def test_an_anchor_recorded_but_never_broadcast_is_broadcast_after_a_restart(w3: Web3, tmp_path: Path) -> None:
    from web3.exceptions import TransactionNotFound

    clock = [1000.0]
    anchorer = make_anchorer(w3, tmp_path, clock)
    anchorer.offer(note_at(tree_of(9)), 9)

    def node_lost(_raw: bytes) -> None:  # the node goes away between the record and the broadcast
        raise RpcUnreachable("node lost")

    anchorer.chain().broadcast = node_lost  # type: ignore[method-assign,assignment]
    with pytest.raises(RpcUnreachable):
        anchorer.tick()
    [recorded] = anchorer.records.all()
    assert recorded.status == "sent" and recorded.tree_size == 9
    with pytest.raises(TransactionNotFound):
        w3.eth.get_transaction(HexBytes(recorded.tx_hash))
    anchorer.stop()
    restarted = make_anchorer(w3, tmp_path, clock, funded=False)  # a new process, a new chain client
    assert restarted.tick() is None  # the recorded transaction is broadcast, no second one is signed
    restarted.tick()
    [settled] = restarted.records.all()
    assert settled.tx_hash == recorded.tx_hash and settled.status in ("mined", "confirmed")
    assert w3.eth.get_transaction_receipt(HexBytes(recorded.tx_hash))["status"] == 1
    restarted.stop()


def test_an_unfunded_account_is_told_how_much_to_fund(w3: Web3, tmp_path: Path) -> None:
    anchorer = make_anchorer(w3, tmp_path, [0.0], funded=False)
    anchorer.offer(note_at(tree_of(2)), 2)
    with pytest.raises(InsufficientFunds, match=f"{anchorer.address} holds 0 wei; one anchor may cost up to"):
        anchorer.tick()
    assert anchorer.records.all() == []  # nothing recorded for a transaction never signed
    anchorer.stop()


def test_a_fee_above_the_cap_waits(w3: Web3, tmp_path: Path) -> None:
    anchorer = make_anchorer(w3, tmp_path, [0.0], max_fee_gwei=1e-9)  # 1 wei per gas
    anchorer.offer(note_at(tree_of(2)), 2)
    with pytest.raises(FeeTooHigh, match="above bridge.anchor.max_fee_gwei"):
        anchorer.tick()
    anchorer.stop()


def test_a_node_on_another_chain_is_refused(w3: Web3, tmp_path: Path) -> None:
    anchorer = make_anchorer(w3, tmp_path, [0.0], chain_id=1)
    with pytest.raises(WrongChain, match="not on bridge.anchor.chain_id 1"):
        anchorer.tick()
    anchorer.stop()


def test_an_unreachable_node_names_the_url_and_the_setting(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chain = EthereumChain.from_url(f"http://127.0.0.1:{port}/v3/s3cr3t-api-key?k=s3cr3t", timeout_s=2)
    with pytest.raises(RpcUnreachable, match=rf"127.0.0.1:{port} .*Check bridge.anchor.rpc_url") as caught:
        chain.chain_id()
    assert "s3cr3t" not in str(caught.value)  # a provider's key in the URL is never printed or logged


def test_a_destination_that_reverts_is_reported_as_reverted(w3: Web3, tmp_path: Path) -> None:
    # A contract whose code is PUSH1 0 DUP1 REVERT; deployed by init code that returns those 4 bytes.
    runtime = bytes.fromhex("60006000fd")
    init = bytes.fromhex("64" + runtime.hex() + "600052" + "6005601bf3")  # PUSH5 code, MSTORE at 0, RETURN 27..32
    receipt = w3.eth.get_transaction_receipt(w3.eth.send_transaction({"from": w3.eth.accounts[0], "data": init}))
    reverter = receipt["contractAddress"]
    assert reverter is not None
    assert bytes(w3.eth.get_code(reverter)) == runtime
    anchorer = make_anchorer(w3, tmp_path, [0.0])
    data = encode_calldata(anchor_of_note(note_at(tree_of(2))))
    with pytest.raises(AnchorReverted, match="revert"):
        anchorer.chain().send_anchor(anchorer.account, data, to=reverter)
    anchorer.stop()


def test_the_chain_facts_of_an_anchor_verify_the_checkpoints_it_covers(w3: Web3, tmp_path: Path) -> None:
    clock = [0.0]
    anchorer = make_anchorer(w3, tmp_path, clock)
    tree = tree_of(30)
    anchorer.offer(note_at(tree), 30)
    record = anchorer.tick()
    assert record is not None
    fund(w3, anchorer.address, 1)  # a block on top
    facts = anchorer.chain().facts(record.tx_hash)
    old = Checkpoint(ORIGIN, 11, tree.root(11))
    coverage = verify_coverage(facts, old, LOG.public_key, tree.consistency_proof(11, 30), 2,
                               sender=anchorer.address)
    assert (coverage.anchored.tree_size, coverage.confirmations, coverage.block_number) == (30, 2, facts.block_number)
    with pytest.raises(AnchorError, match="fewer than the 3 asked"):
        verify_coverage(facts, old, LOG.public_key, tree.consistency_proof(11, 30), 3)
    with pytest.raises(AnchorError, match="not signed by the log key"):
        verify_coverage(facts, old, Identity.from_seed(b"\x09" * 32).public_key, tree.consistency_proof(11, 30), 1)
    anchorer.stop()


def test_a_bridge_configured_to_anchor_offers_each_checkpoint_it_issues(tmp_path: Path) -> None:
    from carechain.config import BridgeConfig, BrokerConfig
    from chain_bridge.bridge import Bridge
    from chain_bridge.ledger.store import Ledger
    from tests.test_pipeline import register

    plain = Bridge(BridgeConfig(data_dir=tmp_path / "plain"), BrokerConfig(), LOG, Ledger(tmp_path / "plain.db"))
    assert plain.anchorer is None
    plain.ledger.close()
    cfg = BridgeConfig(data_dir=tmp_path, anchor=AnchorConfig(enabled=True, rpc_url="http://127.0.0.1:9"))
    bridge = Bridge(cfg, BrokerConfig(), LOG, Ledger(tmp_path / "ledger.db"))  # nothing connects yet
    assert bridge.anchorer is not None and bridge.anchorer.latest is None
    register(bridge.ledger, [Identity.generate(), Identity.generate()])
    note = bridge.maybe_checkpoint()
    assert note is not None and bridge.anchorer.latest == (2, note)
    assert bridge.anchorer.schedule.checkpoints_since == 1 and bridge.anchorer.schedule.due(0, 2)
    assert bridge.stats.as_dict()["anchors"] == {}
    bridge.anchorer.stop()
    bridge.ledger.close()


# -- config --------------------------------------------------------------------------------------------------


def test_the_anchor_section_is_off_by_default_and_needs_an_rpc_url_when_on(tmp_path: Path) -> None:
    assert Config().bridge.anchor.enabled is False
    with pytest.raises(ValueError, match="needs bridge.anchor.rpc_url"):
        AnchorConfig(enabled=True)
    made = load_account(AnchorConfig(), tmp_path)  # DATA_DIR/anchor.key, created 0600
    assert (tmp_path / "anchor.key").stat().st_mode & 0o777 == 0o600
    assert load_account(AnchorConfig(), tmp_path).address == made.address
    with pytest.raises(ConfigError, match="does not exist"):
        load_account(AnchorConfig(key_file=tmp_path / "missing.key"), tmp_path)
    (tmp_path / "anchor.key").chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):
        load_account(AnchorConfig(), tmp_path)
    assert not (tmp_path / ANCHORS_DB).exists()
    AnchorRecords(tmp_path / ANCHORS_DB).close()
    assert (tmp_path / ANCHORS_DB).stat().st_mode & 0o777 == 0o600
