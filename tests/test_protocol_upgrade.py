"""Upgrades without a flag day, with real processes: a protocol 1 agent and a protocol 2 agent run side by side
against one bridge; after the operator's `carechain cutover`, the bridge refuses the v1 agent's plain-text readings
with `version_retired` and keeps anchoring the sealed ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from carechain import envelope
from carechain.cli import app
from carechain.entries import ENTRY_EVENT, Entry
from carechain.identity import Identity
from carechain.reencryption import PreKey
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, log_key

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
CARECHAIN = [sys.executable, "-m", "carechain.cli"]


def cli(*args: str | Path) -> dict[str, object]:
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def events_by_device(bdir: Path) -> dict[str, list[tuple[int, int]]]:
    """device id → [(leaf index, payload version)] of its anchored events."""
    ledger = Ledger(ledger_path(bdir))
    try:
        found: dict[str, list[tuple[int, int]]] = {}
        for index, leaf in enumerate(ledger.leaves()):
            entry = Entry.decode(leaf)
            if entry.type == ENTRY_EVENT:
                payload = envelope.parse(entry.cose).payload
                found.setdefault(payload["dev"], []).append((index, payload["v"]))
        return found
    finally:
        ledger.close()


class Process:
    def __init__(self, tmp: Path, name: str, *args: str | Path) -> None:
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("CARECHAIN_CONFIG", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*CARECHAIN, *map(str, args)], cwd=tmp, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in reversed(started):
        p.stop()


def test_v1_and_v2_agents_side_by_side_then_the_cutover_retires_v1(tmp_path: Path, broker: Any,
                                                                    processes: list[Process]) -> None:
    bdir = tmp_path / "bridge"
    alice, alice_pre = Identity.generate(), PreKey.generate()
    alice.save(tmp_path / "alice.key")
    alice_pre.save(tmp_path / "alice.pre")
    old_band, new_band = Identity.generate(), Identity.generate()
    old_band.save(tmp_path / "old.key")
    new_band.save(tmp_path / "new.key")
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump({"broker": {"host": broker.host, "port": broker.port},
                                                          "bridge": {"data_dir": str(bdir)}}))
    cli("party", "register", "patient", tmp_path / "alice.key", "--name", "Alice", "--pre-key",
        tmp_path / "alice.pre", "--data-dir", bdir)
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"site": "ward", "devices": [
        {"name": name, "profile": "heart_rate_band", "owner": alice.device_id, "key_file": str(tmp_path / key)}
        for name, key in (("old", "old.key"), ("new", "new.key"))]}))
    cli("register", tmp_path / "inventory.yaml", "--data-dir", bdir)

    processes.append(bridge := Process(tmp_path, "bridge", "bridge", "--config", tmp_path / "bridge.yaml"))
    wait_until(lambda: "bridge ready" in bridge.output(), "the bridge")
    for name, key, protocol in (("old", "old.key", 1), ("new", "new.key", 2)):
        device: dict[str, object] = {"key_file": str(tmp_path / key), "profile": "heart_rate_band"}
        if protocol == 2:
            device |= {"owner": alice.device_id, "owner_pre_key": alice_pre.public_key.hex()}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "broker": {"host": broker.host, "port": broker.port},
            "agent": {"data_dir": str(tmp_path / name), "bridge_public_key": log_key(bdir).public_key.hex(),
                      "protocol": protocol, "speedup": 20.0, "devices": [device]}}))
        processes.append(Process(tmp_path, f"agent-{name}", "agent", "--config", tmp_path / f"{name}.yaml"))
    agent_old = processes[1]

    def both_anchor() -> bool:
        found = events_by_device(bdir)
        return len(found.get(old_band.device_id, [])) >= 3 and len(found.get(new_band.device_id, [])) >= 3
    wait_until(both_anchor, "both agents' readings anchored side by side")
    before = events_by_device(bdir)
    assert {v for _, v in before[old_band.device_id]} == {1}
    assert {v for _, v in before[new_band.device_id]} == {2}  # sealed (epoch_key, then readings)

    ledger = Ledger(ledger_path(bdir))
    size = ledger.size
    ledger.close()
    retire = int(cli("cutover", "--at-size", str(size + 20), "--data-dir", bdir)["retire_v1_after"])
    assert CliRunner().invoke(app, ["cutover", "--data-dir", str(bdir)]).exit_code == 1  # once per ledger

    def new_goes_on_past_the_cutover() -> bool:
        return any(i >= retire + 10 for i, _ in events_by_device(bdir).get(new_band.device_id, []))
    wait_until(new_goes_on_past_the_cutover, "sealed readings anchored past the cutover")
    wait_until(lambda: "version_retired" in agent_old.output(), "the v1 agent told why its readings are refused")
    after = events_by_device(bdir)
    assert all(i < retire for i, _ in after[old_band.device_id]), "a v1 reading was anchored after the cutover"
    for p in processes:
        p.stop()
    stats = json.loads(bridge.output().strip().splitlines()[-1])
    assert stats["rejected_by_reason"].get("version_retired", 0) >= 1, stats
