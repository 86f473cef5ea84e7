"""A miner with `miner.tiles_url` follows the log from its tiles served over real HTTP: it catches up from them
without asking the bridge, cosigns exactly what a miner fed over MQTT cosigns, and, when the tiles lie, asks
the bridge instead of cosigning them or accusing the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from carechain import topics
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.tile_client import TileFetchError
from carechain.tiles import ENTRIES, TileRef, decode_bundle, encode_bundle
from carechain.transport import connect_client
from chain_bridge.bridge import default_origin
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.ledger.tiles import TileWriter
from chain_bridge.proof_responder import ProofResponder
from chain_miner.service import WitnessMiner
from chain_miner.tile_feed import TILES_RETRY, TileFeed, TilesBehind
from simulators.static_http import serve_directory

pytestmark = pytest.mark.integration
DEADLINE_S = 60  # a bound so a broken run fails instead of hanging; nothing asserts on timing


def wait_for(what: str, cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class Log:
    """A ledger whose checkpoints are written as tiles into a directory served by a real HTTP server."""

    def __init__(self, directory: Path) -> None:
        self.key = Identity.generate()
        self.ledger = Ledger(directory / "bridge" / "ledger.db")
        self.tiles = directory / "tiles"
        self.writer = TileWriter(self.tiles)
        self.lock = threading.Lock()
        self.seq = 0

    def grow(self, count: int) -> str:
        """Append `count` entries and checkpoint them; the note (tiles not written yet)."""
        with self.lock:
            self.ledger.append_events([EventCandidate("dev", self.seq + i, b"entry %d" % (self.seq + i))
                                       for i in range(count)])
            self.seq += count
            return self.ledger.issue_checkpoint(self.key, default_origin(self.key))

    def publish_tiles(self, note: str) -> None:
        self.writer.publish(note, self.ledger.size, self.ledger.leaves)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    log = Log(tmp_path)
    yield log
    log.ledger.close()


@pytest.fixture
def served(log: Log) -> Iterator[str]:
    log.tiles.mkdir(parents=True, exist_ok=True)
    with serve_directory(log.tiles) as url:
        yield url


def tamper_newest_entry(log: Log, size: int) -> None:
    """Replace the newest entry in its bundle AND its leaf hash in the level-0 tile: the bundle still matches its
    tile, so only the witness's check against the signed root can catch it."""
    n, width = divmod(size - 1, 256)
    bundle_ref, tile_ref = TileRef(ENTRIES, n, width + 1), TileRef(0, n, width + 1)
    bundle_path, tile_path = log.tiles / bundle_ref.path(), log.tiles / tile_ref.path()
    entries = decode_bundle(bundle_ref, bundle_path.read_bytes())
    entries[-1] = b"not what the log signed"
    bundle_path.write_bytes(encode_bundle(entries))
    tile = tile_path.read_bytes()
    tile_path.write_bytes(tile[:-32] + leaf_hash(entries[-1]))


def test_a_miner_catches_up_from_tiles_and_cosigns_what_a_miner_fed_over_mqtt_does(
        tmp_path: Path, broker, log: Log, served: str) -> None:
    from_tiles = WitnessMiner(tmp_path / "tiles-miner", broker.config, log.key.public_key, Identity.generate(),
                              request_timeout_s=3, tiles=TileFeed(served, log.key.public_key))
    from_mqtt = WitnessMiner(tmp_path / "mqtt-miner", broker.config, log.key.public_key, Identity.generate(),
                             request_timeout_s=20)
    ready = [threading.Event() for _ in range(2)]
    responder: ProofResponder | None = None
    publisher = connect_client(broker.config, f"publisher-{tmp_path.name}", connected=ready[0])
    try:
        assert ready[0].wait(30)
        # 1. No bridge answers proof requests yet, and no checkpoint is published on MQTT: the tiles miner reads
        #    the checkpoint, the proof and all 700 entries (3 bundles, the last partial) from the tiles alone.
        first = log.grow(700)
        log.publish_tiles(first)
        from_tiles.start()
        wait_for("the tiles miner to cosign the first checkpoint", lambda: from_tiles.stats["cosigned"] >= 1)
        assert from_tiles.witness.state.tree_size == 700 and from_tiles.stats["tile_fetches"] >= 1
        assert from_tiles.stats["no_response"] == 0

        # The MQTT miner judges the same note from the bridge's signed answers: the same tree, the same view.
        responder = ProofResponder.connect(log.ledger, broker.config, f"responder-{tmp_path.name}", log.lock,
                                           ready[1], log_key=log.key)
        assert ready[1].wait(30)
        from_mqtt.start()
        publisher.publish(topics.CHECKPOINT, first.encode(), qos=1, retain=True).wait_for_publish(10)
        wait_for("the MQTT miner to cosign the first checkpoint", lambda: from_mqtt.stats["cosigned"] >= 1)
        assert from_mqtt.witness.state == from_tiles.witness.state

        # 2. The log grows across a bundle boundary: a consistency proof from tiles, and only the new entries.
        second = log.grow(300)
        log.publish_tiles(second)
        publisher.publish(topics.CHECKPOINT, second.encode(), qos=1, retain=True).wait_for_publish(10)
        wait_for("both miners to cosign the second checkpoint",
                 lambda: from_tiles.witness.state.tree_size == from_mqtt.witness.state.tree_size == 1000)
        assert from_mqtt.witness.state == from_tiles.witness.state
        assert from_tiles.stats["tiles_refused"] == 0 and from_tiles.stats["refused_bad_entries"] == 0

        # 3. The tile server serves an entry the log never signed (its tile made to match): the witness refuses
        #    the tiles, asks the bridge, and cosigns the genuine log; no evidence, no false cosignature.
        third = log.grow(5)
        log.publish_tiles(third)
        tamper_newest_entry(log, 1005)
        publisher.publish(topics.CHECKPOINT, third.encode(), qos=1, retain=True).wait_for_publish(10)
        wait_for("both miners to cosign the third checkpoint",
                 lambda: from_tiles.witness.state.tree_size == from_mqtt.witness.state.tree_size == 1005)
        assert from_tiles.stats["tiles_refused"] >= 1
        assert from_mqtt.witness.state == from_tiles.witness.state
        assert from_tiles.stats["void_evidence"] == 0 and from_tiles.stats["refused_fork"] == 0
    finally:
        from_tiles.stop()
        from_mqtt.stop()
        publisher.publish(topics.CHECKPOINT, b"", qos=1, retain=True).wait_for_publish(10)
        publisher.disconnect()
        publisher.loop_stop()
        if responder is not None:
            responder.stop()


def test_the_tile_feed_refuses_a_tree_it_does_not_serve_yet_and_a_bundle_its_tile_does_not_match(
        log: Log, served: str) -> None:
    first = log.grow(300)
    log.publish_tiles(first)
    now = [0.0]
    feed = TileFeed(served, log.key.public_key, clock=lambda: now[0])
    got = feed.fetch(0, 300)
    assert [leaf_hash(e) for e in got.entries] == [leaf_hash(b"entry %d" % i) for i in range(300)]
    assert got.consistency_path == []
    assert len(feed.fetch(100, 300).entries) == 200

    second = log.grow(10)  # checkpointed, but its tiles are not written yet
    with pytest.raises(TilesBehind, match="serves the log at 300 leaves, not yet 310"):
        feed.fetch(300, 310)
    assert feed.available()  # behind is normal: the bridge is asked for this step, the tiles for the next
    log.publish_tiles(second)
    assert len(feed.fetch(300, 310).consistency_path) > 0

    bundle = log.tiles / TileRef(ENTRIES, 1, 54).path()
    entries = decode_bundle(TileRef(ENTRIES, 1, 54), bundle.read_bytes())
    bundle.write_bytes(encode_bundle([*entries[:-1], b"swapped"]))
    with pytest.raises(TileFetchError, match=r"entry 309 does not hash to its leaf hash in tile tile/0/001\.p/54"):
        feed.fetch(300, 310)
    assert not feed.available()  # a server that served a bad bundle is left alone for a while
    now[0] += TILES_RETRY.max_s * (1 + TILES_RETRY.jitter)
    assert feed.available()

    with pytest.raises(TileFetchError, match="is not this log's"):
        TileFeed(served, Identity.generate().public_key).fetch(0, 10)


def test_miner_tiles_url_gives_the_assembled_miner_a_tile_feed(tmp_path: Path) -> None:
    from carechain.config import Config, ConfigError
    from chain_miner.assembly import assemble_miner

    key = Identity.generate().public_key.hex()
    cfg = Config.model_validate({"miner": {"tiles_url": "https://log.example.org/log", "log_public_key": key,
                                           "data_dir": str(tmp_path / "miner")}})
    assembled = assemble_miner(cfg)
    try:
        assert isinstance(assembled.miner.tiles, TileFeed)
        assert assembled.miner.tiles.url == "https://log.example.org/log/"
    finally:
        assembled.lock.release()
    without = assemble_miner(Config.model_validate({"miner": {"log_public_key": key,
                                                              "data_dir": str(tmp_path / "other")}}))
    without.lock.release()
    assert without.miner.tiles is None
    with pytest.raises(ValueError, match="tiles_url"):
        Config.model_validate({"miner": {"tiles_url": "ftp://log.example.org/"}})
    with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
        assemble_miner(Config.model_validate({"miner": {"tiles_url": "http://", "log_public_key": key,
                                                        "data_dir": str(tmp_path / "third")}}))
