"""A bridge with `bridge.tiles_dir` writes its log as tiles after each checkpoint; a real `http.server` serves the
directory; `carechain verify --tiles URL` checks the checkpoint, an inclusion, a consistency and the whole log
from it, and says NOT VERIFIED when a tile, an entry or the key is wrong."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain import envelope
from carechain.checkpoint import parse_note
from carechain.cli import app
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.proofs import verify_inclusion_bundle
from carechain.tile_client import HttpTiles, TiledLog, TileFetchError
from carechain.tiles import TileRef
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.integrity import audit_ledger
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, log_key, operator_key
from simulators.static_http import serve_directory

DEVS = [Identity.from_seed(bytes([0x50 + i]) * 32) for i in range(3)]
BATCHES = [5, 250, 40, 300, 1]  # checkpoints at irregular sizes, across tile boundaries


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A bridge data directory with registrations, ~600 events in batches, a checkpoint and tiles after each."""
    data_dir = tmp_path_factory.mktemp("bridge")
    tiles = data_dir / "public-tiles"
    ledger = Ledger(ledger_path(data_dir))
    cfg = BridgeConfig(data_dir=data_dir, tiles_dir=tiles, contracts=False,
                       limits=Limits(max_events_per_s=1e6, burst=1_000_000))
    bridge = Bridge(cfg, BrokerConfig(), log_key(data_dir), ledger)
    now = int(time.time() * 1000)
    regs = []
    for d in DEVS:
        reg = Registration(dev=d.device_id, pk=d.public_key, profile="heart_rate_band", owner="patient:a",
                           site="ward", ts=now)
        regs.append((registration_entry(operator_key(data_dir), reg), reg))
    ledger.append_registrations(regs)
    notes = [bridge.maybe_checkpoint()]
    seq = 0
    for n in BATCHES:
        batch = []
        for _ in range(n):
            d = DEVS[seq % 3]
            batch.append((f"cc/v1/dev/{d.device_id}/ev", envelope.sign(d, make_payload(
                d.device_id, seq // 3, now, "heart_rate", {"bpm": 60 + seq % 40}))))
            seq += 1
        bridge.process(batch)
        notes.append(bridge.maybe_checkpoint())
    size = ledger.size
    ledger.close()
    return {"data_dir": data_dir, "tiles": tiles, "notes": notes, "size": size,
            "key": log_key(data_dir).public_key.hex(), "operator": operator_key(data_dir).public_key.hex()}


@pytest.fixture
def served(log: dict) -> Iterator[str]:
    """A real HTTP server on a free loopback port serving the tile directory; stopped after the test."""
    with serve_directory(log["tiles"]) as url:
        yield url


def verify(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["verify", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_the_bridge_writes_tiles_that_serve_its_latest_checkpoint(log: dict) -> None:
    assert (log["tiles"] / "checkpoint").read_text() == log["notes"][-1]
    assert log["size"] == 3 + sum(BATCHES)
    assert (log["tiles"] / TileRef(0, 1).path()).stat().st_size == 8192
    assert (log["tiles"] / TileRef(0, 2, log["size"] - 512).path()).exists()


def test_verify_checks_the_served_checkpoint_with_the_log_key(log: dict, served: str) -> None:
    code, out = verify("--tiles", served, "--log-key", log["key"])
    assert code == 0, out
    assert out["checkpoint"]["tree_size"] == log["size"]
    code, out = verify("--tiles", served, "--log-key", log["operator"])
    assert code == 1 and "checkpoint" in out["error"]


def test_verify_proves_any_leaf_from_tiles(log: dict, served: str) -> None:
    for index in (0, 3, 255, 256, 300, log["size"] - 1):
        code, out = verify("--tiles", served, "--log-key", log["key"], "--index", str(index))
        assert code == 0, out
        assert out["inclusion"]["leaf_index"] == index
        assert out["inclusion"]["entry_type"] == ("device.register" if index < 3 else "event")
    code, out = verify("--tiles", served, "--log-key", log["key"], "--index", str(log["size"]))
    assert code == 1 and "not in the log" in out["error"]


def test_verify_proves_the_served_log_extends_an_older_checkpoint(log: dict, served: str, tmp_path: Path) -> None:
    for old in log["notes"][:-1]:
        (tmp_path / "old.txt").write_text(old)
        code, out = verify("--tiles", served, "--log-key", log["key"], "--checkpoint", str(tmp_path / "old.txt"))
        assert code == 0, out
        assert out["consistency"]["new_size"] == log["size"]


def test_verify_full_from_tiles_audits_what_the_ledger_audit_does(log: dict, served: str) -> None:
    code, out = verify("--tiles", served, "--log-key", log["key"], "--full", "--operator-key", log["operator"])
    assert code == 0, out
    local = audit_ledger(ledger_path(log["data_dir"]), bytes.fromhex(log["key"]),
                         operator_keys={operator_key(log["data_dir"]).device_id: bytes.fromhex(log["operator"])})
    for k in ("entries", "events", "registrations", "root_hash"):
        assert out["full"][k] == local.as_dict()[k]


def test_a_tampered_tile_or_entry_is_not_verified(log: dict, served: str) -> None:
    tile = log["tiles"] / TileRef(0, 0).path()
    bundle = log["tiles"] / TileRef(-1, 1).path()
    good_tile, good_bundle = tile.read_bytes(), bundle.read_bytes()
    try:
        tile.write_bytes(good_tile[:32 * 7] + bytes(32) + good_tile[32 * 8:])
        code, out = verify("--tiles", served, "--log-key", log["key"], "--index", "6")  # leaf 7 is its sibling
        assert code == 1 and "inclusion" in out["error"]
        code, out = verify("--tiles", served, "--log-key", log["key"], "--full")
        assert code == 1 and "tile/0/000" in out["error"]
        tile.write_bytes(good_tile)
        # One entry's bytes changed (same length): its leaf hash no longer matches.
        bundle.write_bytes(good_bundle[:-1] + bytes([good_bundle[-1] ^ 1]))
        code, out = verify("--tiles", served, "--log-key", log["key"], "--index", "511")
        assert code == 1 and "inclusion" in out["error"]
        code, out = verify("--tiles", served, "--log-key", log["key"], "--full")
        assert code == 1 and "entry 511" in out["error"]
    finally:
        tile.write_bytes(good_tile)
        bundle.write_bytes(good_bundle)


def test_a_reader_with_an_older_checkpoint_falls_back_to_the_full_tile(log: dict, served: str) -> None:
    """The writer deletes a partial tile once its full tile exists; an older checkpoint's proof still works."""
    older = next(n for n in log["notes"] if 256 < int(parse_note(n)[0].split("\n")[1]) < 512)
    size = int(parse_note(older)[0].split("\n")[1])
    assert not (log["tiles"] / TileRef(0, 1, size - 256).path()).exists()
    source = HttpTiles(served)
    reader = TiledLog(source, bytes.fromhex(log["key"]))
    v = verify_inclusion_bundle(reader.inclusion_bundle(size - 1, older), bytes.fromhex(log["key"]))
    assert v.leaf_index == size - 1 and v.checkpoint.tree_size == size


def test_an_unreachable_or_wrong_url_is_a_clear_error(log: dict, served: str) -> None:
    code, out = verify("--tiles", served + "nothing/", "--log-key", log["key"])
    assert code == 1 and "not found (HTTP 404)" in out["error"]
    code, out = verify("--tiles", "http://127.0.0.1:9/", "--log-key", log["key"])
    assert code == 1 and "GET http://127.0.0.1:9/checkpoint" in out["error"]
    result = CliRunner().invoke(app, ["verify", "--tiles", "ftp://x/", "--log-key", log["key"]])
    assert result.exit_code == 1 and "not an http:// or https:// URL" in result.output
    result = CliRunner().invoke(app, ["verify", "--tiles", served])
    assert result.exit_code == 2 and "--log-key" in result.output
    with pytest.raises(TileFetchError, match="larger than"):
        HttpTiles(served).get("checkpoint", 10)


class _GzipHandler(http.server.BaseHTTPRequestHandler):
    """Serves every path as gzip: `bomb` expands far past any tile, anything else is one small tile."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = gzip.compress(bytes(10_000_000) if self.path.endswith("bomb") else b"\x01" * 64)
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_gzip_bodies_are_decompressed_within_the_size_bound() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GzipHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = HttpTiles(f"http://127.0.0.1:{server.server_address[1]}")
        assert source.get("tile/0/000.p/2", 8192) == b"\x01" * 64
        with pytest.raises(TileFetchError, match="larger than the 8192 bytes"):
            source.get("bomb", 8192)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_tile_directory_that_cannot_be_written_never_stops_anchoring(tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    ledger = Ledger(ledger_path(tmp_path))
    cfg = BridgeConfig(data_dir=tmp_path, tiles_dir=tiles, contracts=False)
    bridge = Bridge(cfg, BrokerConfig(), log_key(tmp_path), ledger)
    d = DEVS[0]
    now = int(time.time() * 1000)
    reg = Registration(dev=d.device_id, pk=d.public_key, profile="heart_rate_band", owner="patient:a", site="w",
                       ts=now)
    ledger.append_registrations([(registration_entry(operator_key(tmp_path), reg), reg)])
    (tiles / "tile").write_bytes(b"")  # a file where the tile tree must go: every tile write fails
    try:
        assert bridge.maybe_checkpoint() is not None  # the checkpoint is issued all the same
        assert not (tiles / "checkpoint").exists()
        (tiles / "tile").unlink()
        bridge.process([(f"cc/v1/dev/{d.device_id}/ev", envelope.sign(d, make_payload(
            d.device_id, 0, now, "heart_rate", {"bpm": 61})))])
        note = bridge.maybe_checkpoint()
        assert (tiles / "checkpoint").read_text() == note  # the next checkpoint brings the tiles up to date
        assert (tiles / "tile/entries/000.p/2").exists()
    finally:
        ledger.close()
