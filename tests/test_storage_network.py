"""Storage over a real mosquitto with 11 storage miner processes (8 honest, one that deletes what it stores,
one that corrupts it, one that ignores retrievals): put/get with n−k miners killed, audits catching the
cheaters, unanswered retrievals costing rewards, and an update transferring only the changed segment."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain import topics
from carechain.cli import app
from carechain.config import BrokerConfig
from carechain.identity import Identity
from carechain.storage.codec import StorageParams
from carechain.storage.keyfile import load_dataset_key
from chain_bridge.storage_client import StorageClient, key_path, load_manifest
from contract_rules.rewards import EpochEvents, RewardPolicy, settle_epoch
from simulators.miners import REPO, clear_retained

pytestmark = pytest.mark.integration
# Small segments keep the test quick: 16 KiB of ciphertext per segment, 4 KiB shares of 16 chunks of 256 B.
PARAMS = StorageParams(segment_size=16 * 1024 - 16, k=4, n=8, chunk_size=256)
SEED = bytes(range(32))
TIMEOUT_S = 3.0


class StorageMiner:
    """One `python -m chain_miner.storage_server` process (`simulators.storage_servers` for a misbehaving
    one); its key is made first so its id is known."""

    def __init__(self, data_dir: Path, broker: BrokerConfig, misbehave: str | None = None, *,
                 key: Identity | None = None) -> None:
        self.data_dir = data_dir
        self.key = key or Identity.generate()
        self.key.save(data_dir / "miner.key")
        self.id = self.key.device_id
        module = "simulators.storage_servers" if misbehave else "chain_miner.storage_server"
        self.args = [sys.executable, "-m", module, "--data-dir", str(data_dir), "--broker", broker.address,
                     *(["--misbehave", misbehave] if misbehave else [])]
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.data_dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: [self._lines.put(line) for line in out], daemon=True).start()

    def wait_ready(self) -> dict[str, object]:
        try:
            return dict(json.loads(self._lines.get(timeout=30)))
        except queue.Empty:
            raise AssertionError((self.data_dir / "stderr.log").read_text()) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def share_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "shares").glob("*/*") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker) -> Iterator[dict[str, list[StorageMiner]]]:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    kinds = [None] * 8 + ["delete", "corrupt", "ignore-retrievals"]
    with running_fleet(tmp_path_factory.mktemp("storage-fleet"), broker.config, kinds) as miners:
        yield {"honest": miners[:8], "delete": [miners[8]], "corrupt": [miners[9]], "ignore": [miners[10]]}


@contextmanager
def running_fleet(root: Path, broker: BrokerConfig, kinds: Sequence[str | None],
                  keys: Sequence[Identity] | None = None) -> Iterator[list[StorageMiner]]:
    """One started miner process per entry of `kinds` (None: honest), ready, with `keys` (default: fresh ones);
    stopped and their hellos cleared on exit."""
    miners = [StorageMiner(root / f"miner{i}", broker, kind, key=keys[i] if keys else None)
              for i, kind in enumerate(kinds)]
    try:
        for m in miners:
            m.start()
        for m in miners:
            assert m.wait_ready()["miner"] == m.id
        yield miners
    finally:
        for m in miners:
            m.stop()
        clear_retained(broker, f"clear-{root.name}", [topics.store_hello(m.id) for m in miners])


@pytest.fixture
def client(broker) -> Iterator[StorageClient]:  # type: ignore[no-untyped-def]
    with StorageClient(broker.config, timeout=TIMEOUT_S) as c:
        yield c


def ids(miners: list[StorageMiner]) -> list[str]:
    return [m.id for m in miners]


def test_miners_announce_themselves_for_discovery(fleet, client: StorageClient) -> None:  # type: ignore[no-untyped-def]
    everyone = {m.id for group in fleet.values() for m in group}
    assert everyone <= set(client.discover(settle_s=1.0))


def test_put_writes_key_and_manifest_private_and_one_file_per_share(fleet, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3 * PARAMS.segment_size + 1000)
    path = tmp_path / "d.manifest.json"
    seen: list[tuple[str, int, int]] = []
    client.progress = lambda phase, done, total: seen.append((phase, done, total))
    m = client.put(data, ids(fleet["honest"]), SEED, path, params=PARAMS)
    assert (path.stat().st_mode & 0o777, key_path(path).stat().st_mode & 0o777) == (0o600, 0o600)
    assert load_manifest(path) == m and len(m.segments) == 4
    total = sum(sh.length for s in m.segments for sh in s.shares)
    assert seen[-1] == ("put", total, total) and total == 3 * 8 * 4096 + 8 * (-(-(1000 + 16) // 4))
    # 8 honest miners, n = 8: every miner holds exactly one share of every segment.
    assert all(len([p for p in h.share_files() if p.parent.name == m.dataset_id]) == 4 for h in fleet["honest"])


def test_get_returns_exact_bytes_with_n_minus_k_miners_killed(fleet, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(5 * PARAMS.segment_size + 77)
    path = tmp_path / "d.manifest.json"
    m = client.put(data, ids(fleet["honest"]), SEED, path, params=PARAMS)
    key = load_dataset_key(key_path(path), m.dataset_id)
    victims = fleet["honest"][:PARAMS.n - PARAMS.k]
    try:
        for v in victims:
            v.kill()
        assert client.get(m, key) == data
        assert [len(s.live) for s in client.status(m)] == [PARAMS.k] * len(m.segments)
        dead = set(ids(victims))
        assert {miner for miner, answered in client.retrievals if not answered} <= dead
    finally:
        for v in victims:  # same data dir and key: the same miner comes back with its shares
            v.start()
        for v in victims:
            v.wait_ready()
    assert all(s.readable and len(s.live) == PARAMS.n for s in client.status(m))


def test_audit_catches_deleting_and_corrupting_miners(fleet, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cheaters = ids(fleet["delete"] + fleet["corrupt"])
    pool = ids(fleet["honest"]) + cheaters
    m = client.put(os.urandom(6 * PARAMS.segment_size), pool, SEED, tmp_path / "d.manifest.json", params=PARAMS)
    holders = {sh.miner for s in m.segments for sh in s.shares}
    assert set(cheaters) <= holders  # fixed seed: both cheaters hold shares (else the test proves nothing)
    verdicts = client.audit(m, bytes(32), challenges=8)
    assert set(verdicts) == holders
    for miner, v in verdicts.items():
        assert v.passed == (miner not in cheaters), v
    assert "did not answer" not in verdicts[cheaters[0]].reasons[0]  # the deleter answers, without the chunks
    assert all(v.failed == v.challenges == 8 for v in (verdicts[c] for c in cheaters))
    # The data is still readable: the cheaters' shares are detected by their roots and others fetched.
    key = load_dataset_key(key_path(tmp_path / "d.manifest.json"), m.dataset_id)
    assert len(client.get(m, key, prefer=cheaters)) == m.length


def test_ignored_retrievals_count_as_failed_and_cost_rewards(fleet, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ignorer = fleet["ignore"][0].id
    pool = ids(fleet["honest"])[:7] + [ignorer]
    data = os.urandom(2 * PARAMS.segment_size)
    path = tmp_path / "d.manifest.json"
    m = client.put(data, pool, SEED, path, params=PARAMS)
    key = load_dataset_key(key_path(path), m.dataset_id)
    assert client.get(m, key, prefer=[ignorer]) == data  # asked first, never answers, others fill in
    assert (ignorer, False) in client.retrievals and (ignorer, True) not in client.retrievals
    verdicts = client.audit(m, bytes(32), challenges=4)
    assert verdicts[ignorer].passed  # it keeps the data; it just will not serve it
    events = EpochEvents(audits=[(v.miner, v.passed) for v in verdicts.values()], retrievals=client.retrievals)
    result = settle_epoch(RewardPolicy(pool=1_000_000), events, {})
    served = [m_ for m_, ok in client.retrievals if ok]
    assert result.reputation[ignorer].failed == sum(1 for m_, ok in client.retrievals if m_ == ignorer and not ok)
    assert all(result.payouts[ignorer] < result.payouts[s] for s in served)


def test_update_of_one_segment_transfers_only_that_segment(fleet, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    honest = fleet["honest"]
    data = bytearray(os.urandom(4 * PARAMS.segment_size))
    path = tmp_path / "d.manifest.json"
    m = client.put(bytes(data), ids(honest), SEED, path, params=PARAMS)
    key = load_dataset_key(key_path(path), m.dataset_id)
    data[2 * PARAMS.segment_size + 5] ^= 0x01  # one byte in segment 2
    result = client.update(m, key, bytes(data), ids(honest), SEED, path)
    assert result.segments == (2,)
    one_segment = sum(sh.length for sh in result.manifest.segments[2].shares)
    assert result.bytes_sent == one_segment == PARAMS.n * 4096
    assert load_manifest(path) == result.manifest and result.manifest.reclaimable == ()
    assert [s.version for s in result.manifest.segments] == [1, 1, 2, 1]
    assert client.get(result.manifest, key) == bytes(data)
    files = [p.name for h in honest for p in h.share_files() if p.parent.name == m.dataset_id]
    assert sorted(f for f in files if f.startswith("2.")) == sorted(f"2.2.{i}" for i in range(8))  # v1 reclaimed


def test_cli_put_get_update_status_audit(fleet, broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "archive.bin"
    data = bytearray(os.urandom(1 << 20 | 123))  # default parameters: 2 segments of 1 MiB − 16 B
    src.write_bytes(bytes(data))
    net = ["--broker", broker.config.address, "--timeout", str(TIMEOUT_S)]
    miners = ["--miners", ",".join(ids(fleet["honest"])), "--seed", SEED.hex()]
    runner = CliRunner()
    r = runner.invoke(app, ["store", "put", str(src), *miners, *net])
    assert r.exit_code == 0, r.output
    manifest = tmp_path / "archive.bin.manifest.json"
    r = runner.invoke(app, ["store", "get", str(manifest), "-o", str(tmp_path / "out.bin"), *net])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out.bin").read_bytes() == data
    data[-1] ^= 0xFF
    src.write_bytes(bytes(data))
    r = runner.invoke(app, ["store", "update", str(manifest), str(src), *miners, *net])
    assert r.exit_code == 0 and "segments [1] rewritten" in r.output, r.output
    r = runner.invoke(app, ["store", "status", str(manifest), "--json", *net])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output.strip().splitlines()[-1])
    assert [(s["version"], len(s["live"])) for s in status["segments"]] == [(1, 8), (2, 8)]
    r = runner.invoke(app, ["store", "audit", str(manifest), "--json", "--seed", SEED.hex(), *net])
    assert r.exit_code == 0, r.output
    assert all(v["passed"] for v in json.loads(r.output.strip().splitlines()[-1]).values())
