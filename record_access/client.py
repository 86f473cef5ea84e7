"""The MQTT shell around the owner's and the requester's cores: the one module here that does I/O.

- `fetch_final_checkpoint`: the retained `cc/v1/log/final` note (the grant's seed checkpoint).
- `send_request`: a signed request to the owner's inbox; it also subscribes the requester's own inbox in a
  persistent session, so that capsule fragments the miners publish before `open` runs wait in the broker.
- `open_access`: pages from the bridge and fragments from the miners into an `Opening`, then every record
  checked and decrypted, in worker processes for large opens.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from carechain import access, reencryption, topics
from carechain.config import BrokerConfig
from carechain.entries import Entry
from carechain.errors import ProtocolError
from carechain.identity import Identity
from carechain.transport import connect_client
from contract_rules import transactions as ce
from record_access.ledger_view import AccessContext
from record_access.opening import Fault, Opening, OpeningError, Problem, chunks, open_records
from record_access.requesting import SignedRequest

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)
CHUNK = 4096  # records per worker task
POOL_FROM = 8192  # below this many records, one process is faster than starting workers
CONNECT_TIMEOUT_S = 30.0
PAGE_WINDOW = 8  # records pages asked for ahead (the bridge's per-requester burst is larger)
REASK_S = 2.0  # until the first page comes: the bridge says nothing about a grant that is not final yet


class AccessClientError(Exception):
    """The broker, the bridge or the miners did not answer as needed; the message says which and what to do."""


def inbox_client_id(party_id: str) -> str:
    """The requester's persistent MQTT session: the broker queues its inbox while it is offline."""
    return f"carechain-access-{party_id}"


def _connect(broker: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]],
             on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
             clean_session: bool = True) -> mqtt.Client:
    connected = threading.Event()
    client = connect_client(broker, client_id, clean_session=clean_session, on_message=on_message,
                            subscriptions=subscriptions, connected=connected)
    if not connected.wait(CONNECT_TIMEOUT_S):
        _close(client)
        raise AccessClientError(f"broker {broker.address} not reachable in {CONNECT_TIMEOUT_S:.0f} s; is it running?")
    return client


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def fetch_final_checkpoint(broker: BrokerConfig, timeout: float = 10.0) -> str:
    """The latest final checkpoint note (retained on `cc/v1/log/final`, with the miners' cosignatures)."""
    got: queue.Queue[bytes] = queue.Queue()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.FINAL_CHECKPOINT and msg.payload:
            got.put(bytes(msg.payload))

    client = _connect(broker, f"carechain-access-seed-{os.urandom(4).hex()}", [(topics.FINAL_CHECKPOINT, 1)],
                      on_message)
    try:
        note = got.get(timeout=timeout)
    except queue.Empty:
        raise AccessClientError(f"no final checkpoint on {topics.FINAL_CHECKPOINT} within {timeout:.0f} s: is the "
                                "bridge running with miners cosigning (bridge.finality_threshold > 0)?") from None
    finally:
        _close(client)
    return note.decode("utf-8", errors="replace")


def send_request(broker: BrokerConfig, request: SignedRequest) -> None:
    """Publish the request to the owner's inbox (QoS 1, waited for) and subscribe our own inbox for later."""
    client = _connect(broker, inbox_client_id(request.requester), [(topics.party_inbox(request.requester), 1)],
                      clean_session=False)
    try:
        info = client.publish(topics.party_inbox(request.request.owner), request.leaf(), qos=1)
        info.wait_for_publish(CONNECT_TIMEOUT_S)
        if not info.is_published():
            raise AccessClientError(f"broker {broker.address} did not acknowledge the request")
    finally:
        _close(client)


@dataclass
class OpenResult:
    readings: list[dict[str, Any]]
    problems: list[Problem]
    faults: list[Fault]
    miners: list[str]  # the miners whose fragments arrived
    epochs: int
    seconds: float
    fault_entries: list[Entry] = field(default_factory=list)


def open_access(broker: BrokerConfig, requester: Identity, requester_pre: reencryption.PreKey, ctx: AccessContext, *,
                timeout: float = 60.0, now_ms: Callable[[], int] | None = None, progress: Progress | None = None,
                workers: int | None = None) -> OpenResult:
    """Open access record `ctx.index`: ask the bridge for every page, wait for at least the threshold of
    verified capsule fragments per epoch, then check and decrypt every record.

    A miner whose fragments do not verify is named in an `access.fault` entry (signed by us, published on
    `cc/v1/access/evidence` and returned for the caller to submit); the open goes on with the others.
    """
    started = time.monotonic()
    opening = Opening(ctx, requester_pre.public_key)
    inbox: queue.Queue[bytes] = queue.Queue()

    my_inbox = topics.party_inbox(requester.device_id)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == my_inbox:  # nothing else is ours, whatever a broker delivers
            inbox.put(bytes(msg.payload))

    client = _connect(broker, inbox_client_id(requester.device_id), [(my_inbox, 1)], on_message, clean_session=False)
    faults_sent = 0
    fault_entries: list[Entry] = []
    try:
        def ask(page: int) -> None:
            client.publish(topics.ACCESS_RECORDS, access.sign_records_request(requester, ctx.index, page), qos=1)

        asked = {0}

        def in_flight(pages: set[int]) -> int:
            return len(pages - opening.pages_seen)

        ask(0)
        deadline = time.monotonic() + timeout
        asked_at = time.monotonic()
        while not opening.ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AccessClientError(_timeout_message(opening, timeout))
            if not opening.complete_pages() and time.monotonic() - asked_at > REASK_S:
                # The bridge answers only once the grant is final (and drops what is over a requester's rate):
                # ask again for what has not come.
                for p in sorted(asked - opening.pages_seen) or [0]:
                    ask(p)
                asked_at = time.monotonic()
            try:
                raw = inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            try:
                if access.signer_of(raw) not in ctx.operator_keys:  # a miner's capsule fragments
                    opening.on_fragments(raw)
                    continue
                next_page = opening.on_page(raw)  # the bridge's signed records page
            except (OpeningError, ProtocolError) as exc:  # anyone may write to an inbox: never fatal
                log.warning("ignored a message in %s's inbox: %s", requester.device_id, exc)
                continue
            asked_at = time.monotonic()  # a page came: the bridge is answering
            if next_page is not None:
                # Keep up to PAGE_WINDOW pages asked ahead: the bridge plans every page at the first request.
                wanted = [p for p in range((opening.last_page or 0) + 1)
                          if p not in opening.pages_seen and p not in asked][:PAGE_WINDOW - in_flight(asked)]
                for p in wanted:
                    ask(p)
                    asked.add(p)
                if progress:
                    progress("pages", len(opening.pages_seen), (opening.last_page or 0) + 1)
            for fault in opening.faults[faults_sent:]:
                entry = fault_entry(requester, ctx.index, fault, now_ms() if now_ms else int(time.time() * 1000))
                fault_entries.append(entry)
                client.publish(topics.ACCESS_EVIDENCE, entry.encode(), qos=1)
                log.warning("miner %s sent capsule fragments that do not verify (%s): evidence published",
                            fault.miner, fault.detail)
            faults_sent = len(opening.faults)
    finally:
        _close(client)  # before forking workers: no network thread is copied into them
    keys = opening.data_keys(requester_pre)
    readings, problems = verify_and_decrypt(opening, keys, progress=progress, workers=workers)
    return OpenResult(readings, problems, list(opening.faults), opening.answered_by(), len(keys),
                      time.monotonic() - started, fault_entries)


def fault_entry(requester: Identity, grant_index: int, fault: Fault, ts: int) -> Entry:
    return ce.access_fault_entry(requester, ce.AccessFault(grant_index=grant_index, message=fault.message, ts=ts))


def verify_and_decrypt(opening: Opening, keys: dict[tuple[str, int], bytes], *, progress: Progress | None = None,
                       workers: int | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Every record of `opening` checked and decrypted; across os.cpu_count() processes for large opens."""
    records = sorted(opening.records)
    total = len(records)
    workers = workers or os.cpu_count() or 1
    if total < POOL_FROM or workers == 1:
        readings, problems = open_records(records, opening.device_keys, keys)
        if progress:
            progress("records", total, total)
        return readings, problems
    readings, problems = [], []
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(open_records, list(part), opening.device_keys, keys) for part in chunks(records, CHUNK)]
        done = 0
        for fut in futures:  # in order, so readings stay in leaf order
            got, bad = fut.result()
            readings.extend(got)
            problems.extend(bad)
            done += len(got) + len(bad)
            if progress:
                progress("records", done, total)
    return readings, problems


def _timeout_message(opening: Opening, timeout: float) -> str:
    if not opening.complete_pages():
        return (f"the bridge sent {len(opening.pages_seen)} records page(s) in {timeout:.0f} s and not the last: is "
                f"the grant under a final checkpoint, not revoked or expired, and is the bridge's record server on?")
    missing = opening.missing_fragments()
    answered = ", ".join(opening.answered_by()) or "none"
    return (f"{len(missing)} epoch(s) still lack verified capsule fragments after {timeout:.0f} s (threshold "
            f"{opening.ctx.threshold}; miners that answered: {answered}; faulty: "
            f"{', '.join(f.miner for f in opening.faults) or 'none'})")

