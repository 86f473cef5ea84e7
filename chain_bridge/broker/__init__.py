"""Broker access control derived from the ledger: mosquitto password file, ACL, and the TLS config template."""

from pathlib import Path

from carechain.config import BrokerConfig

SECURE_CONF_TEMPLATE = Path(__file__).resolve().parent / "mosquitto-secure.conf"


def worker_user(bridge_user: str, index: int) -> str:
    """The login of the bridge's ingest worker `index` (`carechain bridge acl --workers`): on a broker that ties
    client ids to logins (`use_username_as_clientid`) it is also the worker's client id."""
    return f"{bridge_user}-w{index}"


def archive_user(bridge_user: str) -> str:
    """The login of the bridge's archiver (ciphertexts to the storage miners): its own MQTT session, so that
    under `use_username_as_clientid` it never takes over the bridge's."""
    return f"{bridge_user}-archive"


def archive_broker(broker: BrokerConfig) -> BrokerConfig:
    """The broker settings the archiver connects with: the bridge's, under the archiver's own login."""
    if not broker.username:
        return broker
    return broker.model_copy(update={"username": archive_user(broker.username)})


def worker_broker(broker: BrokerConfig, index: int) -> BrokerConfig:
    """The broker settings ingest worker `index` connects with: the bridge's, under the worker's own login
    (same password, see chain_bridge.broker.acl.plan_logins). Without a login (an open broker) unchanged."""
    if not broker.username:
        return broker
    return broker.model_copy(update={"username": worker_user(broker.username, index)})
