"""An edge agent assembled from config: data-dir lock, device keys and logins, outbox, sources, `Agent`.

Used by `carechain agent`, the demo and the simulators. Failures are `ConfigError` (a setting or file the
user must fix, named in the message), `DataDirLocked` (another agent runs on this data directory) or
`StoreError` (the outbox file is damaged).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from carechain.config import AgentDeviceConfig, Config, ConfigError, check_agent_logins
from carechain.credentials import CredentialsError, MqttCredentials, load_mqtt_credentials, resolve_broker_login
from carechain.datadir import DataDirLock, lock_data_dir
from carechain.events import SEALED_KINDS
from carechain.files import make_private
from carechain.identity import Identity, KeyFileError
from carechain.profiles import DeviceProfile, load_profiles
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox, Quota, QuotaPolicy
from edge_agent.sealing import RecordOwner
from edge_agent.sources.simulated import SimulatedDevice

if TYPE_CHECKING:
    from edge_agent.sources.ble import BleSource

OUTBOX_FILE = "outbox.db"


@dataclass
class AssembledAgent:
    """An agent ready to `run`, holding its data directory until `close()` (or process exit)."""

    agent: Agent
    data_dir: Path
    lock: DataDirLock
    profiles: dict[str, DeviceProfile]
    ble: list[tuple[str, AgentDeviceConfig]] = field(default_factory=list)  # (device_id, entry) read over BLE
    ble_adapter: str | None = None  # BlueZ adapter (hci0, hci1…); None: the system's default

    @property
    def outbox(self) -> Outbox:
        return self.agent.outbox

    def ble_sources(self) -> list[BleSource]:
        """One bleak source per `source: ble` device, feeding the agent (imports bleak only when needed)."""
        if not self.ble:
            return []
        from edge_agent.paired_devices import PairedDevices
        from edge_agent.sources.ble import BleSource

        registry = PairedDevices.in_dir(self.data_dir)
        sources = []
        for dev_id, d in self.ble:
            source = BleSource(self.profiles[d.profile], partial(self.agent.record, dev_id), address=d.address,
                               registry=registry, pair=d.pair, adapter=self.ble_adapter)
            self.agent.devices[dev_id].battery = partial(_battery_level, source)  # reported in its status
            sources.append(source)
        return sources

    async def run(self, stop: asyncio.Event, produce_seconds: float | None = None,
                  on_stop_producing: Callable[[], None] | None = None) -> None:
        """Sample, sign and forward until `stop`; after `produce_seconds` only forward what is left."""
        ble_stop = asyncio.Event()  # BLE sources stop sampling with the others, or at shutdown

        def stop_producing() -> None:
            self.agent.stop_producing()
            ble_stop.set()
            if on_stop_producing is not None:
                on_stop_producing()

        if produce_seconds == 0:
            stop_producing()  # forward the backlog only: not one reading sampled
        elif produce_seconds is not None:
            asyncio.get_running_loop().call_later(produce_seconds, stop_producing)
        sources = self.ble_sources()
        if not sources:
            await self.agent.run(stop)
            return
        from edge_agent.sources.ble import run_sources

        async def until_stopped() -> None:
            await stop.wait()
            ble_stop.set()

        await asyncio.gather(self.agent.run(stop), run_sources(sources, ble_stop), until_stopped())

    def close(self) -> None:
        """After `run` returned: close the outbox and release the data directory."""
        self.agent.outbox.close()
        self.lock.release()


def _battery_level(source: BleSource) -> int | None:
    """The Battery Service level the source read on its last connection (or was notified of since)."""
    return source.status.battery_pct if source.status is not None else None


def record_owner(entry: AgentDeviceConfig, profile: DeviceProfile, protocol: int) -> RecordOwner | None:
    """The owner a protocol 2 device seals its health readings to; a `ConfigError` naming the device entry
    when its profile produces health readings and the owner is not configured."""
    if protocol != 2:
        return None
    if entry.owner is None or entry.owner_pre_key is None:
        sealed = sorted(set(profile.events) & SEALED_KINDS)
        if sealed:
            raise ConfigError(f"{entry.key_file}: profile {profile.name!r} produces health readings "
                              f"({', '.join(sealed)}), which protocol 2 seals to their owner: set the device's "
                              "owner (the patient's party id) and owner_pre_key (her re-encryption public key, "
                              "`carechain keys new --pre`), or agent.protocol: 1 for a bridge before protocol 2")
        return None
    return RecordOwner(entry.owner, bytes.fromhex(entry.owner_pre_key))


def _device(entry: AgentDeviceConfig, profiles: dict[str, DeviceProfile]) -> tuple[Identity, MqttCredentials | None]:
    if entry.profile not in profiles:
        raise ConfigError(f"unknown profile {entry.profile!r}; known: {', '.join(sorted(profiles))}")
    try:
        ident = Identity.load(entry.key_file)
        login = load_mqtt_credentials(entry.mqtt_credentials_file) if entry.mqtt_credentials_file else None
    except (KeyFileError, CredentialsError) as exc:
        raise ConfigError(str(exc)) from None
    if login is not None and login.device_id != ident.device_id:
        raise ConfigError(f"{entry.mqtt_credentials_file} is the MQTT login of device {login.device_id}, "
                          f"but {entry.key_file} is device {ident.device_id}")
    if entry.source == "ble" and profiles[entry.profile].gatt is None:
        raise ConfigError(f"{entry.key_file}: profile {entry.profile!r} is not a BLE device (no gatt section)")
    return ident, login


def assemble_agent(cfg: Config, *, devices: Sequence[AgentDevice] | None = None,
                   client_id: str | None = None) -> AssembledAgent:
    """Lock `cfg.agent.data_dir` and build the agent for `cfg.agent.devices` (or for `devices`, given ready).

    From config, a `source: ble` device is read through bleak; the others are simulated from their profile.
    A config in which a device would log in with the broker section's login (the bridge's) is refused
    (`check_agent_logins`); `broker.credentials_file`, if set, is resolved (`resolve_broker_login`). Under
    protocol 2 (`agent.protocol`) a device whose profile produces health readings needs its owner
    (`record_owner`); `devices` given ready carry theirs.
    """
    ac = cfg.agent
    if devices is None and not ac.devices:
        raise ConfigError("no devices: list them under agent.devices (key_file, profile) in the config file")
    bridge_key = ac.bridge_key()
    if devices is None:
        check_agent_logins(cfg)
    try:
        broker = resolve_broker_login(cfg.broker)
    except CredentialsError as exc:
        raise ConfigError(str(exc)) from None
    profiles = load_profiles()
    ble: list[tuple[str, AgentDeviceConfig]] = []
    logins: dict[str, MqttCredentials] = {}
    if devices is None:
        built = []
        for entry in ac.devices:
            ident, login = _device(entry, profiles)
            if login is not None:
                logins[ident.device_id] = login
            profile = profiles[entry.profile]
            owner = record_owner(entry, profile, ac.protocol)
            if entry.source == "ble":
                ble.append((ident.device_id, entry))
                built.append(AgentDevice(ident, None, owner, entry.wellness_policy))
            else:
                built.append(AgentDevice(ident, SimulatedDevice(profile, random.Random()), owner,
                                         entry.wellness_policy))
        devices = built
    lock = lock_data_dir(ac.data_dir, "agent")
    try:
        quota = Quota(int(ac.outbox_quota_mb * (1 << 20)), QuotaPolicy(ac.on_quota))
        outbox = Outbox(ac.data_dir / OUTBOX_FILE, quota)
        make_private(outbox.path)  # 0600 with its WAL and SHM: health data (the dir is 0700 already)
        try:
            agent = Agent(devices, outbox, broker, bridge_key, window=ac.window,
                          resend_after_s=ac.resend_after_s, speedup=ac.speedup, client_id=client_id,
                          credentials=logins, protocol=ac.protocol, epoch_ms=ac.epoch_ms,
                          batch_max_events=ac.batch_max_events, batch_max_bytes=ac.batch_max_bytes,
                          batch_linger_ms=ac.batch_linger_ms, status_interval_s=ac.status_interval_s)
        except ValueError as exc:  # e.g. a device without its own MQTT login on a broker that needs one
            outbox.close()
            raise ConfigError(str(exc)) from None
        except BaseException:
            outbox.close()
            raise
    except BaseException:
        lock.release()
        raise
    return AssembledAgent(agent, ac.data_dir, lock, profiles, ble, ble_adapter=ac.ble_adapter)
