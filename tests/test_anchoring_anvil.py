"""Public anchoring against a real local node: anvil, Foundry's Ethereum node from the npm package
@foundry-rs/anvil, started on a free loopback port for each test and stopped after it. A running bridge on the
session's broker anchors its checkpoints there; `carechain verify anchor` checks a checkpoint against the chain.

The tests skip only when no anvil binary is found: CARECHAIN_ANVIL (the binary, or an npm prefix it was
installed into with `npm install --prefix DIR @foundry-rs/anvil`), else `anvil` on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("web3", reason="the anchoring extra (web3) is not installed")

from typer.testing import CliRunner  # noqa: E402
from web3 import Web3  # noqa: E402

from carechain import topics  # noqa: E402
from carechain.anchor import anchor_of_note, calldata_gas, encode_calldata  # noqa: E402
from carechain.checkpoint import Checkpoint, sign_note  # noqa: E402
from carechain.cli import app  # noqa: E402
from carechain.config import AnchorConfig, BridgeConfig  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.transport import connect_client  # noqa: E402
from chain_bridge.anchoring import ANCHORS_DB, AnchorRecords, EthereumChain, RpcUnreachable, load_account  # noqa: E402
from chain_bridge.bridge import Bridge  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from simulators.miners import clear_retained  # noqa: E402
from simulators.ports import free_port  # noqa: E402
from tests.test_miner_cli import send_events  # noqa: E402
from tests.test_miners_integration import wait_for  # noqa: E402
from tests.test_pipeline import OPERATOR, register  # noqa: E402

if TYPE_CHECKING:
    from tests.conftest import TestBroker

pytestmark = pytest.mark.integration
START_TIMEOUT_S = 30.0


def anvil_binary() -> str | None:
    """The anvil executable itself (not npm's node wrapper, so that stopping it stops the node)."""
    given = os.environ.get("CARECHAIN_ANVIL")
    candidates = [Path(given)] if given else []
    on_path = shutil.which("anvil")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_dir():  # an npm prefix: node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil
            found = sorted(c.glob("node_modules/@foundry-rs/anvil-*/bin/anvil"))
            if found:
                return str(found[0])
            continue
        if c.is_file() and c.read_bytes()[:2] == b"#!":  # npm's .bin/anvil: a node script; find the binary
            found = sorted(c.resolve().parent.parent.glob("anvil-*/bin/anvil")) + sorted(
                c.parent.parent.glob("@foundry-rs/anvil-*/bin/anvil"))
            if found:
                return str(found[0])
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


class Anvil:
    """A private anvil on a free loopback port (chain id 31337, a block per transaction)."""

    def __init__(self, binary: str, log_dir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.log_path = log_dir / f"anvil-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Anvil:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen([self.binary, "--host", "127.0.0.1", "--port", str(self.port),
                                          "--chain-id", "31337", "--accounts", "1"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        w3 = self.w3()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if w3.eth.chain_id == 31337:
                    return self
            except Exception:  # not listening yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"anvil did not answer on {self.url}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def w3(self) -> Web3:
        return Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 5}, exception_retry_configuration=None))

    def fund(self, address: str, wei: int = 10**18) -> None:
        self.w3().provider.make_request("anvil_setBalance", [address, hex(wei)])  # type: ignore[arg-type]

    def mine(self, blocks: int) -> None:
        self.w3().provider.make_request("anvil_mine", [hex(blocks)])  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Anvil]:
    binary = anvil_binary()
    if binary is None:
        pytest.skip("no anvil binary: `npm install --prefix DIR @foundry-rs/anvil` and set CARECHAIN_ANVIL=DIR")
    with Anvil(binary, tmp_path) as node:
        yield node


def verify_anchor(*args: object) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["verify", "anchor", *map(str, args), "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}


def test_a_running_bridge_anchors_its_checkpoints_and_verify_checks_one_against_the_chain(
        anvil: Anvil, broker: TestBroker, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    bdir = tmp_path / "bridge"
    anchor = AnchorConfig(enabled=True, rpc_url=anvil.url, chain_id=31337, every_checkpoints=3, every_minutes=60,
                          confirmations=2)
    anvil.fund(load_account(anchor, bdir).address)  # DATA_DIR/anchor.key, created here as the bridge would
    log_key = Identity.generate()
    cfg = BridgeConfig(data_dir=bdir, checkpoint_interval_s=0.2, anchor=anchor)
    bridge = Bridge(cfg, broker.config, log_key, Ledger(bdir / "ledger.db"), client_id=f"bridge-{tmp_path.name}")
    request.addfinalizer(lambda: clear_retained(broker.config, f"clear-{tmp_path.name}", [topics.CHECKPOINT]))
    request.addfinalizer(bridge.ledger.close)
    request.addfinalizer(bridge.stop)
    bridge.start()
    assert bridge.wait_ready(30)
    devices = [Identity.generate() for _ in range(3)]
    with bridge.ledger_lock:
        register(bridge.ledger, devices, OPERATOR)
    ready = threading.Event()
    client = connect_client(broker.config, f"devices-{tmp_path.name}", connected=ready)
    request.addfinalizer(lambda: (client.disconnect(), client.loop_stop()))
    assert ready.wait(30)
    records = AnchorRecords(bdir / ANCHORS_DB)
    request.addfinalizer(records.close)
    sent = 0
    while len([r for r in records.all() if r.status != "sent"]) < 2:  # bursts until two anchors are mined
        assert sent < 200, "no second anchor after 25 bursts"
        send_events(client, devices, range(sent, sent + 8))
        sent += 8
        expected = len(devices) * (sent + 1)  # a registration and `sent` events each
        wait_for("the burst to be appended", lambda: bridge.ledger.size == expected)  # noqa: B023
        time.sleep(0.3)
    time.sleep(1)  # any anchor sent meanwhile is mined (anvil mines at once)
    anchors = [r for r in records.all() if r.status != "sent"]
    assert all(r.status in ("mined", "confirmed") for r in anchors)
    assert len(anchors) <= bridge.stats.checkpoints // 3 + 2 < bridge.ledger.size  # never per checkpoint or event
    assert bridge.stats.anchors["sent"] == len(records.all()) and bridge.stats.anchors["mined"] >= len(anchors)
    newest = max(anchors, key=lambda r: r.tree_size)

    # An earlier checkpoint than the newest anchor, as an auditor holds it; verified from the chain and the
    # log's consistency proof.
    with bridge.ledger_lock:
        sizes = [s for s in range(min(r.tree_size for r in anchors) + 1, newest.tree_size)
                 if bridge.ledger.checkpoint_at(s) is not None]
        note = bridge.ledger.checkpoint_at(sizes[0])
    assert note is not None
    note_file = tmp_path / "note.txt"
    note_file.write_text(note)
    key = log_key.public_key.hex()
    code, out = verify_anchor("--checkpoint", note_file, "--anchor-rpc", anvil.url, "--log-key", key,
                              "--data-dir", bdir, "--confirmations", 1)
    assert code == 0, out
    covering = records.covering(f"carechain.log/{log_key.device_id}", sizes[0])
    assert covering is not None
    assert out["anchor"]["tx"] == "0x" + covering.tx_hash.hex() and out["anchor"]["anchored_size"] >= sizes[0]
    assert out["anchor"]["sender"] == load_account(anchor, bdir).address and out["anchor"]["chain_id"] == 31337

    # Depth: with the bridge stopped (no more anchors), the newest has 1 confirmation until blocks are mined.
    bridge.stop()
    newest = max((r for r in records.all() if r.status != "sent"), key=lambda r: r.tree_size)
    latest_file = tmp_path / "latest.txt"
    latest_file.write_text(newest.note)
    args = ("--checkpoint", latest_file, "--anchor-rpc", anvil.url, "--log-key", key, "--anchor-tx",
            "0x" + newest.tx_hash.hex())
    code, out = verify_anchor(*args, "--confirmations", 6)
    assert code == 1 and "fewer than the 6 asked" in out["error"]
    anvil.mine(5)
    assert verify_anchor(*args, "--confirmations", 6)[0] == 0

    # The consistency proof from a bundle file instead of the ledger (what an auditor gets from the operator).
    bundle = CliRunner().invoke(app, ["proof", "--consistency", f"{sizes[0]}:{newest.tree_size}",
                                      "--data-dir", str(bdir), "--json"])
    assert bundle.exit_code == 0, bundle.output
    (tmp_path / "bundle.json").write_text(bundle.stdout)
    code, out = verify_anchor("--checkpoint", note_file, "--anchor-rpc", anvil.url, "--log-key", key,
                              "--anchor-tx", "0x" + newest.tx_hash.hex(), "--anchor-proof", tmp_path / "bundle.json",
                              "--confirmations", 1)
    assert code == 0 and out["anchor"]["anchored_size"] == newest.tree_size, out

    # A fork: the log key signed another root at the same size. The anchor on chain does not extend it.
    forged = sign_note(Checkpoint(f"carechain.log/{log_key.device_id}", sizes[0], b"\x5a" * 32).body(),
                       f"carechain.log/{log_key.device_id}", log_key.public_key, log_key.sign)
    (tmp_path / "forged.txt").write_text(forged)
    code, out = verify_anchor("--checkpoint", tmp_path / "forged.txt", "--anchor-rpc", anvil.url, "--log-key", key,
                              "--data-dir", bdir, "--confirmations", 1)
    assert code == 1 and "does not extend the checkpoint" in out["error"] and "fork" in out["error"]

    # Another log's key: nothing verifies.
    code, out = verify_anchor("--checkpoint", note_file, "--anchor-rpc", anvil.url, "--log-key",
                              Identity.generate().public_key.hex(), "--data-dir", bdir)
    assert code == 1 and "checkpoint" in out["error"]


def test_on_anvil_an_anchor_uses_exactly_the_gas_the_core_computes(anvil: Anvil, tmp_path: Path) -> None:
    log_key = Identity.generate()
    origin = f"carechain.log/{log_key.device_id}"
    account = load_account(AnchorConfig(), tmp_path)
    anvil.fund(account.address)
    chain = EthereumChain.from_url(anvil.url)
    for size in (1, 1_000_000, 100_000_000):
        note = sign_note(Checkpoint(origin, size, os.urandom(32)).body(), origin, log_key.public_key, log_key.sign)
        data = encode_calldata(anchor_of_note(note))
        sent = chain.send_anchor(account, data)
        wait_for("the anchor to be mined", lambda: chain.mined(sent.tx_hash) is not None, 10)  # noqa: B023
        mined = chain.mined(sent.tx_hash)
        assert mined is not None and mined.status == 1
        assert mined.gas_used == calldata_gas(data) == sent.gas


def test_a_stopped_node_is_reported_unreachable(anvil: Anvil) -> None:
    chain = EthereumChain.from_url(anvil.url, timeout_s=2)
    assert chain.chain_id() == 31337
    anvil.stop()
    with pytest.raises(RpcUnreachable, match=f"cannot reach the node at {anvil.url}"):
        chain.head()
