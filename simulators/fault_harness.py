"""Fault-injection harness: real mosquitto, `carechain bridge` and `carechain agent` processes, a TCP proxy.

Each scenario runs a small fleet (agents with simulated devices → mosquitto → bridge), injects one fault
while events are produced, lets every agent stop producing, and waits until every outbox has drained.
Then it reads the ledger itself — every leaf decoded, no trust in the bridge's counters — and the agents'
outboxes, and reports: events signed, lost (signed but not in the log), duplicated (in the log more than
once) and seconds from the end of the fault to a fully drained fleet.

Used by tests/test_faults.py (assertions) and bench/fault_table.py (the table in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from carechain import envelope, topics
from carechain.batch import events_in
from carechain.entries import ENTRY_EVENT, Entry
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from carechain.reencryption import PreKey
from chain_bridge.contract_admin import submit
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key, register_devices
from contract_rules import transactions as ce
from simulators.mosquitto import REPO, Mosquitto
from simulators.ports import free_port

PROFILES = ("heart_rate_band", "pulse_oximeter", "thermometer")


# -- a TCP proxy that can cut the network --------------------------------------------------------------

class TcpProxy:
    """Loopback TCP forwarder. `cut()` stops moving bytes in both directions without closing anything —
    what a pulled cable or a dead NAT entry looks like to both ends — until `restore()`."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port, self.port = host, target_port, free_port(host)
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)  # type: ignore[union-attr]

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)  # type: ignore[union-attr]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer), return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                await self._flowing.wait()  # bytes read just before a cut wait for the restore
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


# -- processes -------------------------------------------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "carechain.cli", *args]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(extra or {})}


@dataclass
class BridgeProcess:
    data_dir: Path
    config: Path
    workers: int
    log: Path
    proc: subprocess.Popen[str] | None = None
    stats: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # e.g. CARECHAIN_DISK_FULL_WHILE (test-only)

    def start(self, crash_at: str | None = None) -> None:
        extra = {**self.env, **({"CARECHAIN_CRASH_AT": crash_at} if crash_at else {})}
        self.proc = subprocess.Popen(
            _cli("bridge", "--config", str(self.config), "--data-dir", str(self.data_dir),
                 "--workers", str(self.workers)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(extra))
        wait_ready(self.proc, self.log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                self.stats = json.loads(line)
                break


def wait_ready(proc: subprocess.Popen[str], log_file: Path, timeout: float = 60.0) -> None:
    """Block until `carechain bridge` says it is subscribed; its stderr keeps flowing into `log_file`."""
    assert proc.stderr is not None
    sink = log_file.open("a")
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            sink.write(line)
            if line.startswith("bridge ready"):
                break
        else:
            raise RuntimeError(f"bridge exited before it was ready; see {log_file}")
    finally:
        timer.cancel()
    stderr = proc.stderr

    def copy_rest() -> None:
        sink.writelines(stderr)
        sink.close()

    threading.Thread(target=copy_rest, daemon=True).start()


@dataclass
class AgentProcess:
    name: str
    config: Path
    outbox: Path
    log: Path
    device_ids: list[str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed: int = 0
    env: dict[str, str] = field(default_factory=dict)  # e.g. CARECHAIN_DISK_FULL_WHILE (test-only)

    def start(self, produce_s: float) -> None:
        self.starts += 1
        self.proc = subprocess.Popen(
            _cli("agent", "--config", str(self.config), "--produce-seconds", str(produce_s)),
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"), cwd=REPO, env=_env(self.env))

    def producing(self) -> bool:
        """Until this run of the agent says it stopped sampling (its clock starts after its imports)."""
        said = self.log.read_text(errors="replace").count("stopped producing") if self.log.exists() else 0
        return said + self.killed < self.starts

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.killed += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def depth_and_signed(self) -> tuple[int, dict[str, int]]:
        """(events still in the outbox, next seq per device = how many it ever signed)."""
        if not self.outbox.exists():
            return 0, {}
        db = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=30)
        try:
            depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            signed = dict(db.execute("SELECT device_id, next_seq FROM counters").fetchall())
        finally:
            db.close()
        return depth, signed


def ledger_event_counts(path: Path) -> Counter[tuple[str, int]]:
    """(device, seq) → how many leaves of the log hold it, from the leaf bytes themselves."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return event_counts(bytes(data) for (data,) in db.execute("SELECT data FROM entries ORDER BY idx"))
    finally:
        db.close()


def event_counts(leaves: Iterable[bytes]) -> Counter[tuple[str, int]]:
    """(device, seq) → how many of these ledger leaves hold that event."""
    counts: Counter[tuple[str, int]] = Counter()
    for leaf in leaves:
        entry = Entry.decode(leaf)
        if entry.type == ENTRY_EVENT:
            payload = envelope.parse(entry.cose, max_bytes=1 << 20).payload
            counts[(payload["dev"], payload["seq"])] += 1
    return counts


# -- the fleet -------------------------------------------------------------------------------------------

@dataclass
class Result:
    scenario: str
    events: int
    anchored: int
    lost: int
    duplicated: int
    drain_s: float
    drained: bool
    detail: dict = field(default_factory=dict)

    def row(self) -> list[str]:
        return [self.scenario, str(self.events), str(self.lost), str(self.duplicated),
                f"{self.drain_s:.1f}" if self.drained else f"> {self.drain_s:.0f} (NOT drained)"]


def table(results: list[Result]) -> str:
    return table_of_rows([r.row() for r in results])


def table_of_rows(result_rows: list[list[str]]) -> str:
    """The table of `Result.row()`s (what a test worker process hands back to the one that prints it)."""
    head = ["scenario", "events", "lost", "duplicated", "s to drain"]
    rows = [head] + result_rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def patient_devices(ledger: Ledger, bridge_dir: Path, agent_dir: Path, agent: int, count: int, site: str,
                    inventory: list[InventoryDevice]) -> tuple[list[dict], list[str]]:
    """One agent's devices: a patient registered on the ledger and `count` device keys under `agent_dir`/keys.
    Returns the agent config's `devices` entries and the device ids; appends their inventory rows.

    Protocol 2: the devices seal their readings to that patient (her re-encryption key), a registered party: the
    contracts refuse an epoch_key sealed to anyone else."""
    patient, patient_pre = Identity.generate(), PreKey.generate()
    submit(ledger, contract_genesis(bridge_dir), [ce.party_registration_entry(operator_key(bridge_dir),
        ce.PartyRegistration(role="patient", pk=patient.public_key, name=f"patient {agent}",
                             ts=int(time.time() * 1000), pre_pk=patient_pre.public_key,
                             pre_vk=patient_pre.verifying_key))])
    devices, ids = [], []
    for d in range(count):
        profile = PROFILES[d % len(PROFILES)]
        key_file = agent_dir / "keys" / f"{profile}-{d}.key"
        ident = Identity.generate()
        ident.save(key_file)
        devices.append({"key_file": str(key_file), "profile": profile, "owner": patient.device_id,
                        "owner_pre_key": patient_pre.public_key.hex()})
        ids.append(ident.device_id)
        inventory.append(InventoryDevice(name=f"a{agent}d{d}", profile=profile, owner=patient.device_id,
                                         site=site, public_key=ident.public_key, line=0))
    return devices, ids


class Fleet:
    """A broker, a bridge and `agents` agents with `devices_per_agent` simulated devices each."""

    def __init__(self, work: Path, *, agents: int = 2, devices_per_agent: int = 3, speedup: float = 150.0,
                 workers: int = 0, via_proxy: bool = False, resend_after_s: float = 2.0, window: int = 2000) -> None:
        self.work = work
        self.broker = Mosquitto(work / "mosquitto")
        self.proxy: TcpProxy | None = None
        self.via_proxy = via_proxy
        self.n_agents, self.per_agent, self.speedup = agents, devices_per_agent, speedup
        self.workers, self.resend_after_s, self.window = workers, resend_after_s, window
        self.bridge: BridgeProcess | None = None
        self.agents: list[AgentProcess] = []

    def __enter__(self) -> Fleet:
        self.broker.start()
        if self.via_proxy:
            self.proxy = TcpProxy(self.broker.port).__enter__()
        self._provision()
        return self

    def __exit__(self, *exc: object) -> None:
        for a in self.agents:
            a.stop()
        if self.bridge:
            self.bridge.stop()
        if self.proxy:
            self.proxy.__exit__()
        self.broker.stop()

    def _config(self, path: Path, port: int, agent: dict | None = None) -> Path:
        cfg = {"broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 5},
               "bridge": {"checkpoint_interval_s": 1.0}}
        if agent:
            cfg["agent"] = agent
        path.write_text(yaml.safe_dump(cfg))
        return path

    def _provision(self) -> None:
        bdir = self.work / "bridge"
        ledger = Ledger(ledger_path(bdir))
        log_pk = log_key(bdir).public_key.hex()
        inventory: list[InventoryDevice] = []
        agent_port = self.proxy.port if self.proxy else self.broker.port
        for a in range(self.n_agents):
            adir = self.work / f"agent{a}"
            devices, ids = patient_devices(ledger, bdir, adir, a, self.per_agent, "faults", inventory)
            cfg = self._config(adir / "agent.yaml", agent_port, {
                "data_dir": str(adir), "devices": devices, "bridge_public_key": log_pk,
                "resend_after_s": self.resend_after_s, "speedup": self.speedup, "window": self.window})
            self.agents.append(AgentProcess(f"agent{a}", cfg, adir / "outbox.db", adir / "agent.log", ids))
        register_devices(ledger, operator_key(bdir), inventory)
        ledger.close()
        self.bridge = BridgeProcess(bdir, self._config(self.work / "bridge.yaml", self.broker.port),
                                    self.workers, self.work / "bridge.log")

    @property
    def ledger_file(self) -> Path:
        return ledger_path(self.work / "bridge")

    def start(self, produce_s: float, crash_at: str | None = None) -> None:
        assert self.bridge is not None
        self.bridge.start(crash_at)
        for a in self.agents:
            a.start(produce_s)

    def restart_broker(self, down_s: float = 0.0) -> None:
        self.broker.stop()
        time.sleep(down_s)
        self.broker.start()

    def wait_drained(self, scenario: str, fault_ended: float, timeout: float = 120.0,
                     during: Callable[[], None] | None = None) -> Result:
        """Wait until no agent produces, every outbox is empty and every signed event is in the log."""
        deadline = time.monotonic() + timeout
        drained = False
        while time.monotonic() < deadline:
            if during:
                during()
            if not any(a.producing() for a in self.agents):
                depths = [a.depth_and_signed() for a in self.agents]
                if all(d == 0 for d, _ in depths):
                    signed = {dev: n for _, s in depths for dev, n in s.items()}
                    counts = ledger_event_counts(self.ledger_file)
                    if all((dev, seq) in counts for dev, n in signed.items() for seq in range(n)):
                        drained = True
                        break
            time.sleep(0.25)
        drain_s = time.monotonic() - fault_ended
        signed = {dev: n for a in self.agents for dev, n in a.depth_and_signed()[1].items()}
        counts = ledger_event_counts(self.ledger_file)
        events = sum(signed.values())
        anchored = sum(1 for dev, n in signed.items() for seq in range(n) if (dev, seq) in counts)
        return Result(scenario, events, anchored, lost=events - anchored,
                      duplicated=sum(c - 1 for c in counts.values() if c > 1),
                      drain_s=drain_s, drained=drained)

    def finish(self, result: Result) -> Result:
        for a in self.agents:
            a.stop()
        assert self.bridge is not None
        self.bridge.stop()
        result.detail["bridge"] = self.bridge.stats
        return result


# -- scenarios -------------------------------------------------------------------------------------------

PRODUCE_S = 6.0


def agent_kill9(work: Path) -> Result:
    """kill -9 of an agent while it signs and sends; restarted, it goes on from its durable seq."""
    with Fleet(work) as fleet:
        fleet.start(PRODUCE_S)
        time.sleep(PRODUCE_S / 2)
        victim = fleet.agents[0]
        victim.kill9()
        time.sleep(1.0)
        victim.start(PRODUCE_S / 2)
        return fleet.finish(fleet.wait_drained("agent kill -9 mid-batch", time.monotonic()))


def bridge_kill9_after_append(work: Path) -> Result:
    """kill -9 of the bridge after a batch is committed, before its receipts are out."""
    with Fleet(work, workers=2) as fleet:
        fleet.start(PRODUCE_S, crash_at="bridge.after_append:20")
        assert fleet.bridge is not None and fleet.bridge.proc is not None
        fleet.bridge.proc.wait(60)  # dies by SIGKILL at the crash point
        killed_by = -fleet.bridge.proc.returncode
        time.sleep(1.0)
        fleet.bridge.start()
        result = fleet.finish(fleet.wait_drained("bridge kill -9 between append and receipt", time.monotonic()))
        result.detail["killed_by_signal"] = killed_by
        return result


def broker_restart(work: Path) -> Result:
    with Fleet(work) as fleet:
        fleet.start(PRODUCE_S)
        time.sleep(PRODUCE_S / 2)
        fleet.restart_broker()
        return fleet.finish(fleet.wait_drained("broker restart", time.monotonic()))


def broker_down(work: Path, down_s: float = 60.0) -> Result:
    """The broker is down for `down_s` while agents keep producing into their outboxes."""
    with Fleet(work) as fleet:
        fleet.start(down_s + 4.0)
        time.sleep(2.0)
        fleet.broker.stop()
        time.sleep(down_s)
        fleet.broker.start()
        name = f"broker down {down_s:.0f} s"
        return fleet.finish(fleet.wait_drained(name, time.monotonic(), timeout=120 + down_s))


def network_cut(work: Path, cut_s: float = 20.0) -> Result:
    """Agent ↔ broker traffic blackholed for `cut_s` (longer than keepalive, so both ends notice)."""
    with Fleet(work, via_proxy=True) as fleet:
        assert fleet.proxy is not None
        fleet.start(PRODUCE_S + cut_s)
        time.sleep(2.0)
        fleet.proxy.cut()
        time.sleep(cut_s)
        fleet.proxy.restore()
        return fleet.finish(fleet.wait_drained(f"network cut {cut_s:.0f} s (blackhole)", time.monotonic()))


def duplicated_and_reordered(work: Path, copies: int = 2) -> Result:
    """Every event a third party can see on the broker is replayed `copies` more times, shuffled."""
    with Fleet(work) as fleet:
        seen: list[tuple[str, bytes]] = []
        captured: set[bytes] = set()  # MQTT 3.1.1 has no no-local: the tap also hears its own replays

        def capture(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
            payload = bytes(m.payload)
            if payload not in captured:
                captured.add(payload)
                seen.append((m.topic, payload))

        tap = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="replayer")
        tap.on_message = capture
        tap.connect("127.0.0.1", fleet.broker.port)
        tap.subscribe(topics.EVENTS_WILDCARD, qos=1)
        tap.loop_start()
        fleet.start(PRODUCE_S)
        rng = random.Random(7)
        replayed = 0

        def replay() -> None:
            nonlocal replayed
            batch = [seen.pop() for _ in range(len(seen))] * copies
            rng.shuffle(batch)
            for topic, payload in batch:
                tap.publish(topic, payload, qos=1)
            replayed += sum(events_in(payload) for _, payload in batch)  # events: a message may be a batch

        end = time.monotonic() + PRODUCE_S
        while time.monotonic() < end:
            time.sleep(0.5)
            replay()
        result = fleet.wait_drained("duplicated + reordered deliveries", time.monotonic(), during=replay)
        replay()
        time.sleep(2.0)  # let the last replays reach the bridge before it stops and reports
        tap.disconnect()
        tap.loop_stop()
        result.detail["replayed"] = replayed
        return fleet.finish(result)


class MountRefused(RuntimeError):
    """The small test filesystem could not be mounted here (needs root or CAP_SYS_ADMIN); the text says why."""


@contextlib.contextmanager
def small_tmpfs(mount: Path, size_mb: int = 16) -> Iterator[Path]:
    """Mount a `size_mb` tmpfs (mode 0700) at `mount` for the block, to fill with `fill_disk`; raises MountRefused."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700",
                           f"cc-full-{os.getpid()}-{mount.name}", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        raise MountRefused(done.stderr.strip() or f"mount exited with {done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path) -> Path:
    """Fill the filesystem holding `mount` to the last byte with one file; delete that file to free it."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2  # the last few blocks, in ever smaller writes
    finally:
        os.close(fd)
    return filler


def bridge_disk_full(work: Path, full_s: float = 6.0, mount: Path | None = None) -> Result:
    """The bridge's disk is full for `full_s` while agents send, then freed: it must resume by itself.

    With `mount` (a small filesystem already mounted at `work/bridge`) the disk really fills; without, the
    bridge is told to fail its ledger writes as SQLite does on a full disk (`CARECHAIN_DISK_FULL_WHILE`).
    """
    flag = work / "disk-full"
    with Fleet(work) as fleet:
        assert fleet.bridge is not None
        if mount is None:
            fleet.bridge.env["CARECHAIN_DISK_FULL_WHILE"] = str(flag)
        fleet.start(PRODUCE_S + full_s)
        time.sleep(1.5)
        full = fill_disk(mount) if mount is not None else flag
        full.touch()
        time.sleep(full_s)
        assert fleet.bridge.proc is not None
        alive = fleet.bridge.proc.poll() is None
        full.unlink()  # space returns
        how = "tmpfs" if mount is not None else "injected ENOSPC"
        result = fleet.wait_drained(f"bridge disk full {full_s:.0f} s, then freed ({how})", time.monotonic())
        result.detail["alive_while_full"] = alive
        return fleet.finish(result)


def agent_disk_full(work: Path, full_s: float = 6.0, mount: Path | None = None) -> Result:
    """An agent's disk is full for `full_s` while it samples, then freed: what it could not store is counted
    in its `losses` table (`disk_full`), it resumes signing by itself, and nothing it signed is lost.

    With `mount` (a small filesystem already mounted at `work/agent0`) the disk really fills; without, the
    agent's outbox writes fail as SQLite's do on a full disk (`CARECHAIN_DISK_FULL_WHILE`).
    """
    flag = work / "agent-disk-full"
    with Fleet(work, agents=1) as fleet:
        victim = fleet.agents[0]
        victim.log = work / "agent0.log"  # not on the disk that fills: the agent says what happened there
        if mount is None:
            victim.env["CARECHAIN_DISK_FULL_WHILE"] = str(flag)
        fleet.start(PRODUCE_S + full_s)
        time.sleep(1.5)
        full = fill_disk(mount) if mount is not None else flag
        full.touch()
        time.sleep(full_s)
        assert victim.proc is not None
        alive = victim.proc.poll() is None
        full.unlink()  # space returns
        freed = time.monotonic()
        resume_s = None
        while resume_s is None and time.monotonic() < freed + 30:
            if "signing resumed" in victim.log.read_text(errors="replace"):
                resume_s = time.monotonic() - freed
            time.sleep(0.05)
        how = "tmpfs" if mount is not None else "injected SQLITE_FULL"
        result = fleet.finish(fleet.wait_drained(f"agent disk full {full_s:.0f} s, then freed ({how})", freed))
        db = sqlite3.connect(f"file:{victim.outbox}?mode=ro", uri=True, timeout=30)
        try:
            lost = db.execute("SELECT COALESCE(SUM(events), 0) FROM losses WHERE policy='disk_full'").fetchone()[0]
        finally:
            db.close()
        result.detail.update(alive_while_full=alive, resume_s=resume_s, readings_not_stored=lost)
        return result


SCENARIOS: dict[str, Callable[[Path], Result]] = {
    "agent_kill9": agent_kill9,
    "bridge_kill9": bridge_kill9_after_append,
    "broker_restart": broker_restart,
    "broker_down": broker_down,
    "network_cut": network_cut,
    "dup_reorder": duplicated_and_reordered,
    "bridge_disk_full": bridge_disk_full,
    "agent_disk_full": agent_disk_full,
}
