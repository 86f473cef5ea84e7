"""The one config loader: a YAML (or TOML) file, then `CARECHAIN_*` environment variables, then flags.

Every field has a safe default, so `carechain demo` needs no file at all.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls_ca: Path | None = None  # set: TLS, trusting this CA only; the broker's name is checked (host)
    tls_cert: Path | None = None  # client certificate (PEM), for a broker with require_certificate
    tls_key: Path | None = None  # its private key (PEM, mode 0600)
    credentials_file: Path | None = None  # login from `carechain bridge acl` (bridge.json); sets username/password
    keepalive_s: int = Field(default=30, ge=5, le=3600)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Limits(_Section):
    """Explicit ingest limits; each violation is a named, counted rejection (see docs/protocol.md)."""

    max_event_bytes: int = Field(default=4096, ge=256, le=1 << 20)
    max_future_skew_s: float = Field(default=300.0, ge=0)  # device clock ahead of the bridge
    max_age_s: float = Field(default=30 * 86400.0, ge=1)  # agents may buffer for days while offline
    max_seq_gap: int = Field(default=1_000_000, ge=1)
    # Payload nesting (CBOR arrays/maps); an event body needs 3 (payload → body → rr_intervals list).
    max_cbor_depth: int = Field(default=16, ge=3, le=64)
    # Per-device token bucket in the sequencer (docs/hostile-input.md): generous enough that a device
    # draining a multi-day backlog after an outage is not slowed down, small enough that one device
    # cannot take the whole log's capacity.
    max_events_per_s: float = Field(default=1000.0, gt=0)
    burst: int = Field(default=20_000, ge=1)


class MinerKey(_Section):
    """A registered miner, as `carechain miner` prints it on start."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\s+]+$")  # cosigner key name
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex Ed25519


class MinerConfig(_Section):
    """`carechain miner`: a witness that cosigns the log's checkpoints (docs/miners.md)."""

    data_dir: Path = Path("carechain-data/miner")
    key_file: Path | None = None  # default DATA_DIR/miner.key (created, mode 0600, if missing)
    log_public_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # hex; the log it follows
    name: str | None = None  # cosigner key name; default carechain.miner/<miner id>
    # Contract re-execution: the contracts genesis (default BRIDGE_DATA_DIR/contracts/genesis.json when it
    # exists); or a MODULE:FUNCTION entry verifier. Neither: every entry is accepted (a warning says so).
    genesis: Path | None = None
    entry_verifier: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$")
    request_timeout_s: float = Field(default=10.0, gt=0)


class BridgeConfig(_Section):
    data_dir: Path = Path("carechain-data/bridge")
    origin: str | None = None  # checkpoint origin line; default derived from the log key
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    batch_max: int = Field(default=2000, ge=1, le=100_000)
    batch_wait_ms: int = Field(default=20, ge=0, le=5000)
    # 0: verify in the bridge process; N: N worker processes on an MQTT shared subscription (mosquitto,
    # EMQX, ...; not the embedded amqtt broker). One more process than cores rarely helps.
    ingest_workers: int = Field(default=0, ge=0, le=64)
    operator_keys: list[str] = Field(default_factory=list)  # hex public keys trusted for registrations
    # Contracts (docs/contracts.md): check every sale before appending it. The token supply is fixed in
    # DATA_DIR/contracts/genesis.json when that is first written, from these opening balances (account →
    # minor units, e.g. "insurer:<party id>": 1000000); empty: a demo supply.
    contracts: bool = True
    genesis_allocations: dict[str, Annotated[int, Field(ge=0, le=2**62)]] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    # Finality (docs/miners.md): the registered miners' cosigner keys and how many must cosign. With a
    # threshold > 0 the bridge collects cosignatures and publishes final checkpoints on cc/v1/log/final.
    miners: list[MinerKey] = Field(default_factory=list)
    finality_threshold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _threshold_fits(self) -> BridgeConfig:
        if self.finality_threshold > len({m.public_key for m in self.miners}):
            raise ValueError(f"finality_threshold {self.finality_threshold} is more than the "
                             f"{len(self.miners)} distinct miner keys listed in bridge.miners")
        return self


class AgentDevice(_Section):
    key_file: Path
    profile: str
    # This device's own MQTT login (devices/<device_id>.json from `carechain bridge acl`); without it the
    # device's MQTT client uses broker.username/password.
    mqtt_credentials_file: Path | None = None
    # Where readings come from: `simulated` (a SimulatedDevice of the profile) or `ble` (the real device,
    # found by the profile's service UUID or by `address`, through bleak; docs/raspberry-pi.md).
    source: Literal["simulated", "ble"] = "simulated"
    address: str | None = Field(default=None, max_length=64)
    pair: bool | None = None  # ble: pair/bond on connect (None: as the profile says)


class AgentConfig(_Section):
    data_dir: Path = Path("carechain-data/agent")
    devices: list[AgentDevice] = Field(default_factory=list)
    bridge_public_key: str | None = None  # hex; receipts not signed by it are ignored
    # Unacknowledged events in flight (< 65,535 MQTT packet ids). Throughput ≈ window ÷ round trip to a
    # receipt; 2000 drains ~6,000 events/s here with ~1 MB of memory for it (docs/reliability.md).
    window: int = Field(default=2000, ge=1, le=60_000)
    resend_after_s: float = Field(default=10.0, gt=0)
    speedup: float = Field(default=1.0, gt=0)  # simulated sources: sample this many times faster
    # Disk quota of the outbox and what happens at it (docs/reliability.md): refuse_new keeps every signed
    # event and stops signing new readings; drop_oldest keeps the newest. Both count and log every loss.
    outbox_quota_mb: float = Field(default=2048.0, gt=0)
    on_quota: Literal["refuse_new", "drop_oldest"] = "refuse_new"


class Config(_Section):
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    bridge: BridgeConfig = Field(default_factory=BridgeConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    miner: MinerConfig = Field(default_factory=MinerConfig)


ENV_OVERRIDES = {
    "CARECHAIN_BROKER": ("broker", "address"),
    "CARECHAIN_BROKER_USERNAME": ("broker", "username"),
    "CARECHAIN_BROKER_PASSWORD": ("broker", "password"),
    "CARECHAIN_BRIDGE_DATA_DIR": ("bridge", "data_dir"),
    "CARECHAIN_AGENT_DATA_DIR": ("agent", "data_dir"),
    "CARECHAIN_MINER_DATA_DIR": ("miner", "data_dir"),
}


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"broker address {text!r} must be HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def load_config(path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load `path` (YAML or .toml) if given, apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            loaded = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping with broker/bridge/agent/miner sections")
        raw = loaded or {}
    env = os.environ if env is None else env
    for var, (section, key) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        sect = raw.setdefault(section, {})
        if key == "address":
            sect["host"], sect["port"] = parse_address(env[var])
        else:
            sect[key] = env[var]
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path or 'environment'}: {where}: {err['msg']}") from None
