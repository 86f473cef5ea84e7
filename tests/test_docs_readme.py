"""The README's set-up steps and its two `carechain.yaml` files work as written, against a real broker.

The blocks after `<!-- snippet: setup -->`, `<!-- snippet: bridge.yaml -->` and `<!-- snippet: agent.yaml -->`
are extracted from README.md itself, so the page cannot drift from what is tested. The set-up runs in bash
in an empty folder (keys, registration, broker logins and ACL, a CA and a certificate with `--ip`); a
private mosquitto runs the shipped TLS template with those files; then `carechain bridge` and
`carechain agent` run on the two configs — with only the placeholders a reader fills in (the broker's
address and port, the bridge's log key, the device id) replaced — until an event is anchored and its
proof verifies with the README's `proof` and `verify` commands.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from carechain.config import load_config
from carechain.identity import Identity
from carechain.reencryption import PreKey
from simulators.mosquitto import Mosquitto, mosquitto_binary
from simulators.ports import free_port
from tests.locked_broker import render_template

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent
PLACEHOLDERS = ("broker.example.org", "8883", "LOG_PUBLIC_KEY_HEX", "DEVICE_ID", "OWNER_PARTY_ID", "OWNER_PRE_KEY_HEX")


def snippet(name: str, lang: str) -> str:
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```{lang}\n(.*?)^```", README.read_text(),
                      re.DOTALL | re.MULTILINE)
    assert found, f"README.md has no {lang} snippet {name}"
    return found.group(1)


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder in PLACEHOLDERS:
        if placeholder in values:
            text = text.replace(placeholder, values[placeholder])
    return text


def env() -> dict[str, str]:
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in [v for v in environment if v.startswith("CARECHAIN_")]:
        del environment[var]  # the configs alone decide
    return environment


def carechain(folder: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "carechain"), *args], cwd=folder, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def test_both_readme_configs_are_complete_and_valid(tmp_path: Path) -> None:
    for name, section in (("bridge.yaml", "bridge"), ("agent.yaml", "agent")):
        text = snippet(name, "yaml")
        raw = yaml.safe_load(text)
        assert set(raw) == {"broker", section}, f"{name} shows the broker section and the {section} section"
        path = tmp_path / name
        path.write_text(fill(text, {"LOG_PUBLIC_KEY_HEX": "ab" * 32, "OWNER_PARTY_ID": "a" * 16,
                                    "OWNER_PRE_KEY_HEX": "02" + "ab" * 32}))
        cfg = load_config(path, env={})
        assert cfg.broker.tls_ca is not None, f"{name}: the README's broker is reached over TLS"
    agent = load_config(tmp_path / "agent.yaml", env={}).agent
    assert agent.bridge_public_key == "ab" * 32
    assert all(d.mqtt_credentials_file is not None for d in agent.devices), "every device has its own login"


class Party:
    """A `carechain` process whose output is collected in a file (so a full pipe never blocks it)."""

    def __init__(self, folder: Path, name: str, *args: str) -> None:
        self.log = folder / f"{name}.out"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([str(BIN / "carechain"), *args], cwd=folder, env=env(),
                                            stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.output()):
                return found
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture
def parties() -> Iterator[list[Party]]:
    started: list[Party] = []
    yield started
    for party in reversed(started):
        party.stop()


@pytest.mark.integration
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_the_readme_setup_and_configs_anchor_an_event_over_tls(tmp_path: Path, parties: list[Party]) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet("setup", "bash")], cwd=folder, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    tls_port = free_port()
    conf = render_template(folder / "broker-files", tls_port)
    device = Identity.load(folder / "keys" / "hr-band.key").device_id
    owner = Identity.load(folder / "keys" / "alice.key").device_id
    assert f"owner: {owner}" in (folder / "inventory.yaml").read_text()  # bound to her key, not a label
    values = {"broker.example.org": "127.0.0.1", "8883": str(tls_port), "DEVICE_ID": device, "OWNER_PARTY_ID": owner,
              "OWNER_PRE_KEY_HEX": PreKey.load(folder / "keys" / "alice.pre").public_key.hex()}
    with Mosquitto(tmp_path / "mosquitto", conf=conf, wait_ports=(tls_port,)):
        (folder / "bridge.yaml").write_text(fill(snippet("bridge.yaml", "yaml"), values))
        bridge = Party(folder, "bridge", "bridge", "--config", "bridge.yaml")
        parties.append(bridge)
        bridge.wait_for(r"bridge ready")
        values["LOG_PUBLIC_KEY_HEX"] = log_key = bridge.wait_for(r"log public key ([0-9a-f]{64})").group(1)

        (folder / "agent.yaml").write_text(fill(snippet("agent.yaml", "yaml"), values))
        agent = Party(folder, "agent", "agent", "--config", "agent.yaml")
        parties.append(agent)

        # The README's proof command answers once the first event is anchored under a checkpoint.
        deadline = time.monotonic() + 60
        while (proof := carechain(folder, "proof", device, "0", "--data-dir", "carechain-data/bridge",
                                  "--json")).returncode != 0:
            assert time.monotonic() < deadline, f"no event anchored:\n{agent.output()}\n{bridge.output()}"
            assert agent.process.poll() is None, f"the agent exited:\n{agent.output()}"
            time.sleep(0.5)
        assert agent.stop() == 0, agent.output()
        assert bridge.stop() == 0, bridge.output()

    stats = json.loads(bridge.output().strip().splitlines()[-1])
    assert stats["anchored"] >= 1 and stats["rejected"] == 0, stats
    assert "never connected" not in bridge.output()  # it did connect, then disconnected at its stop
    (folder / "proof.json").write_text(proof.stdout)
    verified = carechain(folder, "verify", "proof.json", "--log-key", log_key)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert device in verified.stdout
