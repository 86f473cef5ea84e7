"""A witness miner assembled from config: data-dir lock, miner key, log key, entry verifier, `WitnessMiner`.

The one way to run a witness miner (`carechain miner` calls it). Failures are `ConfigError` (a setting or
file the user must fix, named in the message) or `DataDirLocked` (another miner runs on this data dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carechain.config import BrokerConfig, Config, ConfigError
from carechain.credentials import CredentialsError, resolve_broker_login
from carechain.datadir import DataDirLock, lock_data_dir
from carechain.identity import Identity, KeyFileError, PublicKeyError, parse_public_key_hex
from carechain.tile_client import TileFetchError
from chain_miner.service import StateError, WitnessMiner, contract_verifier, load_entry_verifier
from chain_miner.witness import EntryVerifier, verify_entries
from contract_rules.genesis import read_genesis

DEFAULT_GENESIS = Path("contracts") / "genesis.json"  # under the bridge's data dir, on a shared host


@dataclass
class AssembledMiner:
    """A witness miner ready to `start()`, holding its data directory until `close()` (or process exit)."""

    miner: WitnessMiner
    data_dir: Path
    lock: DataDirLock
    checks: str  # what it checks besides log consistency, e.g. "contracts re-executed from genesis …"

    def close(self) -> None:
        """After `miner.stop()`: release the data directory."""
        self.lock.release()


def assemble_miner(cfg: Config, *, data_dir: Path | None = None, key: Path | None = None,
                   log_public_key: str | None = None, name: str | None = None, genesis: Path | None = None,
                   entry_verifier: str | None = None) -> AssembledMiner:
    """Lock the miner's data directory and build its witness; arguments override the `miner` config section.

    Without a genesis (argument, `miner.genesis`, or BRIDGE_DATA_DIR/contracts/genesis.json when it exists)
    nor an entry verifier, `checks` is empty: only log consistency is checked (the caller warns).
    `broker.credentials_file`, if set, is resolved (`resolve_broker_login`). With `miner.mpc_listen` and the
    contracts the miner also runs the studies it aggregates (`chain_miner.study_runner`), publishing over its
    aggregator login (`aggregator_broker`); with the contracts alone it runs its part of the trials it labels
    (`chain_miner.trial_runner`), publishing over its own session.
    """
    mc = cfg.miner
    mdir = Path(data_dir or mc.data_dir)
    log_hex = log_public_key or mc.log_public_key
    if not log_hex:
        raise ConfigError("no log public key: give --log-public-key HEX or miner.log_public_key (the bridge "
                          "prints it on start; `carechain keys show BRIDGE_DATA_DIR/keys/log.key` shows it too)")
    try:
        log_key = parse_public_key_hex(log_hex, "log public key (--log-public-key or miner.log_public_key)")
        broker = resolve_broker_login(cfg.broker)
    except (PublicKeyError, CredentialsError) as exc:
        raise ConfigError(str(exc)) from None
    genesis_file = genesis or mc.genesis
    shared_genesis = cfg.bridge.data_dir / DEFAULT_GENESIS
    if genesis_file is None and shared_genesis.exists():
        genesis_file = shared_genesis
    spec = entry_verifier or mc.entry_verifier
    lock = lock_data_dir(mdir, "miner")
    try:
        key_file = key or mc.key_file or mdir / "miner.key"
        identity = Identity.load_or_create(key_file)
        size_of = None
        replica = None  # with the contracts, the miner also serves the access grants naming it
        verifier: EntryVerifier
        if spec:
            verifier, checks = load_entry_verifier(spec), f"entry verifier {spec}"
        elif genesis_file is not None:
            replica, size_of = contract_verifier(read_genesis(genesis_file))
            verifier, checks = replica, f"contracts re-executed from genesis {genesis_file}"
        else:
            verifier, checks = verify_entries, ""
        tiles = None
        if mc.tiles_url is not None:
            from chain_miner.tile_feed import TileFeed

            tiles = TileFeed(mc.tiles_url, log_key, timeout_s=mc.request_timeout_s)
        miner = WitnessMiner(mdir, broker, log_key, identity, name=name or mc.name, entry_verifier=verifier,
                             request_timeout_s=mc.request_timeout_s, verifier_size=size_of, replica=replica,
                             tiles=tiles)
        if replica is not None:  # a labeller learns its trials from the contract state
            from chain_miner.trial_runner import TrialRunner

            miner.trials = TrialRunner(mdir, identity, lambda: replica.state, miner.cosigned_leaves,
                                       miner.publish_entry)
            checks += "; labels the trials it is drawn for"
        if mc.mpc_listen is not None:
            if replica is None:
                raise ConfigError("miner.mpc_listen is set but the contracts are not re-executed (no genesis): a "
                                  "miner learns its studies from the contract state; give --genesis or "
                                  "miner.genesis, or unset miner.mpc_listen")
            from chain_miner.study_runner import StudyRunner

            miner.studies = StudyRunner(mdir, identity, key_file, mc.mpc_listen,
                                        aggregator_broker(cfg, identity.device_id), lambda: replica.state,
                                        replica.genesis, miner.cosigned_leaves, timeout_s=mc.mpc_timeout_s,
                                        mpc_ports=mc.mpc_ports,
                                        plaintext_with_older_peers=mc.mpc_plaintext_with_older_peers)
            checks += f"; aggregates its studies (MPC on {mc.mpc_listen})"
    except (ValueError, KeyFileError, StateError, ImportError, OSError, TileFetchError) as exc:
        lock.release()
        raise ConfigError(str(exc)) from None
    except BaseException:
        lock.release()
        raise
    return AssembledMiner(miner, mdir, lock, checks)


def aggregator_broker(cfg: Config, miner_id: str) -> BrokerConfig:
    """The broker settings the miner's aggregator publishes with: the miner's broker, logged in with the
    aggregator login (`miner.aggregator_credentials_file`, or aggregators/<id>.json beside the directory of
    `broker.credentials_file`), never with the miner's own login, which would knock the miner service off
    (the broker ties client ids to logins). ConfigError when the broker wants a login and none is found."""
    login = cfg.miner.aggregator_credentials_file
    if login is None and cfg.broker.credentials_file is not None:
        beside = Path(cfg.broker.credentials_file).parent.parent / "aggregators" / f"{miner_id}.json"
        login = beside if beside.exists() else None
    if login is None:
        if cfg.broker.credentials_file is not None or cfg.broker.username is not None:
            raise ConfigError("miner.mpc_listen is set but there is no aggregator login: set "
                              "miner.aggregator_credentials_file to the aggregators/<miner id>.json that `carechain "
                              "bridge acl` wrote (the miner's own login would knock this miner off the broker)")
        return cfg.broker
    return cfg.broker.model_copy(update={"credentials_file": Path(login), "username": None, "password": None})
