"""The bridge's half of the miners' protocol: answers `cc/v1/miner/{id}/req` with a consistency proof
and the new entries, read from the ledger under the appender's lock. Protocol: docs/miners.md."""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import miner_messages as messages
from carechain.config import BrokerConfig
from carechain.transport import connect_client
from chain_bridge.ledger.store import Ledger

log = logging.getLogger("carechain.bridge.proofs")


class ProofResponder:
    """Bridge side: answers `cc/v1/miner/{id}/req` with proofs and entries from the ledger.

    Pass the lock the appender holds while it extends the ledger, if another thread appends: the
    in-memory tree must not be read mid-append.
    """

    def __init__(self, ledger: Ledger, client: mqtt.Client | None = None, lock: threading.Lock | None = None):
        self.ledger = ledger
        self.client = client
        self._lock = lock or threading.Lock()

    def attach(self) -> None:
        """Serve requests on an already connected client (e.g. the bridge's)."""
        assert self.client is not None
        self.client.message_callback_add(messages.MINER_REQUEST_WILDCARD, self._on_message)
        self.client.subscribe(messages.MINER_REQUEST_WILDCARD, qos=1)

    @classmethod
    def connect(cls, ledger: Ledger, broker: BrokerConfig, client_id: str, lock: threading.Lock | None = None,
                connected: threading.Event | None = None) -> ProofResponder:
        """A responder with its own MQTT client; `connected` is set once it is subscribed."""
        responder = cls(ledger, None, lock)
        responder.client = connect_client(broker, client_id, on_message=responder._on_message,
                                          subscriptions=[(messages.MINER_REQUEST_WILDCARD, 1)], connected=connected)
        return responder

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def answer(self, req: messages.ProofRequestMessage) -> messages.ProofResponseMessage:
        """The response to one request (pure given the ledger)."""
        lo, hi = sorted((req.old_size, req.new_size))

        def refuse(error: str) -> messages.ProofResponseMessage:
            return messages.ProofResponseMessage(id=req.id, old_size=req.old_size, new_size=req.new_size, error=error)

        with self._lock:
            size = self.ledger.size
            if hi > size:
                return refuse(f"the log has {size} leaves, not {hi}")
            if req.new_size - req.old_size > messages.MAX_ENTRIES_PER_RESPONSE:
                return refuse(f"more than {messages.MAX_ENTRIES_PER_RESPONSE} entries; ask in steps")
            path = self.ledger.tree.consistency_proof(lo, hi)
            entries = [self.ledger.entry(i).hex() for i in range(req.old_size, req.new_size)]
        return messages.ProofResponseMessage(id=req.id, old_size=req.old_size, new_size=req.new_size,
                                             consistency_path=[h.hex() for h in path], entries=entries)

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.serve(client, msg)

    def serve(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """Answer one message from `cc/v1/miner/+/req` on `client` (for a client shared with other work)."""
        parsed = messages.miner_of_topic(msg.topic)
        if parsed is None or parsed[1] != "req":
            return
        try:
            req = messages.ProofRequestMessage.model_validate_json(msg.payload)
        except ValidationError:
            log.info("ignored a malformed proof request on %s", msg.topic)
            return
        client.publish(messages.response(parsed[0]), self.answer(req).model_dump_json().encode(), qos=1)
