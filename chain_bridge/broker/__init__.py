"""Broker access control derived from the ledger: mosquitto password file, ACL, and the TLS config template."""

from pathlib import Path

from carechain.config import BrokerConfig

SECURE_CONF_TEMPLATE = Path(__file__).resolve().parent / "mosquitto-secure.conf"


def worker_user(bridge_user: str, index: int) -> str:
    """The login of the bridge's ingest worker `index` (`carechain bridge acl --workers`): on a broker that ties
    client ids to logins (`use_username_as_clientid`) it is also the worker's client id."""
    return f"{bridge_user}-w{index}"


def worker_broker(broker: BrokerConfig, index: int) -> BrokerConfig:
    """The broker settings ingest worker `index` connects with: the bridge's, under the worker's own login
    (same password, see chain_bridge.broker.acl.plan_logins). Without a login (an open broker) unchanged."""
    if not broker.username:
        return broker
    return broker.model_copy(update={"username": worker_user(broker.username, index)})
