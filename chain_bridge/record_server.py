"""The bridge's record server: sealed readings served only to the requester named in a final access record.

A requester signs a `RecordsRequest` (`{"v":1,"access":<grant leaf index>,"page":n}`, COSE_Sign1, kid = its
party id) and publishes it on `cc/v1/access/records`. The server answers only when every one of these holds:
the signer is a registered party and the signature verifies with its *registered* key; the grant's access
record exists in the contract state; the grant leaf lies under the latest final (t-of-n cosigned)
checkpoint, so every miner has re-executed the rules that made it; it is neither revoked nor expired now;
and the signer is the record's requester. The answer is `RecordsPage`s on `cc/v1/party/{requester}/inbox`:
the `epoch_key` events of the granted epochs, the operator-signed registrations of the devices in scope,
and `[index, cose, ct]` of each sealed reading in scope (the owner's devices, the granted kinds and time
range). Nothing here decrypts anything: the requester checks every ciphertext against its anchored hash
and opens it with the capsule fragments the miners send. So the owner reading her own records goes through
the same logged access record as anyone.

Everything is refused silently to the sender (there is no one trustworthy to tell) and counted by reason
and logged; requests are rate-limited per requester. The server reads the ledger through its own read-only
SQLite connection and keeps its own view of the contract state, on its own thread: it never holds the
sequencer's lock, and a burst of requests never delays ingest or the MQTT network thread.

That view is the contract runtime applied to every leaf except the sealed readings (the leaves with a row in
`ciphertexts`): no contract table the server reads (parties, devices, epochs, access) depends on them, and
re-verifying each reading's signature (~90 µs) would make the first request after a day of 1 Hz readings
wait seconds. So it is a view for these tables only — never a snapshot, never a state root.

A ciphertext the bridge archived and pruned (chain_bridge/archiver.py) is fetched back from the storage miners
and served only if it hashes to the `ct` its signed envelope carries; otherwise the page is refused and the
mismatch logged, never served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from carechain import envelope, topics
from carechain.access import (
    MAX_RECORDS_PAGE_BYTES,
    SIGNED_PAGE_OVERHEAD,
    AccessMessageError,
    Record,
    RecordsPage,
    RecordsRequest,
    parse_records_request,
    sign_records_page,
)
from carechain.entries import Entry
from carechain.events import SEALED_KINDS
from carechain.identity import Identity
from carechain.miner_messages import payload_budget
from chain_bridge.archiver import ArchiveError, ArchiveFetcher
from chain_bridge.ledger.reader import LedgerReader
from chain_bridge.ledger.sql import StoreLocation
from contract_rules import Genesis, Replica, State
from contract_rules.access import access_record, granted_epochs, is_usable
from contract_rules.replay import SnapshotError, decode_leaf, genesis_hash

log = logging.getLogger("carechain.bridge.records")

MAX_PAGE_BYTES = MAX_RECORDS_PAGE_BYTES  # a page's payload, whatever the broker allows (≤ 900 KB)
MAX_PENDING_REQUESTS = 256  # requests queued for the server thread; more are dropped and counted
MAX_PLANS = 64  # page plans kept (one per grant being fetched), least recently used dropped first
DEFAULT_REQUESTS_PER_S = 20.0
DEFAULT_REQUEST_BURST = 64
_PAGE_SHAPE_BYTES = 256  # the page's own keys and numbers, generously
_ITEM_OVERHEAD = 16  # CBOR array and byte-string headers of one item, generously


@dataclass(frozen=True)
class Refusal:
    """Why a records request is not answered (logged and counted; never sent back)."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Answer:
    """The pages to publish, and where."""

    topic: str
    pages: list[bytes]


@dataclass(frozen=True)
class _Item:
    part: str  # "registrations" | "epochs" | "records"
    index: int  # the leaf
    size: int  # bytes it adds to a page, an upper bound


class _LedgerReader(LedgerReader):
    """Committed leaves and ciphertexts through a read-only connection: never sees a batch mid-append."""

    def entry_size(self, index: int) -> int:
        row = self._db.execute("SELECT length(data) FROM entries WHERE idx=?", (index,)).fetchone()
        return 0 if row is None else int(row[0])

    def sealed_between(self, start: int, stop: int) -> set[int]:
        """Indexes in [start, stop) of the sealed readings stored with a ciphertext (or archived and pruned)."""
        return {i for (i,) in self._db.execute("SELECT idx FROM ciphertexts WHERE idx >= ? AND idx < ? UNION "
                                               "SELECT idx FROM archived WHERE idx >= ? AND idx < ?",
                                               (start, stop, start, stop))}

    def readings(self, dev: str, epoch: int, below: int) -> list[tuple[int, int]]:
        """(index, size of leaf + ciphertext) of `dev`'s sealed readings of `epoch` below `below`: those stored,
        and those archived whose stored copy was pruned."""
        return [(i, n) for i, n in self._db.execute(
            "SELECT c.idx, length(e.data) + length(c.ct) FROM ciphertexts c JOIN entries e ON e.idx = c.idx "
            "WHERE c.dev=? AND c.epoch=? AND c.idx < ? "
            "UNION ALL SELECT a.idx, length(e.data) + a.ct_len FROM archived a JOIN entries e ON e.idx = a.idx "
            "WHERE a.dev=? AND a.epoch=? AND a.idx < ? "
            "AND NOT EXISTS (SELECT 1 FROM ciphertexts c WHERE c.idx = a.idx) "
            "ORDER BY 1", (dev, epoch, below, dev, epoch, below))]

    def reading(self, index: int) -> tuple[bytes, bytes | None]:
        """The leaf and stored ciphertext of a sealed reading (None: pruned, fetch it from its archive)."""
        row = self._db.execute("SELECT e.data, c.ct FROM entries e LEFT JOIN ciphertexts c ON c.idx = e.idx "
                               "WHERE e.idx=?", (index,)).fetchone()
        if row is None:
            raise KeyError(index)
        return bytes(row[0]), None if row[1] is None else bytes(row[1])

    def snapshot(self, genesis_hash_: bytes, at_most: int) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT tree_size, state FROM contract_snapshots WHERE genesis_hash=? AND "
                               "tree_size<=? ORDER BY tree_size DESC LIMIT 1", (genesis_hash_, at_most)).fetchone()
        return (row[0], bytes(row[1])) if row else None


class RecordServer:
    """Answers records requests; `answer` is the decision, `handle` publishes it, `submit`/`start` are the
    threaded MQTT shell.

    `final_size()` is the tree size of the latest final checkpoint the bridge knows (-1: none yet).
    `max_packet_bytes` is the broker's packet limit: a page never exceeds it (nor MAX_PAGE_BYTES).
    """

    def __init__(self, ledger: Path | StoreLocation, genesis: Genesis, final_size: Callable[[], int],
                 signer: Identity, *,
                 max_packet_bytes: int = MAX_PAGE_BYTES, requests_per_s: float = DEFAULT_REQUESTS_PER_S,
                 burst: int = DEFAULT_REQUEST_BURST, clock_ms: Callable[[], int] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, archive: ArchiveFetcher | None = None) -> None:
        from chain_bridge.proof_responder import RequestLimiter

        self._archive = archive  # where pruned ciphertexts come back from (bridge.archive)
        self._signer = signer  # the log key: a requester takes pages signed by the bridge only
        self._reader = _LedgerReader(ledger)
        self._replica = Replica(genesis)
        self._genesis_hash = genesis_hash(genesis)
        self._loaded = False
        self._final_size = final_size
        self.max_packet_bytes = max_packet_bytes
        self.limiter = RequestLimiter(requests_per_s, burst, monotonic)
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._plans: OrderedDict[int, list[list[_Item]]] = OrderedDict()
        self.stats: Counter[str] = Counter()  # "answered", "pages", and one count per refusal reason
        self._queue: queue.Queue[bytes | None] = queue.Queue(MAX_PENDING_REQUESTS)
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None

    # -- the decision ----------------------------------------------------------------------------------

    def answer(self, raw: bytes) -> Answer | Refusal:
        """Check one request and build its page (the `page` it names), or say why not."""
        try:
            msg = envelope.parse(raw, max_bytes=1024, max_depth=4)
        except envelope.EnvelopeError as exc:
            return Refusal("bad_request", f"not a signed records request: {exc.detail}")
        state = self._state()
        party = state.table("parties").get(msg.kid)
        if party is None:
            return Refusal("unknown_requester", f"{msg.kid[:64]} is not a registered party")
        try:
            request = parse_records_request(raw, party["pk"])
        except AccessMessageError as exc:
            return Refusal("bad_request", f"from {msg.kid}: {exc}")
        if self.limiter.take(msg.kid) > 0:
            return Refusal("rate_limited", f"{msg.kid} asks more than {self.limiter.rate:g}/s "
                                           f"(burst {self.limiter.burst})")
        return self._answer(state, msg.kid, request)

    def _answer(self, state: State, requester: str, request: RecordsRequest) -> Answer | Refusal:
        grant = request.access
        record = access_record(state, grant)
        if record is None:
            return Refusal("no_access_record", f"{requester} asks for grant {grant}: no access record there")
        final = self._final_size()
        if grant >= final:
            return Refusal("not_final", f"grant {grant} is not under a final checkpoint yet (final size {final})")
        if record["requester"] != requester:
            return Refusal("not_requester", f"{requester} is not the requester of grant {grant}")
        now = self._clock_ms()
        if not is_usable(record, now):
            if record["revoked_at"] is not None:
                return Refusal("revoked", f"grant {grant} was revoked at leaf {record['revoked_at']}")
            return Refusal("expired", f"grant {grant} expired at {record['expires_ms']} ms")
        plan = self._plans.get(grant) if request.page > 0 else None
        if plan is None:
            plan = self._plan(state, record, self._budget(requester))
            self._plans[grant] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        self._plans.move_to_end(grant)
        if request.page >= len(plan):
            return Refusal("no_such_page", f"grant {grant} has {len(plan)} page(s), not page {request.page}")
        try:
            page = self._page(grant, request.page, len(plan), plan[request.page])
        except ArchiveError as exc:  # never serve a ciphertext that is not the anchored one; nor a page without it
            return Refusal(exc.reason, f"grant {grant} page {request.page}: {exc.detail}")
        return Answer(topics.party_inbox(requester), [page])

    def _budget(self, requester: str) -> int:
        # the page's own bytes: the bridge's signature around it must still fit the packet
        return min(MAX_PAGE_BYTES, payload_budget(self.max_packet_bytes, topics.party_inbox(requester))
                   - SIGNED_PAGE_OVERHEAD)

    def _plan(self, state: State, record: dict[str, Any], budget: int) -> list[list[_Item]]:
        """The pages of one grant's answer: registrations, then epoch keys, then readings, in log order,
        cut so that no page exceeds `budget` bytes. Kept for the following page requests of this grant."""
        table = state.table("epochs")
        epochs = [(dev, epoch, table[f"{dev}:{epoch}"]) for dev, epoch, _capsule, _key_ct
                  in granted_epochs(state, record)]
        devices = state.table("devices")
        kinds = frozenset(record.get("kinds") or SEALED_KINDS)
        lo, hi = record["from_ms"], record["to_ms"]
        below = self._reader.size()
        items: list[_Item] = []
        for dev in sorted({dev for dev, _, _ in epochs}):
            at = devices[dev]["at"]
            items.append(_Item("registrations", at, self._reader.entry_size(at) + _ITEM_OVERHEAD))
        for _dev, _epoch, rec in epochs:
            items.append(_Item("epochs", rec["index"], self._reader.entry_size(rec["index"]) + _ITEM_OVERHEAD))
        for dev, epoch, rec in epochs:
            start, end = epoch * rec["epoch_ms"], (epoch + 1) * rec["epoch_ms"]
            whole = start >= lo and end - 1 <= hi and kinds >= SEALED_KINDS
            for index, size in self._reader.readings(dev, epoch, below):
                if whole or self._in_scope(index, kinds, lo, hi):
                    items.append(_Item("records", index, size + 3 * _ITEM_OVERHEAD))
        pages: list[list[_Item]] = [[]]
        used = _PAGE_SHAPE_BYTES
        for item in items:
            if pages[-1] and used + item.size > budget:
                pages.append([])
                used = _PAGE_SHAPE_BYTES
            pages[-1].append(item)
            used += item.size
        return pages

    def _in_scope(self, index: int, kinds: frozenset[str], lo: int, hi: int) -> bool:
        payload = envelope.parse(Entry.decode(self._reader.entry(index)).cose).payload
        return payload["kind"] in kinds and lo <= payload["ts"] <= hi

    def _page(self, grant: int, number: int, pages: int, items: Sequence[_Item]) -> bytes:
        registrations = [self._reader.entry(i.index) for i in items if i.part == "registrations"]
        epochs = [Entry.decode(self._reader.entry(i.index)).cose for i in items if i.part == "epochs"]
        records: list[Record] = []
        for i in items:
            if i.part == "records":
                leaf, ct = self._reader.reading(i.index)
                if ct is None:
                    if self._archive is None:
                        raise ArchiveError("ciphertext_missing", f"leaf {i.index} was pruned and no archive is "
                                                                 "configured (bridge.archive)")
                    ct = self._archive.ciphertext(i.index)
                records.append(Record(index=i.index, cose=Entry.decode(leaf).cose, ct=ct))
        return sign_records_page(self._signer, RecordsPage(
            v=1, access=grant, page=number, pages=pages, last=number == pages - 1, epochs=epochs,
            registrations=registrations, records=records))

    def _state(self) -> State:
        """The contract state of every committed leaf (caught up from the newest snapshot on first use)."""
        size = self._reader.size()
        if not self._loaded:
            self._loaded = True
            found = self._reader.snapshot(self._genesis_hash, size)
            if found is not None:
                try:
                    self._replica.restore(found[1])
                except SnapshotError as exc:
                    log.warning("contract snapshot at %d leaves not used (%s): replaying from the genesis",
                                found[0], exc)
                    self._replica.reset()
        start = self._replica.size
        passed_over = self._reader.sealed_between(start, size)
        runtime = self._replica.runtime
        for index, leaf in enumerate(self._reader.leaves(start, size), start):
            if index in passed_over:  # no table read here changes; `results` keeps only the applied leaves
                runtime.state.size = index + 1
            else:
                runtime.apply(decode_leaf(leaf))
        return runtime.state

    # -- the shell -----------------------------------------------------------------------------------

    def start(self, client: mqtt.Client) -> None:
        """Serve on `client` (the bridge's; it subscribes to topics.ACCESS_RECORDS) from a thread of our own."""
        self._client = client
        self._thread = threading.Thread(target=self._run, name="bridge-records", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self._reader.close()

    def submit(self, payload: bytes | bytearray) -> None:
        """Hand one request over from the MQTT thread; dropped (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(bytes(payload))
        except queue.Full:
            self.stats["overloaded"] += 1

    def _run(self) -> None:
        while (raw := self._queue.get()) is not None:
            try:
                self.handle(raw)
            except Exception:  # keep serving: one bad request must not stop the others
                self.stats["failed"] += 1
                log.exception("a records request failed")

    def handle(self, raw: bytes) -> Answer | Refusal:
        """Decide one request, publish its pages (if any) or log and count why not."""
        result = self.answer(raw)
        if isinstance(result, Refusal):
            self.stats[result.reason] += 1
            log.info("records request refused (%s): %s", result.reason, result.detail)
            return result
        budget = payload_budget(self.max_packet_bytes, result.topic)
        if any(len(page) > budget for page in result.pages):  # one reading larger than a packet: never send
            self.stats["oversize"] += 1  # it (the broker would drop the bridge's connection, again and again)
            log.error("a records page for %s exceeds broker.max_packet_bytes %d; not sent: raise the limit",
                      result.topic, self.max_packet_bytes)
            return Refusal("oversize", f"a page to {result.topic} exceeds {budget} bytes")
        self.stats["answered"] += 1
        self.stats["pages"] += len(result.pages)
        if self._client is not None:
            for page in result.pages:
                self._client.publish(result.topic, page, qos=1)
        return result

