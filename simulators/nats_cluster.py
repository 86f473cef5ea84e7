"""Start a private 3-node NATS cluster (JetStream, MQTT listener on every node) on free loopback ports.

Each node's config is rendered from the template kept in the repo (chain_bridge/broker/nats/node.conf) into the
cluster's own directory, with its own JetStream store. `kill(i)` sends SIGKILL to one node (a crash: nothing is
flushed, its routes and clients just vanish); `restart(i)` starts it again on the same ports and store.
Used by the tests and the benchmarks so that neither depends on a machine's shared broker. The logins are
`users`, or the nats-authorization.conf of `carechain bridge acl` (`authorization_file`), which every node's
config includes as it is, and `reload()` re-reads after a re-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carechain.config import BrokerConfig
from chain_bridge.broker.nats import NatsUser, NodePorts, render_node
from simulators.mosquitto import wait_listening
from simulators.ports import free_ports

NODES = 3
START_TIMEOUT_S = 30.0


def nats_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    return "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None


@dataclass
class NatsNode:
    name: str
    ports: NodePorts
    conf: Path
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class NatsCluster:
    """`nodes` nats-server processes in `workdir`; logins from `users` or `authorization_file`; neither: no
    authorization (any client connects)."""

    workdir: Path
    users: tuple[NatsUser, ...] = ()
    authorization_file: Path | None = None
    host: str = "127.0.0.1"
    size: int = NODES
    nodes: list[NatsNode] = field(default_factory=list)

    def start(self) -> NatsCluster:
        binary = nats_binary()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (apt-get install nats-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = sorted(free_ports(4 * self.size, self.host))
        all_ports = [NodePorts(*ports[4 * i:4 * i + 4]) for i in range(self.size)]
        for i, p in enumerate(all_ports):
            name = f"n{i + 1}"
            conf = self.workdir / f"{name}.conf"
            include = "" if self.authorization_file is None else os.path.relpath(self.authorization_file,
                                                                                  conf.parent)
            conf.write_text(render_node(name, p, all_ports, self.workdir / name / "jetstream", host=self.host,
                                        users=self.users, authorization_include=include))
            conf.chmod(0o600)  # it holds the logins' passwords
            self.nodes.append(NatsNode(name, p, conf, self.workdir / f"{name}.log"))
        try:
            for i in range(self.size):
                self._spawn(i, binary)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int, binary: str | None = None) -> None:
        node = self.nodes[i]
        log = open(node.log, "ab")  # noqa: SIM115 - lives as long as the process
        node.process = subprocess.Popen([binary or nats_binary() or "nats-server", "-c", str(node.conf)],
                                        stdout=log, stderr=log)
        log.close()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S, *, nodes: Iterable[int] | None = None,
                     check: Callable[[NatsNode], bool] | None = None) -> None:
        """Until every running node (of `nodes`) listens on MQTT and passes `check` (default: /healthz, which
        on a fresh cluster means a meta leader is elected and every stream is current): before that, MQTT
        clients wait (their sessions live in JetStream)."""
        deadline = time.monotonic() + timeout
        check = check or self._healthy
        for i in range(self.size) if nodes is None else nodes:
            node = self.nodes[i]
            if not node.running:
                continue
            wait_listening(self.host, node.ports.mqtt, max(0.1, deadline - time.monotonic()))
            while True:
                if check(node):
                    break
                if not node.running or time.monotonic() > deadline:
                    raise RuntimeError(f"NATS node {node.name} not healthy within {timeout} s; its log: "
                                       f"{self.log_text(node)[-2000:]}")
                time.sleep(0.1)

    def _healthy(self, node: NatsNode) -> bool:
        url = f"http://{self.host}:{node.ports.http}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(json.loads(resp.read()).get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _rejoined(self, node: NatsNode) -> bool:
        """The node follows the cluster's JetStream meta leader again. (Its /healthz may stay failing for long
        after a kill: a stale MQTT session consumer it still lists is "not current" until the leader prunes it.)"""
        try:
            meta = self._jsz(node).get("meta_cluster")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return isinstance(meta, dict) and bool(meta.get("leader"))

    def jsz(self, i: int) -> dict[str, Any]:
        """Node `i`'s JetStream report (/jsz with streams, consumers and their config)."""
        return self._jsz(self.nodes[i])

    def _jsz(self, node: NatsNode) -> dict[str, Any]:
        url = f"http://{self.host}:{node.ports.http}/jsz?streams=1&consumers=1&config=1"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def log_text(self, node: NatsNode) -> str:
        return node.log.read_text(errors="replace") if node.log.exists() else ""

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def servers(self) -> list[str]:
        """Core NATS URLs of every node (the bridge's `bridge.nats.servers`)."""
        return [f"nats://{self.host}:{n.ports.client}" for n in self.nodes]

    def mqtt(self, i: int, username: str | None = None, password: str | None = None) -> BrokerConfig:
        """MQTT settings for node `i`'s listener."""
        return BrokerConfig(host=self.host, port=self.nodes[i].ports.mqtt, username=username, password=password,
                            keepalive_s=5)

    # -- faults ----------------------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """SIGKILL node `i`: a crash, nothing flushed or handed over."""
        node = self.nodes[i]
        assert node.process is not None and node.running, f"node {node.name} is not running"
        node.process.kill()
        node.process.wait(10)

    def restart(self, i: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start node `i` again on its ports and JetStream store; wait until it has rejoined the cluster."""
        assert not self.nodes[i].running, f"node {self.nodes[i].name} is running"
        self._spawn(i)
        self.wait_healthy(timeout, nodes=[i], check=self._rejoined)

    def reload(self) -> None:
        """SIGHUP every running node (what `nats-server --signal reload` sends): it re-reads its config and the
        files it includes, e.g. a regenerated nats-authorization.conf; logins no longer listed are disconnected."""
        for node in self.nodes:
            if node.process is not None and node.running:
                node.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(5)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
