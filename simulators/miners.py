"""`carechain miner` processes and a cosignature watcher, for the tests and bench/finality.py.

A `MinerFleet` creates each miner's key up front (so the bridge's finality policy can list them before
they start), runs `carechain miner` per miner, and reads the ready line each prints.
`MinerProcess(..., garbage_cfrags=True)` runs the same command through this module's entry point, which
makes the miner sign and send random bytes as its capsule fragments (`garbage_reencrypt`): the misbehaving
miner the access tests must detect and attribute.
`CosignatureWatch` follows the cosignature topics and the final-checkpoint topic on the broker, recording
when each was seen (monotonic clock) for the benchmark; it counts only cosignature messages signed by the
miner whose topic they are on.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from carechain import topics
from carechain.checkpoint import NoteError, parse_note
from carechain.config import BrokerConfig, MinerKey
from carechain.identity import Identity
from carechain.miner_messages import CosignatureMessage, from_miner
from carechain.transport import connect_client

REPO = Path(__file__).resolve().parent.parent
# `carechain` as a command: imports carechain.cli as a module (not as __main__, as `python -m` would).
CARECHAIN = [sys.executable, "-c", "import sys; sys.argv[0] = 'carechain'; from carechain.cli import app; app()"]


class MinerProcess:
    """One `carechain miner` process with its own data dir and a key created before it starts."""

    def __init__(self, data_dir: Path, broker: BrokerConfig, log_public_key: bytes, *extra: str,
                 garbage_cfrags: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.key = Identity.generate()
        self.key.save(self.data_dir / "miner.key")
        self.name = f"carechain.miner/{self.key.device_id}"
        command = [sys.executable, "-m", "simulators.miners", GARBAGE_FLAG] if garbage_cfrags else CARECHAIN
        self.args = [*command, "miner", "--data-dir", str(self.data_dir),
                     "--broker", broker.address, "--log-public-key", log_public_key.hex(), *extra]
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr_path = self.data_dir / "stderr.log"

    @property
    def registered(self) -> MinerKey:
        """This miner as the bridge's `bridge.miners` lists it."""
        return MinerKey(name=self.name, public_key=self.key.public_key.hex())

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=self._read_lines, args=(stdout,), daemon=True).start()

    def _read_lines(self, stdout: Iterable[str]) -> None:
        for line in stdout:
            self._lines.put(line)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, object]:
        """The ready line (`{"miner", "name", "public_key", "ready"}`); raises if the miner did not start."""
        try:
            ready: dict[str, object] = json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise RuntimeError(f"miner {self.key.device_id} not ready; stderr: {self.stderr()[-2000:]}") from None
        return ready

    def stop(self, timeout: float = 15.0) -> dict[str, object] | None:
        """SIGTERM, then the final stats line the miner prints (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        try:
            stats: dict[str, object] = json.loads(self._lines.get(timeout=5))
            return stats
        except (queue.Empty, ValueError):
            return None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


@dataclass
class CosignatureWatch:
    """Records when each checkpoint, each miner's cosignature of it and each final checkpoint was seen."""

    broker: BrokerConfig
    client_id: str
    checkpoints: dict[int, float] = field(default_factory=dict)  # tree size -> first seen at
    cosigned: dict[int, dict[str, float]] = field(default_factory=dict)  # tree size -> miner name -> seen at
    finals: list[tuple[float, int, str]] = field(default_factory=list)  # (seen at, tree size, note)
    connected: threading.Event = field(default_factory=threading.Event)
    origin: str | None = None  # only this log's notes (a shared broker may carry another log's retained ones)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.client: mqtt.Client = connect_client(
            self.broker, self.client_id, on_message=self._on_message, connected=self.connected,
            subscriptions=[(topics.CHECKPOINT, 1), (topics.MINER_COSIG_WILDCARD, 1), (topics.FINAL_CHECKPOINT, 1)])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if not msg.payload:
            return
        with self._lock:
            if msg.topic in (topics.CHECKPOINT, topics.FINAL_CHECKPOINT):
                note = msg.payload.decode()
                try:
                    lines = parse_note(note)[0].split("\n")
                    size = int(lines[1])
                except (NoteError, IndexError, ValueError):
                    return
                if self.origin is not None and lines[0] != self.origin:
                    return
                if msg.topic == topics.CHECKPOINT:
                    self.checkpoints.setdefault(size, now)
                else:
                    self.finals.append((now, size, note))
                return
            try:
                m = CosignatureMessage.model_validate_json(msg.payload)
            except ValueError:
                return
            parsed = topics.miner_of_topic(msg.topic)
            if parsed is None or not from_miner(m, parsed[0]):
                return
            self.cosigned.setdefault(m.tree_size, {}).setdefault(m.miner, now)

    def miners_at(self, tree_size: int) -> set[str]:
        """Names of the miners that cosigned the checkpoint of `tree_size`."""
        with self._lock:
            return set(self.cosigned.get(tree_size, {}))

    def final_sizes(self) -> list[int]:
        with self._lock:
            return [size for _, size, _ in self.finals]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def clear_retained(broker: BrokerConfig, client_id: str, topic_names: list[str]) -> None:
    """Empty retained messages so that a shared test broker does not carry them into the next test."""
    ready = threading.Event()
    client = connect_client(broker, client_id, connected=ready)
    try:
        if ready.wait(10):
            for t in topic_names:
                client.publish(t, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


# -- a misbehaving re-encryption miner (issue 13: a bad capsule fragment is detected and attributed) -------


def garbage_reencrypt(capsule: bytes, kfrag: object) -> bytes:
    """Random bytes of a capsule fragment's size instead of the re-encryption: signed and sent like an honest
    miner's, so the requester's `verify_cfrag` must catch it and the fault names this miner."""
    return os.urandom(GARBAGE_CFRAG_BYTES)


GARBAGE_CFRAG_BYTES = 381  # what umbral-pre 0.11 serializes a capsule fragment to


GARBAGE_FLAG = "--garbage-cfrags"


def _garbage_cli() -> None:
    """`python -m simulators.miners --garbage-cfrags miner ARGS…`: `carechain miner ARGS…` whose re-encryption
    returns garbage. The miner is assembled as `carechain miner` does; only its capsule fragments change."""
    import chain_miner.assembly as assembly
    from carechain.cli import app

    real = assembly.assemble_miner

    def garbage_miner(*args: Any, **kwargs: Any) -> assembly.AssembledMiner:
        assembled = real(*args, **kwargs)
        if assembled.miner.access is not None:
            assembled.miner.access.core.reencrypt = garbage_reencrypt
        return assembled

    assembly.assemble_miner = garbage_miner  # the CLI imports it when the command runs
    sys.argv = ["carechain", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    if sys.argv[1:2] != [GARBAGE_FLAG]:
        raise SystemExit(f"usage: python -m simulators.miners {GARBAGE_FLAG} miner [carechain miner options]")
    _garbage_cli()
