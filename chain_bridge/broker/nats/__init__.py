"""A NATS cluster as carechain's broker tier: node configs, MQTT-topic → subject mapping, per-login permissions.

nats-server (2.9+) runs the MQTT listener devices keep speaking, core NATS for the bridge, and JetStream: the
devices' events are captured by a replicated work-queue stream (`EVENTS_STREAM`, 3 replicas) from which the
bridge pulls through one durable consumer and acknowledges each event only after it is committed
(chain_bridge.ingest.nats_source). This module holds the pure parts — the template filled in per node, the
mapping of our MQTT topics to NATS subjects, and the permissions that mirror the mosquitto ACL of `carechain
bridge acl` as far as NATS can express it (docs/nats.md says what it cannot): `acl_users` turns that ACL's
lines into NATS logins, for the nats-authorization.conf the command writes next to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from carechain import topics

NODE_TEMPLATE = Path(__file__).resolve().parent / "node.conf"
CLUSTER_NAME = "carechain"
EVENTS_STREAM = "CC_EVENTS"  # the work queue of device events
EVENTS_CONSUMER = "carechain-bridge"  # the bridge's durable pull consumer on it
REPLICAS = 3

_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_+#-]+")


def mqtt_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or topic filter, as nats-server maps them: `/` → `.`, `+` → `*`,
    `#` → `>`. Our topics use only letters, digits, `_`, `-` in their levels (nats-server escapes a `.` in a
    level as `//`, which none of ours has): anything else is a `ValueError`."""
    levels = topic.split("/")
    for level in levels:
        if not _TOPIC_LEVEL.fullmatch(level) or (len(level) > 1 and ("+" in level or "#" in level)):
            raise ValueError(f"MQTT topic {topic!r}: level {level!r} has no plain NATS subject token")
    return ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in levels)


EVENTS_SUBJECTS = (mqtt_subject(topics.EVENTS_WILDCARD),)  # cc.v1.dev.*.ev


@dataclass(frozen=True)
class NatsUser:
    """One login with what it may publish and subscribe to (NATS subjects, wildcards allowed)."""

    user: str
    password: str = field(repr=False)
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    connection_types: tuple[str, ...] = ()  # empty: any (core NATS, MQTT, ...); ("MQTT",): MQTT only


# A QoS 1 MQTT subscription is served by a JetStream consumer that delivers to `$MQTT.sub.<session nuid>`; the
# subscribing login needs to be allowed that subject, which nats-server cannot narrow to the session's own.
MQTT_QOS1_DELIVERY = "$MQTT.sub.>"


def device_user(device_id: str, password: str) -> NatsUser:
    """A device's login: the mosquitto ACL's lines for it (its events and status reports out; its receipts and
    the checkpoint in), as subjects."""
    return NatsUser(device_id, password,
                    publish=(mqtt_subject(topics.events(device_id)), mqtt_subject(topics.status(device_id))),
                    subscribe=(mqtt_subject(topics.receipts(device_id)), mqtt_subject(topics.CHECKPOINT),
                               MQTT_QOS1_DELIVERY),
                    connection_types=("MQTT",))


def _jetstream_api(stream: str, consumer: str) -> tuple[str, ...]:
    """What the bridge publishes to the JetStream API: create and read its events stream and durable consumer,
    pull, acknowledge."""
    return ("$JS.API.INFO", f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"$JS.ACK.{stream}.{consumer}.>")


def bridge_user(user: str, password: str, *, stream: str = EVENTS_STREAM, consumer: str = EVENTS_CONSUMER) -> NatsUser:
    """The bridge's login: its mosquitto ACL lines as subjects, plus the JetStream API for its events stream and
    durable consumer (create and read them, pull, acknowledge) and its own reply inboxes."""
    mqtt_out = [topics.receipts("a").replace("/a/", "/+/"), topics.CHECKPOINT, topics.FINAL_CHECKPOINT,
                f"{topics.PREFIX}/miner/+/resp", f"{topics.PREFIX}/party/+/inbox"]
    mqtt_in = [topics.EVENTS_WILDCARD, topics.STATUS_WILDCARD, topics.MINER_REQUEST_WILDCARD,
               topics.MINER_COSIG_WILDCARD, topics.MINER_EVIDENCE_WILDCARD, topics.MINER_HELLO_WILDCARD,
               topics.MINER_STUDY_WILDCARD,
               topics.ACCESS_RECORDS, topics.ACCESS_EVIDENCE]
    return NatsUser(user, password, publish=(*map(mqtt_subject, mqtt_out), *_jetstream_api(stream, consumer)),
                    subscribe=(*map(mqtt_subject, mqtt_in), "_INBOX.>", MQTT_QOS1_DELIVERY))


@dataclass(frozen=True)
class AclRules:
    """One user's lines of a mosquitto ACL: the topics (filters) it may write and read."""

    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()


def acl_rules(acl: str) -> dict[str, AclRules]:
    """Each user's rules in a mosquitto ACL made of `user` and `topic [read|write|readwrite]` lines (as
    chain_bridge.broker.acl.acl_text writes it). A `topic` line before any `user` (a grant to anonymous
    clients) or any other kind of line (`pattern`, ...) has no NATS counterpart here: `ValueError`."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: tuple[list[str], list[str]] | None = None
    for n, raw in enumerate(acl.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user" and len(words) == 2:
            current = rules.setdefault(words[1], ([], []))
        elif words[0] == "topic" and len(words) in (2, 3) and current is not None:
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            if access not in ("read", "write", "readwrite"):
                raise ValueError(f"ACL line {n}: unknown access {access!r}")
            if access != "read":
                current[0].append(topic)
            if access != "write":
                current[1].append(topic)
        else:
            raise ValueError(f"ACL line {n}: {line!r} has no NATS counterpart (only `user` and, after it, "
                             "`topic` lines)")
    return {user: AclRules(tuple(w), tuple(r)) for user, (w, r) in rules.items()}


def acl_users(acl: str, passwords: Mapping[str, str], *, core_nats: Collection[str] = (),
              stream: str = EVENTS_STREAM, consumer: str = EVENTS_CONSUMER) -> list[NatsUser]:
    """The NATS logins of a mosquitto ACL, in the order of `passwords` (user → password; every user must have
    ACL lines): each login may publish what the ACL lets it write and subscribe to what it may read (plus the
    QoS 1 delivery subjects), over MQTT only. The `core_nats` logins (the bridge and its hosts) may also
    connect over core NATS and use the JetStream API of the events' stream and consumer, with reply inboxes."""
    rules = acl_rules(acl)
    missing = sorted(set(passwords) - set(rules))
    if missing:
        raise ValueError(f"the ACL has no lines for {', '.join(missing)}")
    users = []
    for user, password in passwords.items():
        r = rules[user]
        publish = tuple(map(mqtt_subject, r.write))
        subscribe = (*map(mqtt_subject, r.read), MQTT_QOS1_DELIVERY) if r.read else ()
        if user in core_nats:
            users.append(NatsUser(user, password, publish=(*publish, *_jetstream_api(stream, consumer)),
                                  subscribe=(*subscribe, "_INBOX.>"), connection_types=("STANDARD", "MQTT")))
        else:
            users.append(NatsUser(user, password, publish, subscribe, connection_types=("MQTT",)))
    return users


def _quoted(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _permission(allowed: Sequence[str]) -> str:
    # nats-server reads an empty allow list as no restriction at all: nothing allowed must be said as a deny.
    return f"{{allow: {_quoted(allowed)}}}" if allowed else '{deny: [">"]}'


def authorization_block(users: Sequence[NatsUser]) -> str:
    """The `authorization` block: one entry per login with its allow lists; anything not listed is denied.
    `carechain bridge acl` passes bcrypt hashes as the passwords (nats-server reads `$2a$`); the file is 0600."""
    if not users:
        return "# no authorization block: any client may connect (tests only)"
    lines = ["authorization {", "    users: ["]
    for u in users:
        lines.append(f"        {{user: {json.dumps(u.user)}, password: {json.dumps(u.password)}, permissions: {{")
        lines.append(f"            publish: {_permission(u.publish)}")
        lines.append(f"            subscribe: {_permission(u.subscribe)}")
        types = f", allowed_connection_types: {_quoted(u.connection_types)}" if u.connection_types else ""
        lines.append(f"        }}{types}}}")
    lines += ["    ]", "}"]
    return "\n".join(lines)


@dataclass(frozen=True)
class NodePorts:
    client: int
    cluster: int
    mqtt: int
    http: int


def render_node(name: str, ports: NodePorts, all_ports: Sequence[NodePorts], store_dir: Path, *,
                host: str = "127.0.0.1", users: Sequence[NatsUser] = (), cluster_name: str = CLUSTER_NAME,
                max_file_store: str = "1GB", mqtt_tls: str = "", authorization_include: str = "") -> str:
    """The config text of node `name`: its listeners on `host`, routes to every node of `all_ports`. Its logins
    are `users`, or the file `authorization_include` names (relative to the node's config file, as nats-server
    resolves an `include`): the nats-authorization.conf of `carechain bridge acl`."""
    if users and authorization_include:
        raise ValueError("give the node its logins either as users or as an authorization file to include")
    authorization = (f"include {json.dumps(authorization_include)}" if authorization_include
                     else authorization_block(users))
    routes = "\n".join(f"        nats-route://{host}:{p.cluster}" for p in all_ports)
    return Template(NODE_TEMPLATE.read_text()).substitute(
        server_name=name, host=host, client_port=ports.client, http_port=ports.http, mqtt_port=ports.mqtt,
        cluster_port=ports.cluster, cluster_name=cluster_name, routes=routes, store_dir=str(store_dir),
        max_file_store=max_file_store, mqtt_tls=mqtt_tls, authorization=authorization)
