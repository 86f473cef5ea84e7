"""The one config loader: defaults, then a YAML (or TOML) file, then `CARECHAIN_*` environment variables, then flags.

Every field has a safe default, so `carechain demo` needs no file at all; every field has a description,
from which docs/configuration.md is generated (`carechain.config_reference`). What a party needs beyond a
valid file (an agent's bridge key, each device's own login) is checked when that party starts
(`AgentConfig.bridge_key`, `check_agent_logins`), so one file can serve a bridge before its key exists.

Every key can be set in each layer: in the file, as `CARECHAIN_<SECTION>__<KEY>` in the environment
(pydantic-settings' nested variables: `CARECHAIN_BRIDGE__LIMITS__MAX_EVENT_BYTES=8192`, lists and maps as
JSON), and on the command line (`--set bridge.batch_max=500`, parsed as its environment variable would be).
A later layer wins key by key; an error names the key and the layer it came from. Secret files (fields
marked `secret`) given as relative paths are found in systemd's `$CREDENTIALS_DIRECTORY` when it is set.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from carechain.identity import parse_public_key_hex


class ConfigError(ValueError):
    """A setting the user must fix; the message names the key (or device entry) and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


HEX_KEY = r"^[0-9a-f]{64}$"  # a hex Ed25519 public key
PRE_KEY_HEX = r"^[0-9a-f]{66}$"  # a hex umbral (secp256k1, compressed) public key: 33 bytes
PARTY_ID = r"^[a-z2-7]{16}$"  # a party id: base32 of its Ed25519 public key's hash, as a device id
HOST_PORT = r"^[^\s:/]+:[0-9]{1,5}$"  # a listen address, e.g. 127.0.0.1:9101
# Marks a path field that names a file holding a secret: a relative path is looked up in systemd's
# $CREDENTIALS_DIRECTORY when that is set (`LoadCredential=`), and the reference page says so.
SECRET_FILE: dict[str, Any] = {"secret": True}


class BrokerConfig(_Section):
    """`broker`: the MQTT broker every party connects to, and the login and TLS settings to reach it."""

    host: str = Field(default="127.0.0.1", description="Host name or IP address of the broker; with TLS, the "
                      "broker's certificate must name it (`carechain keys ca server --host/--ip`).")
    port: int = Field(default=1883, ge=1, le=65535, description="TCP port of the broker (its TLS listener with "
                      "`tls_ca`).")
    username: str | None = Field(default=None, description="MQTT user name of this party (the bridge's; an "
                                 "agent's devices log in with their own `mqtt_credentials_file`).")
    password: str | None = Field(default=None, repr=False, description="Password for `username`; prefer "
                                 "`password_file` or `credentials_file` (never printed or logged).")
    password_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE, description="A file (mode "
                                       "0600, or a systemd credential) holding the password for `username`; "
                                       "instead of `password`, which would sit in the config or environment.")
    tls_ca: Path | None = Field(default=None, description="Set: connect over TLS, trusting this CA only and "
                                "checking that the broker's certificate names `host`.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (PEM), for a broker with "
                                  "`require_certificate`; goes with `tls_key`.")
    tls_key: Path | None = Field(default=None, json_schema_extra=SECRET_FILE, description="Private key of "
                                 "`tls_cert` (PEM, mode 0600).")
    credentials_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE,
                                          description="The bridge's MQTT login written by "
                                          "`carechain bridge acl` (bridge.json, mode 0600); sets username and "
                                          "password. Never used for an agent's devices.")
    failover: list[Annotated[str, Field(pattern=r"^[^\s:/]+:[0-9]{1,5}$")]] = Field(
        default_factory=list, description="More HOST:PORT addresses of the same broker tier (the MQTT listeners of "
        "the other nodes of a NATS cluster, docs/nats.md): after a failed connect or a lost link, the client "
        "tries the next address in turn. With TLS, each node's certificate must name the host dialled.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive: seconds between pings on "
                             "an idle link; a broker that does not answer is taken as lost and reconnected to.")
    max_packet_bytes: int = Field(default=128 * 1024, ge=4096, le=256 << 20, description="Largest MQTT packet "
                                  "this party publishes: at most the broker's `max_packet_size`. Proof answers "
                                  "and miners' evidence are paged below it (docs/miners.md); the default fits "
                                  "every common broker.")

    @model_validator(mode="after")
    def _one_password(self) -> BrokerConfig:
        if self.password_file is not None and (self.password is not None or self.credentials_file is not None):
            other = "password" if self.password is not None else "credentials_file"
            raise ValueError(f"password_file and {other} both give the broker password: keep one")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def has_login(self) -> bool:
        """Whether these settings carry a login (the bridge's, in a shared config file)."""
        return bool(self.username or self.password or self.password_file or self.credentials_file)


class Limits(_Section):
    """`bridge.limits`: explicit ingest limits; each violation is a named, counted rejection (docs/protocol.md)."""

    max_event_bytes: int = Field(default=4096, ge=256, le=1 << 20, description="Largest event (COSE_Sign1 "
                                 "bytes) the bridge accepts.")
    max_future_skew_s: float = Field(default=300.0, ge=0, description="How far a device's clock may be ahead "
                                     "of the bridge's.")
    max_age_s: float = Field(default=30 * 86400.0, ge=1, description="Oldest event accepted: agents may buffer "
                             "for days while offline.")
    max_seq_gap: int = Field(default=1_000_000, ge=1, description="Largest jump in a device's seq over the last "
                             "one accepted.")
    max_cbor_depth: int = Field(default=16, ge=3, le=64, description="Deepest payload nesting (CBOR arrays and "
                                "maps); an event body needs 3 (payload → body → rr_intervals list).")
    # Per-device token bucket in the sequencer (docs/hostile-input.md): generous enough that a device
    # draining a multi-day backlog after an outage is not slowed down, small enough that one device
    # cannot take the whole log's capacity.
    max_events_per_s: float = Field(default=1000.0, gt=0, description="Per-device rate limit (token bucket "
                                    "refill), generous enough for a backlog drained after an outage.")
    burst: int = Field(default=20_000, ge=1, description="Per-device token bucket size: events a device may "
                       "send at once above the rate.")
    max_batch_events: int = Field(default=1000, ge=1, le=100_000, description="Most events in one batch message "
                                  "(docs/protocol.md); each is still verified and receipted on its own.")
    inbox_max_messages: int = Field(default=10_000, ge=1, le=1_000_000, description="Messages received but "
                                    "not yet checked that the bridge (each ingest worker) holds; when full, the "
                                    "broker waits for room (QoS 1 stays unacknowledged), nothing is dropped.")


class MinerKey(_Section):
    """`bridge.miners[]`: a registered miner, as `carechain miner` prints it on start."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\s+]+$", description="The miner's cosigner "
                      "key name.")
    public_key: str = Field(pattern=HEX_KEY, description="The miner's Ed25519 public key, hex.")


class MinerConfig(_Section):
    """`miner`: `carechain miner`, a witness that cosigns the log's checkpoints (docs/miners.md)."""

    data_dir: Path = Field(default=Path("carechain-data/miner"), description="The miner's data directory (its "
                           "key, state); one miner per directory.")
    key_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE, description="The miner's Ed25519 "
                                  "key; default DATA_DIR/miner.key (created, mode 0600, if missing).")
    log_public_key: str | None = Field(default=None, pattern=HEX_KEY, description="Hex public key of the log "
                                       "this miner follows (printed by `carechain bridge`).")
    name: str | None = Field(default=None, description="Cosigner key name; default carechain.miner/<miner id>.")
    genesis: Path | None = Field(default=None, description="Contracts genesis for re-executing entries; default "
                                 "BRIDGE_DATA_DIR/contracts/genesis.json when it exists. Neither this nor "
                                 "`entry_verifier`: every entry is accepted (a warning says so).")
    entry_verifier: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$", description="Instead of "
                                       "`genesis`: a MODULE:FUNCTION that checks each entry.")
    request_timeout_s: float = Field(default=10.0, gt=0, description="How long to wait for the bridge's answer "
                                     "to a proof request.")
    tiles_url: str | None = Field(default=None, pattern=r"^https?://", description="If set: the URL of the log's "
                                  "C2SP tlog-tiles (a web server or CDN serving `bridge.tiles_dir`). The miner then "
                                  "reads the checkpoint, consistency proofs and entries from there, every bundle "
                                  "checked, and asks the bridge over MQTT only when the tiles cannot serve "
                                  "(docs/tiles.md).")
    mpc_listen: str | None = Field(default=None, pattern=r"^[^\s:/]+:[0-9]{1,5}$", description="host:port "
                                   "where this miner's data-market aggregator listens for the other aggregators "
                                   "of a study (MPyC over mutually authenticated TLS: the address and the miner's "
                                   "MPC certificate, DATA_DIR/mpc-tls.crt, are announced, signed, in its hello). "
                                   "Unset: the miner aggregates nothing and leaves its studies to the others "
                                   "(docs/market.md).")
    aggregator_credentials_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE,
                                                     description="The aggregator login `carechain "
                                                     "bridge acl` wrote for this miner (aggregators/<id>.json); "
                                                     "its study results, samples and audit verdicts go out on it. "
                                                     "Default: aggregators/<id>.json beside the directory of "
                                                     "`broker.credentials_file` when that file exists.")
    mpc_timeout_s: float = Field(default=300.0, gt=0, description="How long one study computation (result or "
                                 "audit) may run before the miner stops it and logs the failure.")
    mpc_ports: int = Field(default=64, ge=1, le=1024, description="How many TCP ports from `mpc_listen`'s on "
                           "the aggregator may use: each study computation listens on its own (the same offset "
                           "on every aggregator), so parties of two studies rarely meet on one port (when they "
                           "do, both stop before using a share: docs/market.md).")
    mpc_plaintext_with_older_peers: bool = Field(default=False, description="During a rolling upgrade only: run a "
                                                 "study computation in the clear when some of its aggregators "
                                                 "are older miners whose hellos announce no MPC certificate. Off: "
                                                 "such a study waits, with an ERROR naming them, until they are "
                                                 "upgraded (docs/market.md, \"The channels\").")
    metrics_listen: str | None = Field(default=None, pattern=HOST_PORT, description="host:port where the miner "
                                       "serves /metrics (Prometheus), /healthz and /readyz; unset: none "
                                       "(docs/console.md).")


class ArchiveConfig(_Section):
    """`bridge.archive`: sealed readings archived per (owner, epoch) on the storage miners, then pruned from the
    bridge (docs/access.md, "Where the ciphertexts live"). The storage settings are those of `carechain store`."""

    enabled: bool = Field(default=False, description="Archive the ciphertexts of every ended epoch to the storage "
                          "miners (a `storage.commit` on the ledger each) and prune the bridge's own copy after "
                          "`retention_s`.")
    grace_s: float = Field(default=3600.0, ge=0, description="How long after an epoch ends its ciphertexts are "
                           "archived: readings an agent buffered while offline arrive late (later ones go into "
                           "another archive of the same epoch).")
    retention_s: float = Field(default=7 * 86400.0, ge=0, description="How long the bridge keeps its own copy of "
                               "archived ciphertexts; it prunes them only once their archive is committed under a "
                               "final checkpoint and fetched back intact.")
    miners: list[Annotated[str, Field(pattern=PARTY_ID)]] = Field(default_factory=list, description="Ignored (kept "
                                                                  "so older files load): archives are placed on the "
                                                                  "ledger's active miners, registered and bonded.")
    k: int = Field(default=4, ge=1, le=255, description="Shares needed to rebuild a segment (docs/storage.md).")
    n: int = Field(default=8, ge=2, le=256, description="Shares stored per segment, each on another miner.")
    segment_size: int = Field(default=(1 << 20) - 16, ge=64, le=64 << 20, description="Plaintext bytes per "
                              "encrypted, erasure-coded segment.")
    chunk_size: int = Field(default=1024, ge=16, le=1 << 20, description="Bytes per audited chunk of a share.")
    timeout_s: float = Field(default=10.0, gt=0, description="How long a storage miner may take to answer one "
                             "request before it counts as not answering.")
    window: int = Field(default=16, ge=1, le=1024, description="Storage requests in flight at once.")
    interval_s: float = Field(default=60.0, gt=0, description="Seconds between archive passes; a failed pass is "
                              "retried with backoff.")
    max_archives_per_pass: int = Field(default=16, ge=1, le=10_000, description="Most archives uploaded, "
                                       "committed or pruned in one pass (bounded work; the rest waits).")
    max_bundle_bytes: int = Field(default=8 << 20, ge=4096, le=256 << 20, description="Largest bundle of "
                                  "ciphertexts in one archive; a larger (owner, epoch) is archived in parts.")

    @model_validator(mode="after")
    def _k_below_n(self) -> ArchiveConfig:
        if not self.k < self.n:
            raise ValueError(f"k ({self.k}) must be less than n ({self.n})")
        if self.miners and len(set(self.miners)) < self.n:
            raise ValueError(f"miners lists {len(set(self.miners))} distinct storage miner(s); each share of a "
                             f"segment goes to another one, so n={self.n} need at least as many (or leave it empty)")
        return self


class AnchorConfig(_Section):
    """`bridge.anchor`: checkpoint roots anchored on an Ethereum-compatible chain (docs/anchoring.md): one plain
    transaction from the bridge's anchoring account per `every_checkpoints` checkpoints or `every_minutes`,
    whichever comes first, never per event."""

    enabled: bool = Field(default=False, description="Anchor the latest checkpoint on the chain at `rpc_url`.")
    rpc_url: str | None = Field(default=None, pattern=r"^https?://", description="JSON-RPC endpoint (HTTP or "
                                "HTTPS) of a node of the chain; required when `enabled`. Only its scheme, host "
                                "and port are ever logged (a provider's URL may carry an API key).")
    chain_id: int | None = Field(default=None, ge=1, description="The chain the anchors must go to (1: Ethereum "
                                 "mainnet); the bridge refuses to anchor on a node of another chain. Unset: "
                                 "whichever chain the node is on (logged at start).")
    key_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE,
                                  description="The anchoring account's private key (hex, mode "
                                  "0600); default DATA_DIR/anchor.key, created if missing: fund the address "
                                  "the bridge logs.")
    every_checkpoints: int = Field(default=3600, ge=1, description="Anchor after this many new checkpoints "
                                   "(3600: one hour of checkpoints at the default 1 s interval).")
    every_minutes: float = Field(default=60.0, gt=0, description="Anchor at least this often while the log "
                                 "grows (an idle log is not anchored again).")
    confirmations: int = Field(default=12, ge=1, description="Blocks (the anchor's included) after which an "
                               "anchor is recorded as confirmed.")
    max_fee_gwei: float | None = Field(default=None, gt=0, description="Highest fee per gas the bridge offers; "
                                       "when the chain asks more, the anchor waits (logged). Unset: no cap.")
    rpc_timeout_s: float = Field(default=10.0, gt=0, le=300, description="How long one JSON-RPC call may take.")

    @model_validator(mode="after")
    def _url_when_enabled(self) -> AnchorConfig:
        if self.enabled and not self.rpc_url:
            raise ValueError("bridge.anchor.enabled needs bridge.anchor.rpc_url, the JSON-RPC endpoint of a node")
        return self


class NatsIngestConfig(_Section):
    """`bridge.nats`: with `bridge.ingest: nats`, the NATS cluster whose JetStream work queue holds the devices'
    events (devices still speak MQTT, to the cluster's MQTT listeners; docs/nats.md). The bridge logs in with
    the broker section's login."""

    servers: list[Annotated[str, Field(pattern=r"^(nats|tls)://[^\s/]+:[0-9]{1,5}$")]] = Field(
        default_factory=list, description="Core NATS URLs of the cluster's nodes (nats://HOST:PORT, or tls://); "
        "the bridge fails over between them by itself.")
    stream: str = Field(default="CC_EVENTS", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The JetStream "
                        "stream that captures cc.v1.dev.*.ev (created as a work queue if missing).")
    consumer: str = Field(default="carechain-bridge", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The "
                          "bridge's durable pull consumer on `stream` (created if missing).")
    replicas: int = Field(default=3, ge=1, le=5, description="Copies of the stream kept on distinct nodes when "
                          "the bridge creates it: 3 survives the loss of any one node.")
    ack_wait_s: float = Field(default=30.0, ge=1, le=3600, description="An event pulled but not acknowledged "
                              "(committed) within this is delivered again (and deduplicated).")
    max_ack_pending: int = Field(default=20_000, ge=1, le=1_000_000, description="Events pulled and not yet "
                                 "acknowledged, at most (the server stops delivering above it).")
    tls_ca: Path | None = Field(default=None, description="Set: tls:// servers are checked against this CA only.")


class StoreConfig(_Section):
    """`bridge.store`: where the ledger lives. SQLite (DATA_DIR/ledger.db) on one host; PostgreSQL for several
    bridge hosts sharing one log, one of them the sequencer (docs/ledger-stores.md)."""

    backend: Literal["sqlite", "postgresql"] = Field(default="sqlite", description="`sqlite`: DATA_DIR/ledger.db "
                                                     "(WAL, fsync); `postgresql`: the database at `dsn`.")
    dsn: str | None = Field(default=None, max_length=1000, description="postgresql: libpq connection string or "
                            "URI, without the password (e.g. `host=db1 dbname=carechain user=bridge`).")
    password_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE, description="postgresql: a "
                                       "file (mode 0600, or a systemd "
                                       "credential) holding the password; unset: libpq's own (PGPASSFILE, "
                                       "~/.pgpass, trust).")
    lease_poll_s: float = Field(default=0.25, ge=0.05, le=5.0, description="postgresql: how often a standby "
                                "bridge asks for the sequencer lease and the active one checks it still holds it; "
                                "a take-over takes about this long after the active bridge's session ends.")
    standby_ingest: bool = Field(default=True, description="postgresql: a bridge that does not hold the sequencer "
                                 "lease still takes its share of device events (MQTT shared subscription or the "
                                 "JetStream consumer), verifies, appends and receipts them, leaving checkpoints and "
                                 "the other leader duties to the lease holder; false: it waits idle as a hot "
                                 "standby.")

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> StoreConfig:
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError("bridge.store.backend postgresql needs bridge.store.dsn (e.g. host=db1 dbname=carechain "
                             "user=bridge)")
        return self


class ConsoleConfig(_Section):
    """`bridge.console`: the operator's web console with /metrics, /healthz and /readyz (docs/console.md). Off
    unless `listen` is set (or `carechain bridge --http HOST:PORT`)."""

    listen: str | None = Field(default=None, pattern=HOST_PORT, description="host:port of the console, "
                               "/metrics and the health checks; unset: not served. Keep it on loopback or a "
                               "management network: put TLS in front (a reverse proxy) beyond one host.")
    accounts_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE,
                                       description="Operator accounts (hashed passwords and "
                                       "roles; `carechain console user add`); default "
                                       "DATA_DIR/console/accounts.json, mode 0600.")
    session_idle_s: float = Field(default=1800.0, ge=60, le=86400, description="A console session ends after "
                                  "this long without a request.")
    session_max_s: float = Field(default=12 * 3600.0, ge=300, le=7 * 86400, description="A console session "
                                 "ends this long after login, active or not.")
    max_login_failures: int = Field(default=5, ge=1, le=100, description="Failed logins (per account and per "
                                    "client address) within `lockout_s` before further attempts are refused.")
    lockout_s: float = Field(default=300.0, ge=1, le=86400, description="How long failed logins are counted "
                             "and a locked-out account or address is refused.")
    refresh_s: float = Field(default=2.0, ge=0.2, le=60, description="How often live pages receive new "
                             "figures (server-sent events).")


class BridgeConfig(_Section):
    """`bridge`: `carechain bridge`, which verifies, sequences and anchors events and answers with receipts."""

    data_dir: Path = Field(default=Path("carechain-data/bridge"), description="The bridge's data directory "
                           "(ledger, log key, contracts); one bridge per directory.")
    origin: str | None = Field(default=None, description="Checkpoint origin line; default derived from the log "
                               "key.")
    checkpoint_interval_s: float = Field(default=1.0, gt=0, description="How often a signed checkpoint is "
                                         "issued while the log grows.")
    batch_max: int = Field(default=2000, ge=1, le=100_000, description="Most events appended in one commit.")
    batch_wait_ms: int = Field(default=20, ge=0, le=5000, description="How long a batch waits to fill before "
                               "it is committed.")
    ingest_workers: int = Field(default=0, ge=0, le=64, description="0: verify in the bridge process; N: N "
                                "worker processes on an MQTT shared subscription (mosquitto, EMQX, ...; not the "
                                "embedded amqtt broker) or, with `ingest: nats`, pulling from the one JetStream "
                                "consumer. One more process than cores rarely helps.")
    ingest: Literal["mqtt", "nats"] = Field(default="mqtt", description="Where the bridge takes device events "
                                            "from: `mqtt` (its MQTT subscription, or its workers' shared one) or "
                                            "`nats` (a durable JetStream consumer on `bridge.nats`; each event "
                                            "acknowledged only after it is committed; docs/nats.md).")
    nats: NatsIngestConfig = Field(default_factory=NatsIngestConfig, description="The NATS cluster for "
                                   "`ingest: nats` (see `bridge.nats`).")
    operator_keys: list[str] = Field(default_factory=list, description="Hex public keys trusted to sign device "
                                     "registrations.")
    contracts: bool = Field(default=True, description="Check every sale against the contracts before appending "
                            "it (docs/contracts.md).")
    genesis_allocations: dict[str, Annotated[int, Field(ge=0, le=2**62)]] = Field(
        default_factory=dict, description="Opening token balances (account → minor units, e.g. "
        "\"insurer:<party id>\": 1000000), fixed in DATA_DIR/contracts/genesis.json when that is first "
        "written; empty: a demo supply.")
    limits: Limits = Field(default_factory=Limits, description="Ingest limits (see `bridge.limits`).")
    miners: list[MinerKey] = Field(default_factory=list, description="Cosigner keys for a bridge WITHOUT "
                                   "contracts (a lab setting). With contracts it is ignored, with a warning: a "
                                   "majority of the ledger's active miners (registered, bonded) makes a checkpoint "
                                   "final (docs/miners.md).")
    finality_threshold: int = Field(default=0, ge=0, description="Without contracts: how many of `miners` must "
                                    "cosign a checkpoint for it to be final (> 0: the bridge collects cosignatures "
                                    "and publishes final checkpoints on cc/v1/log/final). Ignored with contracts.")
    proof_requests_per_s: float = Field(default=20.0, gt=0, description="Per-requester rate of proof requests "
                                        "answered (token bucket refill); above it a requester is told when to "
                                        "retry (docs/miners.md).")
    proof_request_burst: int = Field(default=40, ge=1, description="Per-requester token bucket size: proof "
                                     "requests answered at once above the rate (a miner catching up asks one page "
                                     "at a time).")
    records_requests_per_s: float = Field(default=20.0, gt=0, description="Per-requester rate of sealed-record "
                                          "requests answered (docs/access.md); above it requests are refused and "
                                          "counted.")
    records_request_burst: int = Field(default=64, ge=1, description="Per-requester token bucket size for "
                                       "sealed-record requests (one request per page of a large grant).")
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig, description="Archiving sealed readings to "
                                   "the storage miners (see `bridge.archive`).")
    tiles_dir: Path | None = Field(default=None, description="If set: after each checkpoint, write the log as "
                                   "C2SP tlog-tiles into this directory (checkpoint, tile/…), for any static web "
                                   "server or CDN to serve (docs/tiles.md). Off by default.")
    anchor: AnchorConfig = Field(default_factory=AnchorConfig, description="Anchoring checkpoints on an "
                                 "Ethereum-compatible chain (see `bridge.anchor`).")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The ledger store (see `bridge.store`).")
    console: ConsoleConfig = Field(default_factory=ConsoleConfig, description="The operator's web console, "
                                   "metrics and health checks (see `bridge.console`).")

    @model_validator(mode="after")
    def _nats_ingest(self) -> BridgeConfig:
        if self.ingest == "nats" and not self.nats.servers:
            raise ValueError("ingest nats needs bridge.nats.servers (nats://HOST:PORT of each node)")
        return self

    @model_validator(mode="after")
    def _threshold_fits(self) -> BridgeConfig:
        if self.finality_threshold > len({m.public_key for m in self.miners}):
            raise ValueError(f"finality_threshold {self.finality_threshold} is more than the "
                             f"{len(self.miners)} distinct miner keys listed in bridge.miners")
        return self


class AgentDeviceConfig(_Section):
    """`agent.devices[]`: one device the agent runs — its key, profile, MQTT login and where readings come from.
    (The running device is `edge_agent.agent.AgentDevice`.)"""

    key_file: Path = Field(json_schema_extra=SECRET_FILE, description="The device's Ed25519 key (mode 0600); its "
                           "public key is the device id.")
    profile: str = Field(description="Device profile name (device_profiles/), e.g. heart_rate_band.")
    mqtt_credentials_file: Path | None = Field(default=None, json_schema_extra=SECRET_FILE, description="This "
                                               "device's own MQTT login "
                                               "(devices/<device_id>.json from `carechain bridge acl`). Required "
                                               "when the broker requires a login: an agent never logs a device in "
                                               "with the broker section's (the bridge's) login.")
    source: Literal["simulated", "ble"] = Field(default="simulated", description="Where readings come from: "
                                                "`simulated` (from the profile) or `ble` (the real device through "
                                                "bleak, found by the profile's service UUID or by `address`; "
                                                "docs/raspberry-pi.md).")
    address: str | None = Field(default=None, max_length=64, description="ble: the device's Bluetooth address; "
                                "default: the first device advertising the profile's service.")
    pair: bool | None = Field(default=None, description="ble: pair/bond on connect; null: as the profile says.")
    owner: str | None = Field(default=None, pattern=PARTY_ID, description="Protocol 2: the party id of the "
                              "record owner (the patient this device is registered to in the inventory); named "
                              "in each epoch_key event. Required, with `owner_pre_key`, when the device's "
                              "profile produces health readings.")
    owner_pre_key: str | None = Field(default=None, pattern=PRE_KEY_HEX, description="Protocol 2: the owner's "
                                      "re-encryption public key, hex (33 bytes, as `carechain keys new --pre` "
                                      "prints it). Each epoch's data key is encapsulated to it; only the owner's "
                                      "authorization (threshold re-encryption by miners) opens the readings.")
    wellness_policy: str | None = Field(default=None, min_length=1, max_length=64, description="Protocol 2: "
                                        "the id of the wellness policy the owner consented to; the agent then "
                                        "discloses one signed weekly_activity summary (active minutes of each "
                                        "completed ISO week) in clear, and never the raw activity readings.")

    @model_validator(mode="after")
    def _owner_with_key(self) -> AgentDeviceConfig:
        if (self.owner is None) != (self.owner_pre_key is None):
            raise ValueError("owner and owner_pre_key go together: the party id and its re-encryption key")
        return self


class AgentConfig(_Section):
    """`agent`: `carechain agent`, which signs its devices' readings and forwards them to the bridge."""

    data_dir: Path = Field(default=Path("carechain-data/agent"), description="The agent's data directory "
                           "(outbox.db, paired devices); one agent per directory.")
    devices: list[AgentDeviceConfig] = Field(default_factory=list, description="The devices this agent runs "
                                             "(see `agent.devices[]`).")
    bridge_public_key: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{64}$",
        description="Required to run an agent: the bridge's log key, hex (printed by `carechain bridge`); receipts "
        "not signed by it are ignored. Unset only in a config no agent runs from.")
    window: int = Field(default=2000, ge=1, le=60_000, description="Unacknowledged events in flight (< 65,535 "
                        "MQTT packet ids). Throughput ≈ window ÷ round trip to a receipt (docs/reliability.md).")
    resend_after_s: float = Field(default=10.0, gt=0, description="Resend an event with no receipt after this "
                                  "long.")
    speedup: float = Field(default=1.0, gt=0, description="Simulated sources: sample this many times faster.")
    batch_max_events: int = Field(default=256, ge=1, le=1000, description="Most individually signed events "
                                  "packed into one MQTT message (docs/protocol.md); 1 sends one event per message.")
    batch_max_bytes: int = Field(default=60_000, ge=1024, le=1 << 20, description="Largest batch message, "
                                 "in bytes (keep it under the broker's max packet size).")
    batch_linger_ms: int = Field(default=0, ge=0, le=5000, description="Live traffic: how long a new event may "
                                 "wait for others to share its message (0: live events go at once; a backlog "
                                 "drained after an outage is always batched).")
    outbox_quota_mb: float = Field(default=2048.0, gt=0, description="Disk quota of the outbox "
                                   "(docs/reliability.md).")
    on_quota: Literal["refuse_new", "drop_oldest"] = Field(default="refuse_new", description="At the quota: "
                                                           "refuse_new keeps every signed event and stops signing "
                                                           "new readings; drop_oldest keeps the newest. Both count "
                                                           "and log every loss.")
    protocol: Literal[1, 2] = Field(default=2, description="Wire protocol of the readings: 2 seals each health "
                                    "reading at the edge (only its ciphertext's hash is anchored; needs each "
                                    "health device's `owner` and `owner_pre_key`); 1 signs readings in clear, "
                                    "for bridges that predate protocol 2 (refused after the ledger's cutover).")
    epoch_minutes: int = Field(default=60, ge=1, le=1440, description="Protocol 2: length of a key epoch. All "
                               "readings of one device in one epoch share a data key; an access grant opens "
                               "whole epochs, and each epoch costs one re-encryption per miner.")
    metrics_listen: str | None = Field(default=None, pattern=HOST_PORT, description="host:port where the agent "
                                       "serves /metrics (Prometheus), /healthz and /readyz; unset: none "
                                       "(docs/console.md).")
    status_interval_s: float = Field(default=30.0, ge=1, le=3600, description="How often each device reports "
                                     "its status (outbox depth, battery), signed with its key, to the bridge's "
                                     "console; never a reading.")
    ble_adapter: str | None = Field(default=None, pattern=r"^hci[0-9]{1,3}$", description="The Bluetooth "
                                    "adapter the agent's BLE devices are reached through (BlueZ name, e.g. "
                                    "hci1); unset: the system's default adapter.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_from_text(cls, value: object) -> object:
        # An environment variable or --set gives "1"; a Literal of ints takes no text by itself.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @model_validator(mode="after")
    def _protocol_2_features(self) -> AgentConfig:
        if self.protocol == 1:
            for i, device in enumerate(self.devices):
                if device.wellness_policy is not None:
                    raise ValueError(f"devices[{i}].wellness_policy needs protocol 2 (weekly_activity is a "
                                     "protocol 2 event)")
        return self

    @property
    def epoch_ms(self) -> int:
        return self.epoch_minutes * 60_000

    def bridge_key(self) -> bytes:
        """The bridge's public key, or a `ConfigError` saying where to find it."""
        if self.bridge_public_key is None:
            raise ConfigError("agent.bridge_public_key is required to run an agent: set it to the log key "
                              "`carechain bridge` prints on start (receipts are trusted only when the bridge "
                              "signed them)")
        return parse_public_key_hex(self.bridge_public_key, "agent.bridge_public_key")


ENV_PREFIX = "CARECHAIN_"
ENV_NESTED_DELIMITER = "__"


class Config(BaseSettings):
    """The whole file: each command reads the sections it needs.

    A pydantic-settings model: its `model_config` tells `load_config` how environment variables name keys.
    `Config(...)` itself takes only its arguments (defaults for the rest); `load_config` adds the file, the
    environment and flags, in that order.
    """

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      env_parse_none_str="null", case_sensitive=False)

    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The MQTT broker (see `broker`).")
    bridge: BridgeConfig = Field(default_factory=BridgeConfig, description="The bridge (see `bridge`).")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="The edge agent (see `agent`).")
    miner: MinerConfig = Field(default_factory=MinerConfig, description="A miner (see `miner`).")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Not the process environment behind the caller's back: a test's or the demo's `Config()` is what it says.
        return (init_settings,)


def check_agent_logins(config: Config) -> None:
    """Refuse an agent config in which a device would share another party's MQTT login.

    The broker section's login is the bridge's when one file serves both (broker.credentials_file is
    what `carechain bridge acl` writes for the bridge): a device logging in with it would put the bridge's
    secret on an edge host and have its publishes refused by the ACL. So each device names its own
    file when the broker section carries a login, no two devices share one, and none uses the bridge's.
    """
    broker = config.broker
    seen: dict[Path, int] = {}
    for i, device in enumerate(config.agent.devices):
        where = f"agent.devices[{i}] (key_file {device.key_file})"
        own = device.mqtt_credentials_file
        if own is None:
            if broker.has_login:
                login = (f"broker.credentials_file {broker.credentials_file}" if broker.credentials_file
                         else f"broker.username {broker.username!r}")
                raise ConfigError(
                    f"{where} has no mqtt_credentials_file, and an agent never logs a device in with the broker "
                    f"section's login ({login}, the bridge's): give the device its own login "
                    "(`carechain bridge acl` writes devices/<device_id>.json) or remove the login from the "
                    "agent's broker section")
            continue
        if broker.credentials_file is not None and own.resolve() == broker.credentials_file.resolve():
            raise ConfigError(f"{where}: mqtt_credentials_file {own} is broker.credentials_file, the bridge's "
                              "login: give the device its own (devices/<device_id>.json from `carechain bridge acl`)")
        if own.resolve() in seen:
            raise ConfigError(f"{where}: mqtt_credentials_file {own} is also the login of agent.devices"
                              f"[{seen[own.resolve()]}]: each device needs its own")
        seen[own.resolve()] = i


# Single variables kept from before every key had its own (`CARECHAIN_<SECTION>__<KEY>`); both forms work,
# and the nested one wins when both name a key.
ENV_OVERRIDES = {
    "CARECHAIN_BROKER": ("broker", "address"),
    "CARECHAIN_BROKER_USERNAME": ("broker", "username"),
    "CARECHAIN_BROKER_PASSWORD": ("broker", "password"),
    "CARECHAIN_BRIDGE_DATA_DIR": ("bridge", "data_dir"),
    "CARECHAIN_AGENT_DATA_DIR": ("agent", "data_dir"),
    "CARECHAIN_MINER_DATA_DIR": ("miner", "data_dir"),
}
CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # where systemd's LoadCredential= puts a service's secrets
# Keys never taken from a flag: a process's arguments are visible to every user of the host (ps).
NOT_FROM_FLAGS = frozenset({"broker.password"})


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"broker address {text!r} must be HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


@dataclass(frozen=True)
class Override:
    """One setting given on the command line: a dotted key, its value as text, and the flag that gave it.

    The value is read as the key's environment variable would be (a list or a map as JSON, `null` for none),
    so `--set bridge.batch_max=500` and `CARECHAIN_BRIDGE__BATCH_MAX=500` mean the same.
    """

    key: str
    value: str
    flag: str = "--set"

    @classmethod
    def parse(cls, text: str) -> Override:
        """`KEY=VALUE` as given to `--set`; a `ConfigError` for anything else."""
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set bridge.batch_max=500")
        return cls(key.strip().lower(), value)

    @property
    def source(self) -> str:
        return f"{self.flag} {self.key}"


@dataclass
class _Layers:
    """The settings merged so far, and which layer (file, variable, flag) gave each key: errors name it."""

    values: dict[str, Any]
    origin: dict[tuple[str | int, ...], str]

    def add(self, update: Mapping[str, Any], source: str) -> None:
        _merge(self.values, update, Config, (), source, self.origin)

    def source_of(self, loc: tuple[str | int, ...]) -> str | None:
        """The layer that gave `loc` (or the nearest key above it); for a table, every layer that set a key in it."""
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.origin:
                return self.origin[loc[:end]]
        inside = dict.fromkeys(s for k, s in self.origin.items() if k[:len(loc)] == loc)
        return ", ".join(inside) or None


def _merge(into: dict[str, Any], update: Mapping[str, Any], model: type[BaseModel] | None,
           loc: tuple[str | int, ...], source: str, origin: dict[tuple[str | int, ...], str]) -> None:
    """Deep-merge `update` into `into` table by table; any other value (a list, a map) is replaced whole."""
    for key, value in update.items():
        child = _section_model(model, key)
        if child is not None and isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, child, (*loc, key), source, origin)
            continue
        into[key] = value
        for stale in [k for k in origin if k[:len(loc) + 1] == (*loc, key)]:
            del origin[stale]
        origin[(*loc, key)] = source


def _section_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The model of table `key` of `model`, if `key` is a table (not a list, a map or a value)."""
    info = model.model_fields.get(key) if model is not None else None
    annotation = info.annotation if info is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _check_key(parts: Sequence[str], source: str) -> None:
    """Refuse a dotted key that names no setting, suggesting the nearest one (a typo is never ignored)."""
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        if model is None:
            raise ConfigError(f"{source}: {'.'.join(parts[:depth])} is a value, not a table: it has no key {part!r}")
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            near = difflib.get_close_matches(part, list(model.model_fields), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"keys: {', '.join(model.model_fields)}"
            raise ConfigError(f"{source}: {where} has no key {part!r} ({hint})")
        model = _section_model(model, part)


class _VariableSource(EnvSettingsSource):
    """pydantic-settings' environment source over one given variable, not the process environment: each layer
    is parsed alone so that an error can name the variable (or flag) it came from."""

    def __init__(self, name: str, value: str) -> None:
        self._given = {name: value}
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, False, False, "null")


def _parse_variable(name: str, value: str, source: str) -> dict[str, Any]:
    """The nested settings that `CARECHAIN_<SECTION>__<KEY>=value` stands for."""
    _check_key(name[len(ENV_PREFIX):].lower().split(ENV_NESTED_DELIMITER), source)
    try:
        return _VariableSource(name, value)()
    except (SettingsError, ValueError) as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"{source}: not a valid value (a list or a map is written as JSON): {cause}") from None


def _environment_layers(environ: Mapping[str, str]) -> Iterator[tuple[dict[str, Any], str]]:
    """The environment's settings, one (values, source) per variable: the single variables first, then
    `CARECHAIN_<SECTION>__<KEY>` ones (sorted, so deeper keys refine shallower ones)."""
    for var, (section, key) in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        if key == "address":
            host, port = parse_address(environ[var])
            yield {section: {"host": host, "port": port}}, f"environment variable {var}"
        else:
            yield {section: {key: environ[var]}}, f"environment variable {var}"
    nested = sorted(v for v in environ if v.upper().startswith(ENV_PREFIX) and ENV_NESTED_DELIMITER in v)
    for var in nested:
        source = f"environment variable {var}"
        yield _parse_variable(var, environ[var], source), source


def _read_file(path: Path) -> dict[str, Any]:
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
    return loaded or {}


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Sequence[Override] = ()) -> Config:
    """Load the settings: defaults, then `path` (YAML or .toml) if given, then the environment (`env`, default
    `os.environ`), then `overrides` (flags); a later layer wins key by key. A `ConfigError` names the key
    and the file, variable or flag that set it."""
    environ: Mapping[str, str] = os.environ if env is None else env
    layers = _Layers({}, {})
    if path is not None:
        path = Path(path)
        layers.add(_read_file(path), str(path))
    for values, source in _environment_layers(environ):
        layers.add(values, source)
    for override in overrides:
        # also `--set broker={"password": ...}`: a table holding a secret key is refused whole
        secret = next((k for k in NOT_FROM_FLAGS if k == override.key or k.startswith(override.key + ".")), None)
        if secret is not None:
            raise ConfigError(f"{override.source}: a secret is never given on the command line (other users see "
                              f"a process's arguments): use {secret}_file or the environment")
        name = ENV_PREFIX + override.key.replace(".", ENV_NESTED_DELIMITER).upper()
        layers.add(_parse_variable(name, override.value, override.source), override.source)
    try:
        cfg = Config.model_validate(layers.values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc)
        source = layers.source_of(loc) or (str(path) if path is not None else "environment")
        raise ConfigError(f"{source}: {where}: {err['msg']}" if where else f"{source}: {err['msg']}") from None
    credentials = environ.get(CREDENTIALS_DIRECTORY)
    if credentials:
        _find_secrets_in(cfg, Path(credentials))
    return cfg


def _find_secrets_in(model: BaseModel, credentials: Path) -> None:
    """Point each relative secret file of `model` (and its tables) into systemd's credentials directory."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_secret_file(info) and isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, credentials / value)
        elif isinstance(value, BaseModel):
            _find_secrets_in(value, credentials)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _find_secrets_in(item, credentials)


def _is_secret_file(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("secret") is True


def secret_file_keys(model: type[BaseModel]) -> frozenset[str]:
    """The keys of one table (`model`) that name a secret file, for the reference page."""
    return frozenset(name for name, info in model.model_fields.items() if _is_secret_file(info))
