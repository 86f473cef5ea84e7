"""The shipped systemd units: `systemd-analyze verify` accepts them, and each is a hardened `Type=notify` service
with a watchdog (the processes send READY=1 and WATCHDOG=1 themselves: tests/test_sd_notify.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = {
    "carechain-bridge.service": REPO / "chain_bridge" / "systemd" / "carechain-bridge.service",
    "carechain-miner.service": REPO / "chain_miner" / "systemd" / "carechain-miner.service",
    "carechain-agent.service": REPO / "edge_agent" / "systemd" / "carechain-agent.service",
}
# What every unit must set, as the agent's did first: no privileges, a read-only system, its own state only.
HARDENING = {
    "Type": "notify", "NotifyAccess": "main", "User": "carechain", "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/carechain", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service", "UMask": "0077", "StateDirectoryMode": "0700", "Restart": "on-failure",
}


def service_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of the [Service] section (comments skipped; a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_is_a_hardened_notify_service_with_a_watchdog(name: str) -> None:
    settings = service_settings(UNITS[name])
    for key, want in HARDENING.items():
        assert settings.get(key) == [want], f"{name}: {key}={settings.get(key)}, want {want!r}"
    watchdog = settings["WatchdogSec"][0]
    assert re.fullmatch(r"[1-9][0-9]*", watchdog), f"{name}: WatchdogSec={watchdog}"
    # Restarted on failure, so a watchdog kill (SIGABRT) brings the service back.
    assert settings["ExecStart"][0].startswith("/opt/carechain/.venv/bin/carechain ")
    # No secret on a command line or in the environment: logins and passwords come as credentials (files).
    for line in settings["ExecStart"] + settings.get("Environment", []):
        assert not re.search(r"password|secret|token", line, re.IGNORECASE), f"{name}: {line}"


def test_the_bridge_and_the_miner_load_their_broker_login_as_a_credential() -> None:
    for name in ("carechain-bridge.service", "carechain-miner.service"):
        creds = service_settings(UNITS[name]).get("LoadCredential", [])
        assert any(c.startswith("broker.json:/etc/carechain/credentials/") for c in creds), f"{name}: {creds}"


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)")
    true = shutil.which("true")
    assert true is not None
    # verify needs ExecStart's binary to exist: the copies run `true` instead of /opt/carechain's carechain.
    copies = []
    for name, path in UNITS.items():
        text = path.read_text()
        assert text.count("ExecStart=/opt/carechain/.venv/bin/carechain ") == 1
        copy = tmp_path / name
        copy.write_text(text.replace("ExecStart=/opt/carechain/.venv/bin/carechain ", f"ExecStart={true} "))
        copies.append(str(copy))
    done = subprocess.run([analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "carechain-" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
