"""The bridge's half of the miners' protocol: answers `cc/v1/miner/{id}/req` with a consistency proof
and the new entries, read from the ledger under the appender's lock. Protocol: docs/miners.md.

An answer is one MQTT packet, and a broker drops the connection of a client that publishes a packet above
its `max_packet_size` — after which paho resends the same QoS 1 message at every reconnect. So an answer
is *paged*: it carries the longest prefix of the asked entries that fits `max_packet_bytes` (the broker's
limit, from config), and the miner asks again from where the page ended. Requests are rate-limited per
requester, and the lock is held only to read the tree and the raw entries, never to encode them.

Every answer — proofs, pages and refusals alike — is signed by the log key (`ProofResponseMessage.signed`):
miners act only on answers the log signed, so a client that manages to publish on a response topic cannot
steer them, and a failing proof the log signed is fork evidence nobody else could make (carechain.evidence).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import miner_messages as messages
from carechain.config import BridgeConfig, BrokerConfig
from carechain.identity import Identity
from carechain.merkle import HASH_SIZE
from carechain.token_bucket import TokenBucket
from carechain.transport import connect_client
from chain_bridge.ledger.store import Ledger

log = logging.getLogger("carechain.bridge.proofs")

DEFAULT_MAX_PACKET_BYTES = BrokerConfig.model_fields["max_packet_bytes"].default
DEFAULT_REQUESTS_PER_S = BridgeConfig.model_fields["proof_requests_per_s"].default
DEFAULT_REQUEST_BURST = BridgeConfig.model_fields["proof_request_burst"].default
MAX_REQUESTERS = 4096  # rate-limit buckets kept; the least recently seen requester is forgotten first


class RequestLimiter:
    """Per-requester token bucket (`burst` tokens refilled at `rate` per second) over a bounded set of requesters."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, requester: str) -> float:
        """0.0 if `requester` may be answered now (a token is taken), else the seconds until it may."""
        now = self._clock()
        bucket = self._buckets.pop(requester, None) or TokenBucket.full(self.rate, self.burst, now)
        self._buckets[requester] = bucket
        while len(self._buckets) > MAX_REQUESTERS:
            self._buckets.popitem(last=False)
        if bucket.take(now):
            return 0.0
        wait = bucket.wait_s()
        # A requester that keeps asking only pushes its next answer further out (down to -burst tokens).
        bucket.tokens = max(bucket.tokens - 1.0, -float(self.burst))
        return wait


class ProofResponder:
    """Bridge side: answers `cc/v1/miner/{id}/req` with proofs and entries from the ledger.

    Pass the lock the appender holds while it extends the ledger, if another thread appends: the
    in-memory tree must not be read mid-append. `max_packet_bytes` is the broker's packet limit
    (`broker.max_packet_bytes`); `requests_per_s`/`burst` the per-requester rate limit
    (`bridge.proof_requests_per_s`, `bridge.proof_request_burst`). `log_key` signs every answer; without it
    answers go out unsigned and miners drop them (only for tests of the responder itself).
    """

    def __init__(self, ledger: Ledger, client: mqtt.Client | None = None, lock: threading.Lock | None = None, *,
                 max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES, requests_per_s: float = DEFAULT_REQUESTS_PER_S,
                 burst: int = DEFAULT_REQUEST_BURST, log_key: Identity | None = None) -> None:
        self.ledger = ledger
        self.log_key = log_key
        self.client = client
        self._lock = lock or threading.Lock()
        self.max_packet_bytes = max_packet_bytes
        self.limiter = RequestLimiter(requests_per_s, burst)
        self.stats: Counter[str] = Counter()

    def attach(self) -> None:
        """Serve requests on an already connected client (e.g. the bridge's)."""
        assert self.client is not None
        self.client.message_callback_add(messages.MINER_REQUEST_WILDCARD, self._on_message)
        self.client.subscribe(messages.MINER_REQUEST_WILDCARD, qos=1)

    @classmethod
    def connect(cls, ledger: Ledger, broker: BrokerConfig, client_id: str, lock: threading.Lock | None = None,
                connected: threading.Event | None = None, *, requests_per_s: float = DEFAULT_REQUESTS_PER_S,
                burst: int = DEFAULT_REQUEST_BURST, log_key: Identity | None = None) -> ProofResponder:
        """A responder with its own MQTT client; `connected` is set once it is subscribed."""
        responder = cls(ledger, None, lock, max_packet_bytes=broker.max_packet_bytes, requests_per_s=requests_per_s,
                        burst=burst, log_key=log_key)
        responder.client = connect_client(broker, client_id, on_message=responder._on_message,
                                          subscriptions=[(messages.MINER_REQUEST_WILDCARD, 1)], connected=connected)
        return responder

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def answer(self, req: messages.ProofRequestMessage, budget: int | None = None) -> messages.ProofResponseMessage:
        """The response to one request (pure given the ledger): the proof and the longest prefix of the
        asked entries whose JSON fits `budget` bytes (default: a response on the requester's topic under
        `max_packet_bytes`), signed by the log key. Fewer entries than asked means: ask again from where this
        page ends."""
        lo, hi = sorted((req.old_size, req.new_size))
        if budget is None:
            budget = messages.payload_budget(self.max_packet_bytes, messages.response("x" * 64))

        def refuse(error: str) -> messages.ProofResponseMessage:
            return self._signed(messages.ProofResponseMessage(id=req.id, old_size=req.old_size,
                                                              new_size=req.new_size, error=error))

        shape = messages.ProofResponseMessage(id=req.id, old_size=req.old_size, new_size=req.new_size,
                                              sig="0" * 128 if self.log_key is not None else None)
        left = budget - len(shape.model_dump_json())  # then each hash or entry adds its hex, quotes and a comma
        raw: list[bytes] = []
        with self._lock:
            size = self.ledger.size
            if hi > size:
                return refuse(f"the log has {size} leaves, not {hi}")
            path = self.ledger.tree.consistency_proof(lo, hi)
            left -= len(path) * (2 * HASH_SIZE + 3)
            end = min(req.new_size, req.old_size + messages.MAX_ENTRIES_PER_RESPONSE)
            for index in range(req.old_size, end):
                data = self.ledger.entry(index)
                left -= 2 * len(data) + 3  # hex, two quotes, a comma
                if left < 0:
                    break
                raw.append(data)
        if req.old_size < req.new_size and not raw:
            return refuse(f"leaf {req.old_size} does not fit in one packet of {self.max_packet_bytes} bytes; "
                          "raise broker.max_packet_bytes (and the broker's max_packet_size)")
        return self._signed(messages.ProofResponseMessage(id=req.id, old_size=req.old_size, new_size=req.new_size,
                                                          consistency_path=[h.hex() for h in path],
                                                          entries=[e.hex() for e in raw]))

    def _signed(self, resp: messages.ProofResponseMessage) -> messages.ProofResponseMessage:
        return resp.signed(self.log_key.sign) if self.log_key is not None else resp

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.serve(client, msg)

    def serve(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """Answer one message from `cc/v1/miner/+/req` on `client` (for a client shared with other work)."""
        parsed = messages.miner_of_topic(msg.topic)
        if parsed is None or parsed[1] != "req":
            return
        requester = parsed[0]
        wait = self.limiter.take(requester)
        if wait > 0:
            self.stats["rate_limited"] += 1
            if self.stats["rate_limited"] & (self.stats["rate_limited"] - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
                log.warning("proof requests from %s above %g/s (burst %d): refused (%d so far)", requester[:64],
                            self.limiter.rate, self.limiter.burst, self.stats["rate_limited"])
            if wait <= 1.0 / self.limiter.rate:  # the first refusal of a run says when to come back, later ones not
                try:
                    req = messages.ProofRequestMessage.model_validate_json(msg.payload)
                except ValidationError:
                    return
                refusal = self._signed(messages.ProofResponseMessage(
                    id=req.id, old_size=req.old_size, new_size=req.new_size,
                    error=f"{messages.RATE_LIMITED}: retry in {wait:.3f} s"))
                client.publish(messages.response(requester), refusal.model_dump_json().encode(), qos=0)
            return
        try:
            req = messages.ProofRequestMessage.model_validate_json(msg.payload)
        except ValidationError:
            log.info("ignored a malformed proof request on %s", msg.topic[:200])
            return
        topic = messages.response(requester)
        payload = self.answer(req, messages.payload_budget(self.max_packet_bytes, topic)).model_dump_json().encode()
        if len(payload) > messages.payload_budget(self.max_packet_bytes, topic):  # never queue what the broker refuses
            self.stats["oversize"] += 1
            log.error("a proof answer to %s is %d bytes, above broker.max_packet_bytes %d; not sent",
                      requester[:64], len(payload), self.max_packet_bytes)
            return
        self.stats["answered"] += 1
        client.publish(topic, payload, qos=1)
