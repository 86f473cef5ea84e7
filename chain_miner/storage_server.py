"""The storage miner process: keeps shares on disk and answers store, fetch, audit and delete over MQTT.

`python -m chain_miner.storage_server --data-dir D --broker HOST:PORT [--key K]`

A thin shell around the sans-IO core: `ShareStore` is the disk (one file per share under
`D/shares/<dataset>/<segment>.<version>.<share>`, written atomically and fsynced), `handle` maps one decoded
request to one answer, and `main` wires them to MQTT. Requests arrive on `cc/v1/store/{miner}/req` and
answers go to `cc/v1/store/{miner}/resp`, both CBOR maps carrying the request's correlation id `id`:

| op | request fields | answer fields |
|---|---|---|
| `put` | dataset, segment, version, share, data | ok |
| `get` | dataset, segment, version, share | ok, data |
| `audit` | chunk_size, challenges: [[dataset, segment, version, share, chunk], …] | ok, answers: [[chunk, proof]…] |
| `delete` | dataset, segment, version, share | ok |

An audit answer is null where the miner lacks the share. Failures answer `ok: false` with an `error` saying
what failed. On start the miner prints one JSON ready line and publishes a retained `cc/v1/store/{miner}/hello`
(discovery); on SIGTERM it empties it and prints its counters. Misbehaving servers for the tests and the
benchmarks (dropping, corrupting, not answering) are simulators.storage_servers, not options of this one.
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
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carechain import cbor, topics
from carechain.config import BrokerConfig, parse_address
from carechain.files import PUBLIC, write_atomic
from carechain.identity import Identity, KeyFileError
from carechain.storage.audit import StoredShare
from carechain.storage.codec import StorageError
from carechain.transport import connect_client

log = logging.getLogger("carechain.storage.miner")
MAX_SHARE = 64 << 20  # refuse absurd uploads; a default share is 256 KiB
MAX_CHALLENGES = 4096
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_TREE_CACHE = 64  # share trees kept for audits (a 256 KiB share's tree is ~16 KiB of hashes)


class RequestError(ValueError):
    """A request the miner cannot serve; the message goes back to the owner as `error`."""


class ShareStore:
    """Shares on disk, one file each, plus a small cache of Merkle trees for audits."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._trees: OrderedDict[tuple[Path, int], StoredShare] = OrderedDict()

    def path(self, dataset: str, segment: int, version: int, share: int) -> Path:
        # Dataset ids are any UTF-8; only plain names become directory names, the rest are hashed.
        name = dataset if _SAFE_NAME.fullmatch(dataset) else "h-" + hashlib.sha256(dataset.encode()).hexdigest()
        return self.root / name / f"{segment}.{version}.{share}"

    def put(self, ref: tuple[str, int, int, int], data: bytes) -> None:
        path = self.path(*ref)
        write_atomic(path, data, PUBLIC)  # temp file, fsync, rename, fsync the directory
        self._forget(path)

    def get(self, ref: tuple[str, int, int, int]) -> bytes:
        try:
            return self.path(*ref).read_bytes()
        except FileNotFoundError:
            raise RequestError(f"no share {_where(ref)} here") from None

    def delete(self, ref: tuple[str, int, int, int]) -> bool:
        path = self.path(*ref)
        self._forget(path)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def stored(self, ref: tuple[str, int, int, int], chunk_size: int) -> StoredShare:
        path = self.path(*ref)
        tree = self._trees.get((path, chunk_size))
        if tree is None:
            data = self.get(ref)
            try:
                tree = StoredShare(data, chunk_size)
            except StorageError as e:
                raise RequestError(f"{_where(ref)}: {e}") from None
            self._trees[(path, chunk_size)] = tree
            while len(self._trees) > _TREE_CACHE:
                self._trees.popitem(last=False)
        else:
            self._trees.move_to_end((path, chunk_size))
        return tree

    def count(self) -> int:
        return sum(1 for p in self.root.glob("*/*") if not p.name.startswith("."))

    def _forget(self, path: Path) -> None:
        for key in [k for k in self._trees if k[0] == path]:
            del self._trees[key]


def _where(ref: tuple[str, int, int, int]) -> str:
    return f"dataset {ref[0]!r} segment {ref[1]} v{ref[2]} share {ref[3]}"


def _int(req: dict[str, Any], name: str, low: int = 0, high: int = 2**63 - 1) -> int:
    v = req.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise RequestError(f"field {name!r} must be an integer in {low}..{high}, got {v!r}")
    return v


def _ref(fields: dict[str, Any]) -> tuple[str, int, int, int]:
    ds = fields.get("dataset")
    if not isinstance(ds, str) or not 0 < len(ds.encode()) <= 255:
        raise RequestError(f"field 'dataset' must be 1..255 bytes of text, got {ds!r}")
    return ds, _int(fields, "segment"), _int(fields, "version", 1), _int(fields, "share", 0, 255)


class StorageServer:
    """What one storage miner does with one request (no MQTT here, so tests can call it directly)."""

    def __init__(self, miner_id: str, store: ShareStore) -> None:
        self.miner_id = miner_id
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
                self.store_share(ref, data)
                self.counters["put"] += 1
                return {"ok": True}
            if op == "get":
                ref = _ref(req)
                if not self.answers_retrieval(ref):
                    self.counters["ignored"] += 1
                    return None
                data = self.store.get(ref)
                self.counters["get"] += 1
                return {"ok": True, "data": data}
            if op == "audit":
                return {"ok": True, "answers": self._audit(req)}
            if op == "delete":
                self.counters["delete"] += 1
                return {"ok": True, "deleted": self.store.delete(_ref(req))}
            raise RequestError(f"unknown op {op!r}; expected put, get, audit or delete")
        except RequestError as e:
            self.counters["errors"] += 1
            return {"ok": False, "error": str(e)}

    def store_share(self, ref: tuple[str, int, int, int], data: bytes) -> None:
        """Keep one uploaded share (a hook: simulators.storage_servers' dishonest servers override it)."""
        self.store.put(ref, data)

    def answers_retrieval(self, ref: tuple[str, int, int, int]) -> bool:
        """Whether to answer a `get` (a hook, as `store_share`)."""
        return True

    def ready_info(self) -> dict[str, Any]:
        """Extra fields of the ready line."""
        return {}

    def _audit(self, req: dict[str, Any]) -> list[Any]:
        chunk_size = _int(req, "chunk_size", 1, MAX_SHARE)
        challenges = req.get("challenges")
        if not isinstance(challenges, list) or len(challenges) > MAX_CHALLENGES:
            raise RequestError(f"field 'challenges' must be a list of at most {MAX_CHALLENGES}")
        self.counters["audit"] += 1
        answers: list[Any] = []
        for c in challenges:
            if not isinstance(c, list) or len(c) != 5:
                raise RequestError("a challenge is [dataset, segment, version, share, chunk]")
            fields = dict(zip(("dataset", "segment", "version", "share", "chunk"), c, strict=True))
            ref = _ref(fields)
            try:
                a = self.store.stored(ref, chunk_size).answer(_int(fields, "chunk"))
            except (RequestError, StorageError):
                answers.append(None)  # the owner's verify_answer turns this into a failed challenge
                continue
            answers.append([a.chunk, list(a.proof)])
        return answers


def serve(miner: StorageServer, broker: BrokerConfig, stop: threading.Event) -> None:
    """Answer requests until `stop` is set. Requests are handled one at a time off the network thread."""
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    connected = threading.Event()
    hello = topics.store_hello(miner.miner_id)
    client = connect_client(
        broker, f"store-miner-{miner.miner_id}", connected=connected,
        on_message=lambda _c, _u, msg: inbox.put(bytes(msg.payload)),
        subscriptions=[(topics.store_request(miner.miner_id), 1)])
    resp_topic = topics.store_response(miner.miner_id)
    try:
        if not connected.wait(30):
            raise SystemExit(f"storage miner {miner.miner_id}: broker {broker.address} not reachable in 30 s")
        announce = {"miner": miner.miner_id, "shares": miner.store.count(), "ts": int(time.time() * 1000)}
        client.publish(hello, json.dumps(announce).encode(), qos=1, retain=True).wait_for_publish(10)
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
                answer |= {"id": req["id"], "miner": miner.miner_id, "op": req.get("op")}
                client.publish(resp_topic, cbor.encode(answer), qos=1)
    finally:
        if client.is_connected():
            client.publish(hello, b"", qos=1, retain=True).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()


def argument_parser(prog: str = "python -m chain_miner.storage_server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="where shares (and the key, by default) live")
    p.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    p.add_argument("--key", type=Path, help="miner key file (default DATA_DIR/miner.key, created if missing)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace, make_server: Callable[[str, ShareStore], StorageServer] = StorageServer) -> int:
    """Serve until SIGTERM/SIGINT with the parsed `args`; prints the ready line, then the counters."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        host, port = parse_address(args.broker)
        key = Identity.load_or_create(args.key or args.data_dir / "miner.key")
    except (ValueError, KeyFileError) as exc:
        print(f"storage server: {exc}", file=sys.stderr)
        return 2
    server = make_server(key.device_id, ShareStore(args.data_dir / "shares"))
    serve(server, BrokerConfig(host=host, port=port), stop)
    print(json.dumps({"miner": server.miner_id, "stopped": True, **server.counters}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argument_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    os.umask(0o077)
    raise SystemExit(main())
