"""The storage miner process: keeps shares on disk and answers store, fetch, audit and delete over MQTT.

`python -m chain_miner.storage_server --data-dir D --broker HOST:PORT [--key K] [--credentials F] [--tls-ca CA]`

A thin shell around the sans-IO core: `ShareStore` is the disk (one file per share under
`D/shares/<dataset>/<segment>.<version>.<share>`, written atomically and fsynced), `handle` maps one decoded
request to one answer, and `main` wires them to MQTT. Requests arrive on `cc/v1/store/{miner}/req` and
answers go to `cc/v1/store/{miner}/resp`, both CBOR maps carrying the request's correlation id `id`; every
answer also carries `miner` and `pk`, the miner's Ed25519 public key, whose id *is* the miner id (its party id
on the ledger), so an answer's signatures are checkable without any other lookup:

| op | request fields | answer fields |
|---|---|---|
| `put` | dataset, segment, version, share, data, chunk_size | ok, receipt: the miner's store receipt |
| `get` | request: a signed RetrievalRequest (COSE); chunk_size | ok, data, answer: signed RetrievalAnswer |
| `audit` | chunk_size, challenges (below); epoch, seed | ok, attestation |

An `audit`'s challenges: [[dataset, segment, version, share, chunk(, chunk_size)], …].

A `put`'s receipt is `attestations.store_receipt`: the miner's signature over the share's place, Merkle root
(computed here from the bytes received, in `chunk_size` chunks), length and chunk size, which the owner's
`storage.commit` must carry; it says what the miner received, so a miner that loses or rots the share later
fails its audits.
| `delete` | dataset, segment, version, share | ok |

An audit's `attestation` is its answers signed with the miner key as an AuditAnswer
(carechain.storage.attestations' format: epoch, miner, seed, the digest of the challenges asked,
answers: [[chunk, proof]…] in challenge order,
[null, []] where the miner lacks the share or its file is unreadable), so anyone can recompute the verdict. A `get`
answers only a request signed for this miner; its RetrievalAnswer binds the request's hash, the share root and
the hash of the bytes served. Every answer is read from disk at the time it is asked for: no share, tree or
proof is kept in memory between requests, so a lost or corrupted file fails the very next audit.

Failures answer `ok: false` with an `error` saying what failed. On start the miner prints one JSON ready line
and publishes a retained, signed `cc/v1/store/{miner}/hello` (discovery) with a last will that empties it, so
a miner that dies disappears from discovery; on SIGTERM it empties it itself and prints its counters. With
`--credentials` it logs in to a locked-down broker with the login `carechain bridge acl` wrote for it.
Misbehaving servers for the tests and the benchmarks (dropping, corrupting, not answering) are
simulators.storage_servers, not options of this one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from carechain import cbor, envelope, topics
from carechain.config import BrokerConfig, parse_address
from carechain.credentials import CredentialsError, resolve_broker_login
from carechain.files import PUBLIC, write_atomic
from carechain.identity import Identity, KeyFileError
from carechain.storage.attestations import WireChallenge, audit_answer, retrieval_answer, store_receipt
from carechain.storage.audit import Answer, StoredShare
from carechain.storage.codec import CHUNK_SIZE, StorageError, share_root
from carechain.transport import MessageHandler, connect_client

log = logging.getLogger("carechain.storage.miner")
MAX_SHARE = 64 << 20  # refuse absurd uploads; a default share is 256 KiB
MAX_CHALLENGES = 4096
MAX_REQUEST_BYTES = 4096  # a signed RetrievalRequest is ~250 bytes
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")

Ref = tuple[str, int, int, int]  # dataset, segment, version, share


class RequestError(ValueError):
    """A request the miner cannot serve; the message goes back to the owner as `error`."""


class ShareStore:
    """Shares on disk, one file each. Nothing is cached: every read goes to the file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, dataset: str, segment: int, version: int, share: int) -> Path:
        # Dataset ids are any UTF-8; only plain names become directory names, the rest are hashed.
        name = dataset if _SAFE_NAME.fullmatch(dataset) else "h-" + hashlib.sha256(dataset.encode()).hexdigest()
        return self.root / name / f"{segment}.{version}.{share}"

    def put(self, ref: Ref, data: bytes) -> None:
        write_atomic(self.path(*ref), data, PUBLIC)  # temp file, fsync, rename, fsync the directory

    def get(self, ref: Ref) -> bytes:
        try:
            return self.path(*ref).read_bytes()
        except FileNotFoundError:
            raise RequestError(f"no share {_where(ref)} here") from None
        except OSError as e:
            raise RequestError(f"share {_where(ref)} is unreadable here: {e.strerror}") from None

    def delete(self, ref: Ref) -> bool:
        try:
            self.path(*ref).unlink()
        except FileNotFoundError:
            return False
        return True

    def stored(self, ref: Ref, chunk_size: int) -> StoredShare:
        """The share as it is on disk now, with its Merkle tree, to answer audit challenges from."""
        data = self.get(ref)
        try:
            return StoredShare(data, chunk_size)
        except StorageError as e:
            raise RequestError(f"{_where(ref)}: {e}") from None

    def count(self) -> int:
        return sum(1 for p in self.root.glob("*/*") if not p.name.startswith("."))


def _where(ref: Ref) -> str:
    return f"dataset {ref[0]!r} segment {ref[1]} v{ref[2]} share {ref[3]}"


def _int(req: dict[str, Any], name: str, low: int = 0, high: int = 2**63 - 1) -> int:
    v = req.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise RequestError(f"field {name!r} must be an integer in {low}..{high}, got {v!r}")
    return v


def _ref(fields: dict[str, Any]) -> Ref:
    ds = fields.get("dataset")
    if not isinstance(ds, str) or not 0 < len(ds.encode()) <= 255:
        raise RequestError(f"field 'dataset' must be 1..255 bytes of text, got {ds!r}")
    return ds, _int(fields, "segment"), _int(fields, "version", 1), _int(fields, "share", 0, 255)


class StorageServer:
    """What one storage miner does with one request (no MQTT here, so tests can call it directly).

    `identity` is the miner key: its id is the miner id (the miner's party id on the ledger) and it signs
    every audit and retrieval answer.
    """

    def __init__(self, identity: Identity, store: ShareStore) -> None:
        self.identity = identity
        self.miner_id = identity.device_id
        self.store = store
        self.counters = {"put": 0, "get": 0, "audit": 0, "delete": 0, "errors": 0, "ignored": 0}

    def handle(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to a decoded request, or None when there is nothing to send back."""
        op = req.get("op")
        try:
            if op == "put":
                ref = _ref(req)
                data = req.get("data")
                if not isinstance(data, bytes) or not 0 < len(data) <= MAX_SHARE:
                    raise RequestError(f"field 'data' must be 1..{MAX_SHARE} bytes")
                chunk_size = _int(req, "chunk_size", 1, MAX_SHARE) if "chunk_size" in req else CHUNK_SIZE
                try:
                    root = share_root(data, chunk_size)
                except StorageError as e:
                    raise RequestError(f"{_where(ref)}: {e}") from None
                self.store_share(ref, data)
                self.counters["put"] += 1
                return {"ok": True, "receipt": store_receipt(self.identity, *ref, root.hex(), len(data), chunk_size)}
            if op == "get":
                return self._get(req)
            if op == "audit":
                return {"ok": True, **self._audit(req)}
            if op == "delete":
                self.counters["delete"] += 1
                return {"ok": True, "deleted": self.store.delete(_ref(req))}
            raise RequestError(f"unknown op {op!r}; expected put, get, audit or delete")
        except RequestError as e:
            self.counters["errors"] += 1
            return {"ok": False, "error": str(e)}

    def store_share(self, ref: Ref, data: bytes) -> None:
        """Keep one uploaded share (a hook: simulators.storage_servers' dishonest servers override it)."""
        self.store.put(ref, data)

    def answers_retrieval(self, ref: Ref) -> bool:
        """Whether to answer a `get` (a hook, as `store_share`)."""
        return True

    def ready_info(self) -> dict[str, Any]:
        """Extra fields of the ready line."""
        return {}

    def hello(self, now_ms: int) -> bytes:
        """The signed discovery message (retained on `cc/v1/store/{miner}/hello`)."""
        return envelope.sign(self.identity, {"v": 1, "miner": self.miner_id, "pk": self.identity.public_key,
                                             "shares": self.store.count(), "ts": now_ms})

    def _get(self, req: dict[str, Any]) -> dict[str, Any] | None:
        request = req.get("request")
        if not isinstance(request, bytes) or len(request) > MAX_REQUEST_BYTES:
            raise RequestError(f"field 'request' must be a signed retrieval request of at most {MAX_REQUEST_BYTES} "
                               "bytes (COSE_Sign1)")
        try:
            signed = envelope.parse(request)
        except envelope.EnvelopeError as e:
            raise RequestError(f"retrieval request: {e}") from None
        # The requester's key is not known here (any registered party may ask): the answer binds the request's
        # bytes, so what was asked, by whom, is for the rules to judge.
        fields = signed.payload
        if not isinstance(fields, dict) or fields.get("v") != 1:
            raise RequestError("retrieval request: payload must be a map with v = 1")
        if fields.get("miner") != self.miner_id:
            raise RequestError(f"retrieval request is for miner {fields.get('miner')!r}, not {self.miner_id}")
        ref = _ref(fields)
        chunk_size = _int(req, "chunk_size", 1, MAX_SHARE) if "chunk_size" in req else CHUNK_SIZE
        if not self.answers_retrieval(ref):
            self.counters["ignored"] += 1
            return None
        data = self.store.get(ref)
        try:
            root = share_root(data, chunk_size)
        except StorageError as e:
            raise RequestError(f"{_where(ref)}: {e}") from None
        self.counters["get"] += 1
        return {"ok": True, "data": data, "answer": retrieval_answer(self.identity, request, root.hex(), data)}

    def _audit(self, req: dict[str, Any]) -> dict[str, Any]:
        chunk_size = _int(req, "chunk_size", 1, MAX_SHARE)
        challenges = req.get("challenges")
        if not isinstance(challenges, list) or len(challenges) > MAX_CHALLENGES:
            raise RequestError(f"field 'challenges' must be a list of at most {MAX_CHALLENGES}")
        epoch = _int(req, "epoch") if "epoch" in req else 0
        seed = req.get("seed", b"")
        if not isinstance(seed, bytes) or len(seed) > 64:
            raise RequestError("field 'seed' must be at most 64 bytes")
        self.counters["audit"] += 1
        # Each share is read from its file once per request, never kept: a deleted or rotten file fails now.
        shares: dict[tuple[Ref, int], StoredShare | None] = {}
        asked: list[WireChallenge] = []
        answers: list[Answer | None] = []
        for c in challenges:
            if not isinstance(c, list) or len(c) not in (5, 6):
                raise RequestError("a challenge is [dataset, segment, version, share, chunk(, chunk_size)]")
            fields = dict(zip(("dataset", "segment", "version", "share", "chunk", "chunk_size"), c, strict=False))
            ref = _ref(fields)
            chunk = _int(fields, "chunk")
            size = _int(fields, "chunk_size", 1, MAX_SHARE) if len(c) == 6 else chunk_size
            asked.append((*ref, chunk, size))
            if (ref, size) not in shares:
                try:
                    shares[(ref, size)] = self.store.stored(ref, size)
                except RequestError:
                    shares[(ref, size)] = None
            stored = shares[(ref, size)]
            try:
                if stored is None:
                    raise StorageError("not held")
                answers.append(stored.answer(chunk))
            except StorageError:
                answers.append(None)  # [null, []] on the wire: the verifier turns it into a failed challenge
        # The answer binds what was asked: answers to challenges the ledger did not draw prove nothing.
        return {"attestation": audit_answer(self.identity, epoch, seed, asked, answers)}


def serve(miner: StorageServer, broker: BrokerConfig, stop: threading.Event) -> None:
    """Answer requests until `stop` is set. Requests are handled one at a time off the network thread."""
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    connected = threading.Event()
    hello = topics.store_hello(miner.miner_id)
    client = _connect(broker, miner.miner_id, hello, connected, lambda _c, _u, msg: inbox.put(bytes(msg.payload)))
    resp_topic = topics.store_response(miner.miner_id)
    try:
        if not connected.wait(30):
            raise SystemExit(f"storage miner {miner.miner_id}: broker {broker.address} not reachable in 30 s "
                             "(or it refused the login or the subscription; see the log above)")
        client.publish(hello, miner.hello(int(time.time() * 1000)), qos=1, retain=True).wait_for_publish(10)
        print(json.dumps({"miner": miner.miner_id, "ready": True, **miner.ready_info()}), flush=True)
        while not stop.is_set():
            try:
                payload = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                req = cbor.decode(payload)
            except cbor.CBORError as e:
                log.warning("%s: undecodable request ignored (%s)", miner.miner_id, e)
                continue
            if not isinstance(req, dict) or "id" not in req:
                continue
            answer = miner.handle(req)
            if answer is not None:
                answer |= {"id": req["id"], "miner": miner.miner_id, "pk": miner.identity.public_key,
                           "op": req.get("op")}
                client.publish(resp_topic, cbor.encode(answer), qos=1)
    finally:
        if client.is_connected():
            client.publish(hello, b"", qos=1, retain=True).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()


def _connect(broker: BrokerConfig, miner_id: str, hello: str, connected: threading.Event,
             on_message: MessageHandler) -> mqtt.Client:
    """The miner's MQTT client, with a last will that empties its retained hello: a miner that dies (no clean
    disconnect) vanishes from discovery."""
    kwargs: dict[str, Any] = {"connected": connected, "on_message": on_message,
                              "subscriptions": [(topics.store_request(miner_id), 1)]}
    try:
        return connect_client(broker, f"carechain-store-{miner_id}", **(kwargs | {"will": (hello, b"")}))
    except TypeError:  # a transport without `will` (it must be set before paho's first CONNECT): no last will
        log.warning("storage miner %s: carechain.transport.connect_client takes no `will`; the hello is not "
                    "cleared if this process dies", miner_id)
        return connect_client(broker, f"carechain-store-{miner_id}", **kwargs)


def argument_parser(prog: str = "python -m chain_miner.storage_server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="where shares (and the key, by default) live")
    p.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    p.add_argument("--key", type=Path, help="miner key file (default DATA_DIR/miner.key, created if missing); "
                   "the key of the miner party registered on the ledger")
    p.add_argument("--credentials", type=Path, help="MQTT login file written by `carechain bridge acl` (0600), "
                   "for a locked-down broker")
    p.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting only this CA")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve /metrics, /healthz and /readyz here "
                   "(docs/metrics.md); bind it to 127.0.0.1 or a management network")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace,
        make_server: Callable[[Identity, ShareStore], StorageServer] = StorageServer) -> int:
    """Serve until SIGTERM/SIGINT with the parsed `args`; prints the ready line, then the counters."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        host, port = parse_address(args.broker)
        broker = resolve_broker_login(BrokerConfig(host=host, port=port, credentials_file=args.credentials,
                                                   tls_ca=args.tls_ca))
        key = Identity.load_or_create(args.key or args.data_dir / "miner.key")
    except (ValueError, KeyFileError, CredentialsError) as exc:
        print(f"storage server: {exc}", file=sys.stderr)
        return 2
    server = make_server(key, ShareStore(args.data_dir / "shares"))
    health = None
    if args.metrics_listen:
        from carechain.health_http import HealthServer, ListenError
        from chain_miner.metrics import storage_registry

        try:
            health = HealthServer.from_listen(args.metrics_listen, storage_registry(server),
                                              lambda: (True, f"storage miner {server.miner_id}"))
            health.start()
        except (ValueError, ListenError) as exc:
            print(f"storage server: --metrics-listen: {exc}", file=sys.stderr)
            return 2
    try:
        serve(server, broker, stop)
    finally:
        if health is not None:
            health.stop()
    print(json.dumps({"miner": server.miner_id, "stopped": True, **server.counters}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argument_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    os.umask(0o077)
    raise SystemExit(main())
