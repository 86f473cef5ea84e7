"""`carechain bridge acl`: a mosquitto password file and ACL derived from the ledger's device registry.

Least privilege (docs/broker-security.md): every registered, non-revoked device is its own MQTT user
(username = device_id) that may only publish its own events and status reports and read its own receipts and
the checkpoint; the bridge has its own user, each of its ingest workers one more (`<bridge user>-w<i>`, read-only), each
witness miner one (`carechain-miner-<miner id>`) and, for the same miner id, one for its storage server
(`carechain-store-<miner id>`: the two run as separate processes, and one login holds one session) and one
for its data-market aggregator (`carechain-aggregator-<miner id>`, which writes only that miner's study
results), and each registered patient, doctor and researcher one (`carechain-party-<party id>`) that reads
only its own inbox. A miner's logins write only its own requests, cosignatures, evidence, hello, storage
answers and study results; only the bridge answers on the miners' response topics. Miners are those
registered on the ledger (role `miner`) plus any added by hand. Several bridge hosts on one PostgreSQL ledger
get one login each (`<bridge user>-h<i>`, with the bridge's rights and password, and an archiver login
`<bridge user>-h<i>-archive`). A revoked device has no login at all. One login per
client matters because the broker ties client ids to logins (`use_username_as_clientid`): a login can
then hold one session only and never take over another client's id. Passwords are random, kept in
`<bridge data dir>/broker/credentials.json` (mode 0600) so that re-running keeps every existing login
stable, and handed to each party in its own provisioning file (mode 0600); they are never printed.
The same logins, with their ACL lines as NATS permissions, go to `nats-authorization.conf` for the nodes of a
NATS cluster (docs/nats.md), so a party's provisioning file works on either broker.

The text builders and the password hash are pure; `generate_broker_access` is the file-writing shell.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from carechain import topics
from carechain.credentials import MqttCredentials
from carechain.files import FilePermissionError, read_private, write_atomic
from chain_bridge.broker import archive_user, worker_user
from chain_bridge.broker.nats import acl_users, authorization_block
from chain_bridge.ledger.store import DeviceRecord, Ledger

DEFAULT_BRIDGE_USER = "carechain-bridge"
MINER_USER_PREFIX = "carechain-miner-"  # + miner id: the witness miner's client id, so nothing there changes
STORE_USER_PREFIX = "carechain-store-"  # + miner id: the same miner's storage server
AGGREGATOR_USER_PREFIX = "carechain-aggregator-"  # + miner id: the same miner's study aggregator
PARTY_USER_PREFIX = "carechain-party-"  # + party id: a record owner's or requester's login
# The parties that read records (owners) or ask for them (requesters) over MQTT (`carechain access`).
PARTY_ROLES = frozenset({"patient", "doctor", "researcher"})
MAX_WORKERS = 64  # as bridge.ingest_workers
MAX_HOSTS = 16  # bridge hosts sharing one PostgreSQL ledger (docs/ledger-stores.md)
STORE_FORMAT = "carechain-broker-credentials-v1"
STORE_FILE = Path("broker") / "credentials.json"  # under the bridge data dir
NATS_AUTHORIZATION_FILE = "nats-authorization.conf"  # in the out dir, next to passwd and acl
# mosquitto_passwd's defaults for its `$7$` format (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash).
# The count is low, but it only matters against guessable passwords; ours carry 256 random bits, and the
# broker runs this hash on every CONNECT, so a reconnect storm of a whole fleet stays cheap.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64

_DEVICE_ID = re.compile(r"[a-z2-7]{16}")
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = re.compile(r"[\w.:/ -]{1,64}")

Role = Literal["bridge", "host", "worker", "archive", "miner", "store", "aggregator", "device", "party"]
# Logins that carry the bridge's password: they run the bridge's own code from its provisioning, and the
# ingest group name (chain_bridge.workers.share_group) is derived from that password, so all must share it.
_BRIDGE_PASSWORD_ROLES = ("host", "worker", "archive")


class BrokerAccessError(ValueError):
    """Something the operator must fix before broker access files can be written."""


def miner_user(miner_id: str) -> str:
    return f"{MINER_USER_PREFIX}{miner_id}"


def store_user(miner_id: str) -> str:
    return f"{STORE_USER_PREFIX}{miner_id}"


def aggregator_user(miner_id: str) -> str:
    return f"{AGGREGATOR_USER_PREFIX}{miner_id}"


def party_user(party_id: str) -> str:
    return f"{PARTY_USER_PREFIX}{party_id}"


def host_user(bridge_user: str, index: int) -> str:
    """The login of bridge host `index` of a deployment whose bridges share one PostgreSQL ledger: under
    `use_username_as_clientid` it is the host's client id, so two hosts never take over each other's session."""
    return f"{bridge_user}-h{index}"


# -- the password hash (mosquitto 2.x `$7$` format) ----------------------------------------------------

def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """`$7$<iterations>$<salt b64>$<hash b64>`, the line format of mosquitto 2.x password files."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(encoded: str, password: str) -> bool:
    """True when `password` matches a `$7$` hash (ours or one written by `mosquitto_passwd`)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)


# -- pure builders ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Login:
    role: Role
    password: str = field(repr=False)
    hash: str = field(repr=False)


@dataclass(frozen=True)
class LoginPlan:
    logins: dict[str, Login]  # username -> login; the bridge first, then devices in id order
    added: list[str]
    rotated: list[str]
    removed: list[str]


def _new_password() -> str:
    return secrets.token_urlsafe(32)  # 256 bits; URL-safe base64 has no ':' to confuse the password file


def check_bridge_user(name: str) -> str:
    if not _USERNAME.fullmatch(name):
        raise BrokerAccessError(f"bridge user {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")
    if _DEVICE_ID.fullmatch(name):
        raise BrokerAccessError(f"bridge user {name!r} looks like a device id; pick a name no device can have, "
                                f"e.g. {DEFAULT_BRIDGE_USER}")
    reserved = (MINER_USER_PREFIX, STORE_USER_PREFIX, AGGREGATOR_USER_PREFIX, PARTY_USER_PREFIX)
    if name.startswith(reserved) or len(name) > 60:
        raise BrokerAccessError(f"bridge user {name!r}: must not start with {', '.join(map(repr, reserved))} "
                                "(miners' and parties' logins) and "
                                "must leave room for the workers' '-w<i>' (at most 60 characters)")
    return name


def check_miner_id(miner_id: str) -> str:
    if not _DEVICE_ID.fullmatch(miner_id):
        raise BrokerAccessError(f"{miner_id!r} is not a miner id (16 characters a-z, 2-7; `carechain keys show "
                                "MINER_KEY` prints it)")
    return miner_id


def plan_logins(previous: Mapping[str, Login], bridge_user: str, device_ids: Iterable[str],
                rotate: Collection[str] = (), new_password: Callable[[], str] = _new_password, *,
                workers: int = 0, miner_ids: Iterable[str] = (), party_ids: Iterable[str] = (),
                hosts: int = 0) -> LoginPlan:
    """Keep every existing login, create missing ones, give `rotate`d users a new password, drop the rest.

    The bridge's `workers` logins share its password: they run in the bridge's own processes from the same
    provisioning file (and the workers' shared-subscription group is derived from that password); they exist
    so that the broker gives each worker its own client id. So do the `hosts` logins (one per bridge host on
    a shared PostgreSQL ledger, all in one ingest group) and their archivers' logins. Rotating the bridge
    rotates them with it.
    """
    check_bridge_user(bridge_user)
    if not 0 <= workers <= MAX_WORKERS:
        raise BrokerAccessError(f"workers: {workers} is not between 0 and {MAX_WORKERS}")
    if not 0 <= hosts <= MAX_HOSTS:
        raise BrokerAccessError(f"hosts: {hosts} is not between 0 and {MAX_HOSTS}")
    wanted: dict[str, Role] = {bridge_user: "bridge"}
    for i in range(workers):
        wanted[worker_user(bridge_user, i)] = "worker"
    wanted[archive_user(bridge_user)] = "archive"
    for i in range(hosts):
        wanted[host_user(bridge_user, i)] = "host"
        wanted[archive_user(host_user(bridge_user, i))] = "archive"
    for miner in sorted(set(miner_ids)):
        wanted[miner_user(check_miner_id(miner))] = "miner"
        wanted[store_user(miner)] = "store"
        wanted[aggregator_user(miner)] = "aggregator"
    for party in sorted(set(party_ids)):
        if not _DEVICE_ID.fullmatch(party):
            raise BrokerAccessError(f"ledger holds party {party!r}, which is not a party id; refusing to write an ACL")
        wanted[party_user(party)] = "party"
    for dev in sorted(device_ids):
        if not _DEVICE_ID.fullmatch(dev):
            raise BrokerAccessError(f"registry holds {dev!r}, which is not a device id; refusing to write an ACL")
        wanted[dev] = "device"
    unknown = sorted(set(rotate) - {u for u, r in wanted.items() if r not in _BRIDGE_PASSWORD_ROLES})
    if unknown:
        raise BrokerAccessError(f"cannot rotate {', '.join(unknown)}: not the bridge user, a miner's or a party's "
                                "login, nor a registered, non-revoked device")
    logins: dict[str, Login] = {}
    added: list[str] = []
    rotated: list[str] = []
    for user, role in wanted.items():
        old = previous.get(user)
        if role in _BRIDGE_PASSWORD_ROLES:
            shared = logins[bridge_user].password
            if old is not None and old.role == role and hmac.compare_digest(old.password, shared):
                logins[user] = old
                continue
            logins[user] = Login(role, shared, hash_password(shared))
        elif old is not None and old.role == role and user not in rotate:
            logins[user] = old
            continue
        else:
            password = new_password()
            logins[user] = Login(role, password, hash_password(password))
        (rotated if old is not None else added).append(user)
    return LoginPlan(logins, added, rotated, sorted(set(previous) - set(wanted)))


def passwd_text(logins: Mapping[str, Login]) -> str:
    return "".join(f"{user}:{login.hash}\n" for user, login in logins.items())


def _label(text: str) -> str:
    return text if _LABEL.fullmatch(text) else "?"


def acl_text(bridge_user: str, devices: Iterable[DeviceRecord], *, registry_version: int, revoked: int,
             workers: int = 0, miner_ids: Iterable[str] = (), party_ids: Iterable[str] = (), hosts: int = 0) -> str:
    """The ACL: nothing for anonymous clients; per user, exactly the topics it needs."""
    devices = list(devices)
    lines = [
        "# mosquitto ACL for carechain, generated by `carechain bridge acl` from the ledger's device registry",
        f"# (registry version {registry_version}: {len(devices)} device(s); {revoked} revoked device(s) left out).",
        "# Do not edit: re-run the command and reload mosquitto (SIGHUP). No `topic` line comes before the",
        "# first `user` line, so a client without a username is granted nothing. See docs/broker-security.md.",
        "",
        "# The bridge reads every device's events. Its ingest workers, and bridge hosts sharing one PostgreSQL",
        f"# ledger, subscribe to $share/<group>/{topics.EVENTS_WILDCARD}; mosquitto checks READ against each",
        "# delivered message's own topic, so this one line covers the shared subscription too.",
        f"user {bridge_user}",
        *_bridge_topics(),
    ]
    for i in range(hosts):
        host = host_user(bridge_user, i)
        lines += ["", f"# bridge host {i} on the shared PostgreSQL ledger: the bridge's topics (it leads while it "
                  "holds the sequencer lease)", f"user {host}", *_bridge_topics()]
    for i in range(workers):
        lines += ["", f"# bridge ingest worker {i}: reads events through the workers' shared subscription",
                  f"user {worker_user(bridge_user, i)}", f"topic read {topics.EVENTS_WILDCARD}"]
    for user in [bridge_user, *(host_user(bridge_user, i) for i in range(hosts))]:
        lines += ["", "# the bridge's archiver (bridge.archive): ciphertexts per owner and epoch to the storage "
                  "miners", f"user {archive_user(user)}", f"topic write {topics.STORE_REQUEST_WILDCARD}",
                  f"topic read {topics.STORE_RESPONSE_WILDCARD}", f"topic read {topics.STORE_HELLO_WILDCARD}",
                  f"topic read {topics.FINAL_CHECKPOINT}"]
    lines += _miner_and_party_blocks(miner_ids, party_ids)
    for d in sorted(devices, key=lambda d: d.device_id):
        lines += [
            "",
            f"# device {d.device_id}: profile {_label(d.profile)}, site {_label(d.site)}, "
            f"registered at leaf {d.registered_idx}",
            f"user {d.device_id}",
            f"topic write {topics.events(d.device_id)}",
            f"topic write {topics.status(d.device_id)}",
            f"topic read {topics.receipts(d.device_id)}",
            f"topic read {topics.CHECKPOINT}",
        ]
    return "\n".join(lines) + "\n"


def _bridge_topics() -> list[str]:
    """The bridge login's topic lines (every bridge host's too)."""
    return [
        f"topic read {topics.EVENTS_WILDCARD}",
        "# devices' signed status reports (outbox depth, battery) for the console; never on the ledger",
        f"topic read {topics.STATUS_WILDCARD}",
        f"topic write {topics.PREFIX}/dev/+/rcpt",
        f"topic write {topics.CHECKPOINT}",
        f"topic write {topics.FINAL_CHECKPOINT}",
        "# a bridge host that does not lead follows the leader's final checkpoints (docs/ledger-stores.md)",
        f"topic read {topics.FINAL_CHECKPOINT}",
        "# Witness miners: their requests, cosignatures and evidence in, proof answers out.",
        f"topic read {topics.MINER_REQUEST_WILDCARD}",
        f"topic read {topics.MINER_COSIG_WILDCARD}",
        f"topic read {topics.MINER_EVIDENCE_WILDCARD}",
        f"topic read {topics.MINER_HELLO_WILDCARD}",
        "# aggregators' study entries (study.result, study.sample, study.audit), decided by the contracts and appended",
        f"topic read {topics.MINER_STUDY_WILDCARD}",
        "# only the bridge answers proof requests (and miners act only on answers the log key signed)",
        f"topic write {topics.PREFIX}/miner/+/resp",
        "# Private records: requesters' signed page requests and fault evidence in, record pages out to",
        "# each requester's inbox.",
        f"topic read {topics.ACCESS_RECORDS}",
        f"topic read {topics.ACCESS_EVIDENCE}",
        f"topic write {_PARTY_INBOXES}",
    ]


def _miner_and_party_blocks(miner_ids: Iterable[str], party_ids: Iterable[str]) -> list[str]:
    lines: list[str] = []
    for miner in sorted(set(miner_ids)):
        lines += [
            "",
            f"# witness miner {miner}",
            f"user {miner_user(miner)}",
            f"topic read {topics.CHECKPOINT}",
            f"topic read {topics.FINAL_CHECKPOINT}",
            "# every miner's cosignatures: a miner counts finality itself, never on the bridge's word",
            f"topic read {topics.MINER_COSIG_WILDCARD}",
            f"topic read {topics.MINER_HELLO_WILDCARD}",
            f"topic write {topics.miner_request(miner)}",
            f"topic write {topics.miner_cosignature(miner)}",
            f"topic write {topics.miner_evidence(miner)}",
            "# its trial entries as a labeller (commit, reveal, recover, unblind keys); the rules decide them",
            f"topic write {topics.miner_study(miner)}",
            "# its own retained hello (its last will empties it)",
            f"topic write {topics.miner_hello(miner)}",
            f"topic read {topics.miner_response(miner)}",
            "# capsule fragments go to the requester named in an access record",
            f"topic write {_PARTY_INBOXES}",
            "",
            f"# storage server of miner {miner}: its own requests in, its own signed answers and hello out",
            f"user {store_user(miner)}",
            f"topic read {topics.store_request(miner)}",
            f"topic write {topics.store_response(miner)}",
            f"topic write {topics.store_hello(miner)}",
            f"topic read {topics.CHECKPOINT}",
            f"topic read {topics.FINAL_CHECKPOINT}",
            "",
            f"# data-market aggregator of miner {miner}: signed study.result, study.sample, study.audit; nothing else",
            f"user {aggregator_user(miner)}",
            f"topic write {topics.miner_study(miner)}",
        ]
    for party in sorted(set(party_ids)):
        lines += [
            "",
            f"# party {party}: reads its own inbox only; asks the bridge for record pages, files evidence,",
            "# sends an access request to a record owner's inbox, and reads the final checkpoint (public) that",
            "# seeds the choice of miners for a grant",
            f"user {party_user(party)}",
            f"topic read {topics.party_inbox(party)}",
            f"topic write {topics.ACCESS_RECORDS}",
            f"topic write {topics.ACCESS_EVIDENCE}",
            f"topic write {_PARTY_INBOXES}",
            f"topic read {topics.FINAL_CHECKPOINT}",
        ]
    return lines


_PARTY_INBOXES = f"{topics.PREFIX}/party/+/inbox"


def nats_authorization_text(acl: str, logins: Mapping[str, Login]) -> str:
    """The same logins for a NATS cluster (docs/nats.md): an `authorization` block each node's config
    includes, with every login's ACL lines as NATS permissions and its password as a bcrypt hash (nats-server
    does not read mosquitto's hashes)."""
    core = {u for u, x in logins.items() if x.role in ("bridge", "host")}
    users = acl_users(acl, {u: nats_password_hash(x.password) for u, x in logins.items()}, core_nats=core)
    return "\n".join([
        "# NATS logins for carechain, generated by `carechain bridge acl` with the mosquitto passwd and acl next",
        "# to it: the same users and passwords, each allowed the subjects of its ACL lines (docs/nats.md).",
        "# Do not edit: re-run the command, then reload every node (nats-server --signal reload, or SIGHUP).",
        "# Each node's config includes it (path relative to that config): include \"nats-authorization.conf\"",
        "# It holds bcrypt hashes of the passwords; keep it mode 0600, readable only by nats-server.",
        authorization_block(users), ""])


# Passwords are 256-bit random tokens (`new_password`): the hash only keeps them out of the file, so the lowest
# cost bcrypt allows is enough, and a fleet reconnecting after an outage does not cost nats-server seconds of CPU
# per hundred logins (cost 10, a common default, is ~60 ms per connect here).
NATS_BCRYPT_COST = 4


def nats_password_hash(password: str) -> str:
    """A bcrypt hash nats-server accepts in place of the password (`$2b$` reads as `$2a$`)."""
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(NATS_BCRYPT_COST, prefix=b"2a")).decode()


# -- the credential store -----------------------------------------------------------------------------

def store_path(data_dir: Path) -> Path:
    return Path(data_dir) / STORE_FILE


def load_store(path: Path) -> dict[str, Login]:
    try:
        raw = json.loads(read_private(path))
    except FileNotFoundError:
        return {}
    except FilePermissionError as exc:
        raise BrokerAccessError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise BrokerAccessError(f"{path}: unreadable broker credential store ({exc}); restore it from backup, "
                                "or move it away to issue new passwords to every party") from None
    if not isinstance(raw, dict) or raw.get("format") != STORE_FORMAT or not isinstance(raw.get("users"), dict):
        raise BrokerAccessError(f"{path}: not a carechain broker credential store ({STORE_FORMAT})")
    try:
        return {user: Login(v["role"], v["password"], v["hash"]) for user, v in raw["users"].items()}
    except (KeyError, TypeError) as exc:
        raise BrokerAccessError(f"{path}: a login is missing {exc}") from None


def save_store(path: Path, logins: Mapping[str, Login]) -> None:
    data = {"format": STORE_FORMAT,
            "users": {u: {"role": x.role, "password": x.password, "hash": x.hash} for u, x in logins.items()}}
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


# -- the shell ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerAccess:
    passwd: Path
    acl: Path
    bridge_credentials: Path
    device_credentials: dict[str, Path]
    revoked_left_out: int
    plan: LoginPlan
    stale_removed: list[Path]
    miner_credentials: dict[str, Path] = field(default_factory=dict)
    workers: int = 0
    party_credentials: dict[str, Path] = field(default_factory=dict)
    store_credentials: dict[str, Path] = field(default_factory=dict)  # miner id -> its storage server's login
    aggregator_credentials: dict[str, Path] = field(default_factory=dict)  # miner id -> its aggregator's login
    host_credentials: list[Path] = field(default_factory=list)  # bridge host i -> hosts/<bridge user>-h<i>.json
    nats_authorization: Path | None = None  # the same logins for a NATS cluster's nodes to include


def generate_broker_access(ledger: Ledger, data_dir: Path, out_dir: Path, *,
                           bridge_user: str = DEFAULT_BRIDGE_USER, rotate: Collection[str] = (), workers: int = 0,
                           add_miners: Collection[str] = (), remove_miners: Collection[str] = (),
                           hosts: int | None = None) -> BrokerAccess:
    """Write passwd, acl, nats-authorization.conf, bridge.json, hosts/<bridge user>-h<i>.json, devices/<id>.json,
    miners/<id>.json, stores/<id>.json and aggregators/<id>.json (all mode 0600) into `out_dir`.

    Logins for `workers` ingest workers and for `hosts` bridge hosts (several bridges on one PostgreSQL
    ledger, each with its own client id) share bridge.json's password; `hosts` None keeps as many host logins
    as the store holds, so re-running after a registration does not drop them. Every miner registered on the ledger
    (`party.register` role miner) gets a witness login (miners/), a storage login (stores/) and an aggregator
    login (aggregators/); miners added by hand are kept in the store across runs: `add_miners` adds,
    `remove_miners` drops (a registered miner too). Every patient, doctor and researcher registered on the ledger
    gets a login and parties/<id>.json.
    The credential store is saved first, so no file ever carries a password that is not persisted.
    """
    registry = ledger.devices()
    active = [d for d in registry.values() if not d.revoked]
    store = store_path(data_dir)
    previous = load_store(store)
    if hosts is None:
        hosts = sum(1 for login in previous.values() if login.role == "host")
    kept_miners = {u.removeprefix(MINER_USER_PREFIX) for u, x in previous.items() if x.role == "miner"}
    registered = ledger.registered_parties()
    on_ledger = {pid for pid, role in registered.items() if role == "miner"}
    miners = sorted((kept_miners | on_ledger | {check_miner_id(m) for m in add_miners}) - set(remove_miners))
    parties = sorted(pid for pid, role in registered.items() if role in PARTY_ROLES)
    plan = plan_logins(previous, bridge_user, [d.device_id for d in active], rotate, workers=workers,
                       miner_ids=miners, party_ids=parties, hosts=hosts)
    save_store(store, plan.logins)

    out_dir = Path(out_dir)
    passwd, acl, nats = out_dir / "passwd", out_dir / "acl", out_dir / NATS_AUTHORIZATION_FILE
    acl_lines = acl_text(bridge_user, active, registry_version=ledger.registry_version(),
                         revoked=len(registry) - len(active), workers=workers, miner_ids=miners,
                         party_ids=parties, hosts=hosts)
    write_atomic(passwd, passwd_text(plan.logins).encode())
    write_atomic(acl, acl_lines.encode())
    write_atomic(nats, nats_authorization_text(acl_lines, plan.logins).encode())
    bridge_file = out_dir / "bridge.json"
    write_atomic(bridge_file, MqttCredentials(username=bridge_user, password=plan.logins[bridge_user].password)
                 .to_json())
    host_files = []
    for i in range(hosts):
        host_files.append(out_dir / "hosts" / f"{host_user(bridge_user, i)}.json")
        write_atomic(host_files[-1], MqttCredentials(username=host_user(bridge_user, i),
                                                     password=plan.logins[bridge_user].password).to_json())
    stale_hosts = [p for p in sorted((out_dir / "hosts").glob("*.json")) if p not in host_files]
    dev_dir = out_dir / "devices"
    device_files = {}
    for d in active:
        path = dev_dir / f"{d.device_id}.json"
        write_atomic(path, MqttCredentials(username=d.device_id, password=plan.logins[d.device_id].password,
                                           device_id=d.device_id).to_json())
        device_files[d.device_id] = path
    stale = [p for p in sorted(dev_dir.glob("*.json"))
             if _DEVICE_ID.fullmatch(p.stem) and p.stem not in device_files]
    miner_files, stale_miners = _login_files(out_dir / "miners", miners, miner_user, plan)
    store_files, stale_stores = _login_files(out_dir / "stores", miners, store_user, plan)
    aggregator_files, stale_aggregators = _login_files(out_dir / "aggregators", miners, aggregator_user, plan)
    party_files, stale_parties = _login_files(out_dir / "parties", parties, party_user, plan)
    stale += stale_miners + stale_stores + stale_aggregators + stale_parties + stale_hosts
    for p in stale:  # revoked devices and removed miners: their login is gone, so is their provisioning file
        p.unlink()
    return BrokerAccess(passwd, acl, bridge_file, device_files, len(registry) - len(active), plan, stale,
                        miner_files, workers, party_files, store_files, aggregator_files, host_files, nats)


def _login_files(folder: Path, ids: Sequence[str], user_of: Callable[[str], str], plan: LoginPlan
                 ) -> tuple[dict[str, Path], list[Path]]:
    """One 0600 credentials file per id in `folder` (`<id>.json`); and the files there of ids no longer listed."""
    files = {}
    for i in ids:
        files[i] = folder / f"{i}.json"
        write_atomic(files[i], MqttCredentials(username=user_of(i), password=plan.logins[user_of(i)].password)
                     .to_json())
    stale = [p for p in sorted(folder.glob("*.json")) if _DEVICE_ID.fullmatch(p.stem) and p.stem not in files]
    return files, stale
