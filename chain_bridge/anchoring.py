"""The bridge's anchorer: checkpoint roots anchored on an Ethereum-compatible chain through web3.py.

An optional component (`bridge.anchor.enabled`, docs/anchoring.md). The bridge offers it every checkpoint it
issues (`offer`, cheap, from the sequencer's thread); the anchorer's own thread decides with the sans-IO
`carechain.anchor.AnchorSchedule` when one is due, and then sends one plain transaction from the anchoring
account to itself whose input is the log-signed tree head (`carechain.anchor.encode_calldata`). One
transaction is in flight at a time; every anchor is recorded in DATA_DIR/anchors.db (`AnchorRecords`) before
it is broadcast — the signed raw transaction included, so a restart re-broadcasts it rather than losing it —
and its block, gas and confirmations are recorded as the chain moves.

The chain is reached only through `EthereumChain`, whose errors are values a user can act on:
`RpcUnreachable` (the node does not answer), `InsufficientFunds` (fund the account it names), `AnchorReverted`,
`WrongChain`, `FeeTooHigh` (above `bridge.anchor.max_fee_gwei`), `RpcError` (anything else the node refused).
A failing chain never stops the bridge: the anchorer logs, counts and retries with backoff.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain.anchor import (
    AnchorError,
    AnchorSchedule,
    ChainFacts,
    anchor_of_note,
    calldata_gas,
    encode_calldata,
)
from carechain.config import AnchorConfig, ConfigError
from carechain.files import FilePermissionError, make_private, read_private, write_atomic
from carechain.retry import Backoff, ReconnectPolicy

log = logging.getLogger("carechain.bridge.anchoring")

ANCHOR_KEY_FILE = "anchor.key"
ANCHORS_DB = "anchors.db"
GWEI = 10**9
# Priority fee offered when the node cannot suggest one (eth_maxPriorityFeePerGas unsupported).
DEFAULT_PRIORITY_FEE = 1 * GWEI
# A transaction not mined yet is broadcast again this often (a node restarted, or its mempool dropped it).
REBROADCAST_EVERY_S = 60.0
# Between ticks of the anchorer's thread; a failing node is retried with backoff up to `max_s`.
POLL_S = 1.0
RETRY = ReconnectPolicy(initial_s=2.0, max_s=120.0, stable_s=0.0)
NO_WEB3 = "anchoring needs web3.py, which is not installed: pip install 'carechain[anchor]'"


class AnchoringError(Exception):
    """The chain refused or could not be reached; the message says what to do. `kind` counts it in the stats."""

    kind = "rpc_error"


class RpcUnreachable(AnchoringError):
    kind = "rpc_unreachable"


class InsufficientFunds(AnchoringError):
    kind = "insufficient_funds"


class AnchorReverted(AnchoringError):
    kind = "reverted"


class WrongChain(AnchoringError):
    kind = "wrong_chain"


class FeeTooHigh(AnchoringError):
    kind = "fee_too_high"


class RpcError(AnchoringError):
    kind = "rpc_error"


@dataclass(frozen=True)
class SentAnchor:
    tx_hash: bytes
    raw: bytes
    nonce: int
    gas: int
    max_fee_per_gas: int


@dataclass(frozen=True)
class Mined:
    status: int
    block_number: int
    block_hash: bytes
    gas_used: int
    fee_wei: int


class EthereumChain:
    """One node's JSON-RPC through web3.py, every failure mapped to an `AnchoringError` naming the node."""

    def __init__(self, w3: Any, where: str) -> None:
        self.w3 = w3
        self.where = where

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 10.0) -> EthereumChain:
        try:
            from web3 import Web3
        except ImportError:
            raise RpcError(NO_WEB3) from None

        # No retries inside web3: a node that does not answer is reported at once, and the caller backs off.
        provider = Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=None)
        return cls(Web3(provider), _without_secrets(url))

    @contextmanager
    def _rpc(self, what: str) -> Iterator[None]:
        from requests.exceptions import RequestException
        from web3.exceptions import ContractLogicError, ProviderConnectionError

        try:
            yield
        except (RequestException, ProviderConnectionError, OSError) as exc:
            raise RpcUnreachable(f"cannot reach the node at {self.where} ({what}): {type(exc).__name__}: "
                                 f"{_short(exc)}. Check bridge.anchor.rpc_url and that the node runs") from None
        except ContractLogicError as exc:
            raise AnchorReverted(f"the node says the anchor would revert ({what}): {_short(exc)}") from None
        except Exception as exc:  # web3's errors, eth-tester's (TransactionFailed, ValidationError), a node's text
            text = _short(exc)
            if "insufficient funds" in text.lower() or "cannot afford" in text.lower():
                raise InsufficientFunds(f"the anchoring account cannot pay for the transaction ({what}): {text}. "
                                        "Fund it (docs/anchoring.md gives the gas per anchor)") from None
            if "revert" in text.lower():
                raise AnchorReverted(f"the node says the anchor reverts ({what}): {text}") from None
            raise RpcError(f"the node at {self.where} refused {what}: {text}") from None

    def chain_id(self) -> int:
        with self._rpc("eth_chainId"):
            return int(self.w3.eth.chain_id)

    def head(self) -> int:
        with self._rpc("eth_blockNumber"):
            return int(self.w3.eth.block_number)

    def balance(self, address: str) -> int:
        with self._rpc("eth_getBalance"):
            return int(self.w3.eth.get_balance(address))

    def send_anchor(self, account: Any, data: bytes, *, to: str | None = None, max_fee_cap: int | None = None,
                    before_broadcast: Callable[[SentAnchor], None] = lambda _: None) -> SentAnchor:
        """Sign a transaction carrying `data` from `account` (to itself unless `to`), hand it to
        `before_broadcast` (which records it durably), then broadcast it."""
        to = to or account.address
        with self._rpc("preparing the anchor transaction"):
            chain_id = int(self.w3.eth.chain_id)
            nonce = int(self.w3.eth.get_transaction_count(account.address, "pending"))
            base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas")
            try:
                priority = int(self.w3.eth.max_priority_fee)
            except Exception as exc:  # a node without eth_maxPriorityFeePerGas; a lost node is reported as such
                if isinstance(exc, OSError):
                    raise
                priority = DEFAULT_PRIORITY_FEE
            gas_price = None if base_fee is not None else int(self.w3.eth.gas_price)
        fees: dict[str, int]
        if base_fee is not None:
            least = int(base_fee) + priority
            if max_fee_cap is not None and least > max_fee_cap:
                raise FeeTooHigh(f"the chain asks at least {least / GWEI:.3f} gwei per gas, above "
                                 f"bridge.anchor.max_fee_gwei ({max_fee_cap / GWEI:.3f}): the anchor waits")
            max_fee = 2 * int(base_fee) + priority
            if max_fee_cap is not None:
                max_fee = min(max_fee, max_fee_cap)
            fees = {"maxFeePerGas": max_fee, "maxPriorityFeePerGas": min(priority, max_fee)}
        else:  # a chain without EIP-1559
            assert gas_price is not None
            if max_fee_cap is not None and gas_price > max_fee_cap:
                raise FeeTooHigh(f"the chain asks {gas_price / GWEI:.3f} gwei per gas, above "
                                 f"bridge.anchor.max_fee_gwei ({max_fee_cap / GWEI:.3f}): the anchor waits")
            max_fee = gas_price
            fees = {"gasPrice": gas_price}
        # A plain transaction's gas is known exactly (a node's estimate may leave out EIP-7623's calldata floor:
        # eth-tester's does); unused gas is not charged. Funds are checked before the node is asked to estimate.
        gas = calldata_gas(data)
        self._check_funds(account.address, gas, max_fee, chain_id)
        with self._rpc("eth_estimateGas"):
            estimate = int(self.w3.eth.estimate_gas({"from": account.address, "to": to, "value": 0, "data": data}))
        gas = max(gas, estimate) if to == account.address else estimate
        self._check_funds(account.address, gas, max_fee, chain_id)
        tx: dict[str, Any] = {"to": to, "value": 0, "data": data, "nonce": nonce, "chainId": chain_id, "gas": gas,
                              **fees}
        signed = account.sign_transaction(tx)
        sent = SentAnchor(bytes(signed.hash), bytes(signed.raw_transaction), nonce, gas, max_fee)
        before_broadcast(sent)
        self.broadcast(sent.raw)
        return sent

    def _check_funds(self, address: str, gas: int, max_fee: int, chain_id: int) -> None:
        have = self.balance(address)
        if have < gas * max_fee:
            raise InsufficientFunds(f"the anchoring account {address} holds {have} wei; one anchor may cost up to "
                                    f"{gas * max_fee} wei ({gas} gas at {max_fee / GWEI:.3f} gwei): fund it on "
                                    f"chain {chain_id}")

    def broadcast(self, raw: bytes) -> None:
        """Send a signed transaction; one the node already has (or has mined) is not an error."""
        try:
            with self._rpc("eth_sendRawTransaction"):
                self.w3.eth.send_raw_transaction(raw)
        except RpcError as exc:
            text = str(exc).lower()
            if not any(s in text for s in ("already known", "nonce too low", "known transaction",
                                           "invalid transaction nonce", "already imported")):
                raise

    def mined(self, tx_hash: bytes) -> Mined | None:
        """The transaction's receipt on the node's chain now, or None while it is not mined."""
        from web3.exceptions import TransactionNotFound

        with self._rpc("eth_getTransactionReceipt"):
            try:
                r = self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None
        price = int(r.get("effectiveGasPrice") or 0)
        return Mined(int(r["status"]), int(r["blockNumber"]), bytes(r["blockHash"]), int(r["gasUsed"]),
                     int(r["gasUsed"]) * price)

    def facts(self, tx_hash: bytes) -> ChainFacts:
        """What the chain says about `tx_hash`, for `carechain.anchor.verify_coverage`."""
        from web3.exceptions import TransactionNotFound

        with self._rpc("eth_getTransactionByHash"):
            try:
                tx = self.w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                tx = None
        if tx is None:
            raise RpcError(f"the node at {self.where} knows no transaction 0x{tx_hash.hex()} (wrong chain, or "
                           "a node that does not keep old transactions)")
        mined = self.mined(tx_hash)
        canonical = timestamp = None
        if mined is not None:
            with self._rpc("eth_getBlockByNumber"):
                block = self.w3.eth.get_block(mined.block_number)
            canonical, timestamp = bytes(block["hash"]), int(block["timestamp"])
        return ChainFacts(
            tx_hash=tx_hash, chain_id=self.chain_id(), sender=str(tx["from"]),
            to=None if tx.get("to") is None else str(tx["to"]), input=bytes(tx["input"]),
            status=None if mined is None else mined.status,
            block_number=None if mined is None else mined.block_number,
            block_hash=None if mined is None else mined.block_hash,
            canonical_hash=canonical, block_timestamp=timestamp, head_number=self.head())


def _without_secrets(url: str) -> str:
    """The node's scheme, host and port only: a provider's URL often carries an API key in its path or query."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _short(exc: BaseException) -> str:
    """The error's text on one line, at most 300 characters, without the request's URL path (an API key)."""
    text = re.sub(r"(url: )\S+", r"\1…", " ".join(str(exc).split()))
    return text if len(text) <= 300 else text[:297] + "..."


def parse_tx_hash(text: str) -> bytes:
    """A transaction hash given as 0x-prefixed (or bare) hex, 32 bytes."""
    raw = text[2:] if text.lower().startswith("0x") else text
    try:
        value = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a transaction hash (64 hex digits, 0x-prefixed)") from None
    if len(value) != 32:
        raise ValueError(f"{text!r} is not a transaction hash: {len(value)} bytes, not 32")
    return value


# -- the anchoring account's key ---------------------------------------------------------------------------


def load_account(cfg: AnchorConfig, data_dir: Path) -> Any:
    """The anchoring account (an eth_account LocalAccount) from `cfg.key_file`, or DATA_DIR/anchor.key, which
    is created (0600) when missing: the bridge logs its address, which the operator funds."""
    try:
        from eth_account import Account
    except ImportError:
        raise ConfigError(NO_WEB3) from None

    path = cfg.key_file or data_dir / ANCHOR_KEY_FILE
    if not path.exists():
        if cfg.key_file is not None:
            raise ConfigError(f"bridge.anchor.key_file {path} does not exist (leave it unset to have the bridge "
                              f"create DATA_DIR/{ANCHOR_KEY_FILE})")
        write_atomic(path, (Account.create().key.hex() + "\n").encode())
        log.warning("created the anchoring key %s: fund its address before anchors can be sent", path)
    try:
        text = read_private(path).decode().strip()
        return Account.from_key(text)
    except FilePermissionError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not an Ethereum private key (64 hex digits): {type(exc).__name__}") from None


# -- durable records ---------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
    tx_hash BLOB PRIMARY KEY,
    chain_id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    tree_size INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    origin TEXT NOT NULL,
    note TEXT NOT NULL,
    raw_tx BLOB NOT NULL,
    sent_ms INTEGER NOT NULL,
    status TEXT NOT NULL,           -- sent | mined | confirmed | reverted
    block_number INTEGER,
    block_hash BLOB,
    gas_used INTEGER,
    fee_wei INTEGER
);
CREATE INDEX IF NOT EXISTS anchors_size ON anchors(tree_size);
"""


@dataclass(frozen=True)
class AnchorRecord:
    tx_hash: bytes
    chain_id: int
    sender: str
    nonce: int
    tree_size: int
    root_hash: bytes
    origin: str
    note: str
    raw_tx: bytes
    sent_ms: int
    status: str
    block_number: int | None
    block_hash: bytes | None
    gas_used: int | None
    fee_wei: int | None


_COLUMNS = ", ".join(AnchorRecord.__dataclass_fields__)


class AnchorRecords:
    """DATA_DIR/anchors.db: which transaction anchored which tree size and root, and how it fared."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        make_private(self.path)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def add(self, r: AnchorRecord) -> None:
        with self._lock:
            self._db.execute(f"INSERT INTO anchors ({_COLUMNS}) VALUES ({', '.join('?' * 15)})",
                             tuple(getattr(r, f) for f in AnchorRecord.__dataclass_fields__))

    def update(self, tx_hash: bytes, status: str, mined: Mined | None) -> None:
        with self._lock:
            if mined is None:
                self._db.execute("UPDATE anchors SET status=?, block_number=NULL, block_hash=NULL, gas_used=NULL, "
                                 "fee_wei=NULL WHERE tx_hash=?", (status, tx_hash))
            else:
                self._db.execute("UPDATE anchors SET status=?, block_number=?, block_hash=?, gas_used=?, fee_wei=? "
                                 "WHERE tx_hash=?", (status, mined.block_number, mined.block_hash, mined.gas_used,
                                                     mined.fee_wei, tx_hash))

    def _select(self, where: str, args: tuple[object, ...] = ()) -> list[AnchorRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM anchors {where}", args).fetchall()
        return [AnchorRecord(*row) for row in rows]

    def all(self) -> list[AnchorRecord]:
        return self._select("ORDER BY sent_ms, tree_size")

    def unsettled(self) -> list[AnchorRecord]:
        """Anchors sent but not yet confirmed (or reverted), oldest nonce first."""
        return self._select("WHERE status IN ('sent', 'mined') ORDER BY nonce")

    def latest(self) -> AnchorRecord | None:
        rows = self._select("WHERE status != 'reverted' ORDER BY tree_size DESC, sent_ms DESC LIMIT 1")
        return rows[0] if rows else None

    def covering(self, origin: str, tree_size: int) -> AnchorRecord | None:
        """The smallest mined anchor of `origin` whose tree size is at least `tree_size`."""
        rows = self._select("WHERE origin=? AND tree_size>=? AND status IN ('mined', 'confirmed') "
                            "ORDER BY tree_size LIMIT 1", (origin, tree_size))
        return rows[0] if rows else None


# -- the bridge's component --------------------------------------------------------------------------------


class Anchorer:
    """Anchors the bridge's latest checkpoint on the chain, at the schedule's cadence, on its own thread."""

    def __init__(self, cfg: AnchorConfig, data_dir: Path, *, chain: EthereumChain | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not cfg.rpc_url and chain is None:
            raise ConfigError("bridge.anchor.enabled needs bridge.anchor.rpc_url")
        self.cfg = cfg
        self.account = load_account(cfg, Path(data_dir))
        self.records = AnchorRecords(Path(data_dir) / ANCHORS_DB)
        self.schedule = AnchorSchedule(cfg.every_checkpoints, cfg.every_minutes * 60.0)
        self.stats: Counter[str] = Counter()
        self._chain = chain
        self._chain_id: int | None = None  # the node's, once checked against `cfg.chain_id`
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: tuple[int, str] | None = None
        self._broadcast_at: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(RETRY)
        last = self.records.latest()
        if last is not None:  # the cadence goes on from the last anchor, across restarts
            self.schedule.sent(last.tree_size, last.sent_ms / 1000)
            if last.status in ("mined", "confirmed"):
                self.schedule.succeeded(last.tree_size)
        self.max_fee_cap = None if cfg.max_fee_gwei is None else int(cfg.max_fee_gwei * GWEI)

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def latest(self) -> tuple[int, str] | None:
        """The newest checkpoint offered (tree size, note): what the next anchor carries."""
        with self._lock:
            return self._latest

    def offer(self, note: str, tree_size: int) -> None:
        """A checkpoint was issued (called by the bridge; returns at once)."""
        with self._lock:
            if self._latest is None or tree_size >= self._latest[0]:
                self._latest = (tree_size, note)
            self.schedule.checkpoint_issued()

    def chain(self) -> EthereumChain:
        if self._chain is None:
            assert self.cfg.rpc_url is not None
            self._chain = EthereumChain.from_url(self.cfg.rpc_url, self.cfg.rpc_timeout_s)
        if self._chain_id is None:
            chain_id = self._chain.chain_id()
            if self.cfg.chain_id is not None and chain_id != self.cfg.chain_id:
                raise WrongChain(f"the node at {self._chain.where} is on chain {chain_id}, not on "
                                 f"bridge.anchor.chain_id {self.cfg.chain_id}: nothing is anchored")
            self._chain_id = chain_id
            log.info("anchoring on chain %d from account %s (balance %d wei), every %d checkpoints or %.0f min",
                     chain_id, self.address, self._chain.balance(self.address), self.cfg.every_checkpoints,
                     self.cfg.every_minutes)
        return self._chain

    def tick(self) -> AnchorRecord | None:
        """One step: follow the anchors in flight; send a new one if due and none is unmined. The record of
        an anchor sent in this step, if any. Raises `AnchoringError` (the thread logs it and backs off)."""
        chain = self.chain()
        now = self._clock()
        if self._settle(chain, now):
            return None  # one transaction in flight at a time: nonces stay in order
        with self._lock:
            latest = self._latest
            due = latest is not None and self.schedule.due(now, latest[0])
        if not due:
            return None
        assert latest is not None
        size, note = latest
        try:
            anchor = anchor_of_note(note)
        except AnchorError as exc:
            log.error("checkpoint at tree size %d cannot be anchored: %s", size, exc)
            return None
        data = encode_calldata(anchor)
        chain_id = self._chain_id
        assert chain_id is not None  # self.chain() checked it
        made: list[AnchorRecord] = []

        def record(sent: SentAnchor) -> None:
            r = AnchorRecord(sent.tx_hash, chain_id, self.address, sent.nonce, anchor.tree_size, anchor.root_hash,
                             anchor.origin, note, sent.raw, int(now * 1000), "sent", None, None, None, None)
            self.records.add(r)  # durable before it is broadcast: a crash re-broadcasts, never forgets
            made.append(r)

        try:
            sent = chain.send_anchor(self.account, data, max_fee_cap=self.max_fee_cap, before_broadcast=record)
        except AnchoringError:
            if made:  # recorded, not broadcast: the next ticks broadcast it again
                self._broadcast_at[made[0].tx_hash] = now
                with self._lock:
                    self.schedule.sent(anchor.tree_size, now)
            raise
        self._broadcast_at[sent.tx_hash] = now
        with self._lock:
            self.schedule.sent(anchor.tree_size, now)
        self.stats["sent"] += 1
        log.info("anchor of tree size %d sent: tx 0x%s (nonce %d, gas limit %d)", anchor.tree_size,
                 sent.tx_hash.hex(), sent.nonce, sent.gas)
        return made[0]

    def _settle(self, chain: EthereumChain, now: float) -> bool:
        """Follow every unsettled anchor; whether one is still unmined."""
        waiting = False
        head: int | None = None
        for r in self.records.unsettled():
            mined = chain.mined(r.tx_hash)
            if mined is None:
                waiting = True
                if r.status == "mined":  # its block was reorganised away
                    self.records.update(r.tx_hash, "sent", None)
                if now - self._broadcast_at.get(r.tx_hash, -REBROADCAST_EVERY_S) >= REBROADCAST_EVERY_S:
                    self._broadcast_at[r.tx_hash] = now
                    chain.broadcast(r.raw_tx)
                continue
            if mined.status != 1:
                self.records.update(r.tx_hash, "reverted", mined)
                self.stats["reverted"] += 1
                with self._lock:
                    self.schedule.failed()
                raise AnchorReverted(f"anchor tx 0x{r.tx_hash.hex()} of tree size {r.tree_size} reverted in block "
                                     f"{mined.block_number}: the next checkpoint is anchored after a backoff")
            if head is None:
                head = chain.head()
            status = "confirmed" if head - mined.block_number + 1 >= self.cfg.confirmations else "mined"
            if status != r.status or mined.block_hash != r.block_hash:
                self.records.update(r.tx_hash, status, mined)
                if r.status == "sent":
                    self.stats["mined"] += 1
                    self.stats["gas_used"] += mined.gas_used
                    log.info("anchor of tree size %d mined in block %d (%d gas)", r.tree_size,
                             mined.block_number, mined.gas_used)
                if status == "confirmed":
                    self.stats["confirmed"] += 1
                with self._lock:
                    self.schedule.succeeded(r.tree_size)
        return waiting

    # -- thread --------------------------------------------------------------------------------------------

    def start(self, latest: tuple[int, str] | None = None) -> None:
        """Start the thread; `latest` is the ledger's latest checkpoint (tree size, note), if any."""
        if latest is not None:
            with self._lock:
                if self._latest is None or latest[0] >= self._latest[0]:
                    self._latest = latest
        log.info("anchoring account %s (key %s)", self.address, self.cfg.key_file or ANCHOR_KEY_FILE)
        self._thread = threading.Thread(target=self._run, name="bridge-anchorer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.rpc_timeout_s + 5)
        self.records.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self._backoff.failures = 0
                wait = POLL_S
            except AnchoringError as exc:
                self.stats[exc.kind] += 1
                wait = self._backoff.failed()
                log.error("anchoring: %s (retrying in %.0f s)", exc, wait)
            except Exception:
                self.stats["errors"] += 1
                wait = self._backoff.failed()
                log.exception("anchoring failed (retrying in %.0f s)", wait)
            self._stop.wait(wait)
