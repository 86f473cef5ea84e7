"""Peer benchmark: ThingsBoard IoT Gateway's MQTT connector and `carechain bridge` on the same devices, load and
mosquitto, one after the other in one run.

ThingsBoard IoT Gateway (PyPI `thingsboard-gateway`) is installed into a venv of its own under the cache
directory (`--venv`, default ~/.cache/carechain-bench/tb-venv), never into this project's. Its MQTT connector
subscribes to the devices' topic `cc/v1/dev/+/ev` (device name from the topic) and forwards every reading as
telemetry to "ThingsBoard" — which this script plays on the same mosquitto: it answers the gateway's
`getSessionLimits` RPC (without that answer the gateway forwards nothing) with no rate limits, and counts the
entries arriving on `v1/gateway/telemetry`. The gateway reads JSON, so its devices send each reading as JSON
({"bpm", "seq", "ts"}); carechain's send the same readings signed (COSE_Sign1), which the bridge verifies,
anchors (fsync) and receipts. Both get the same number of messages from the same ≥ 1,000 devices.

Printed for each gateway: entries/s (ThingsBoard: telemetry entries forwarded; carechain: events anchored),
CPU (% of one core) and peak RSS of the gateway's processes and of the broker.

    python bench/peer_thingsboard.py [--events 20000] [--devices 1000] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import (  # noqa: E402
    CELL_TIMEOUT_S,
    Bridge,
    Meter,
    MosquittoTier,
    Publishers,
    anchored_rate,
    fleet,
    register,
    signed_load,
)
from carechain import topics  # noqa: E402

TB_VERSION = "3.8.5"
DEFAULT_VENV = Path.home() / ".cache" / "carechain-bench" / "tb-venv"
START_TIMEOUT_S = 90.0
# The platform's answer to `getSessionLimits`: no rate limits, room for many messages in flight.
SESSION_LIMITS = {"rateLimits": {}, "gatewayRateLimits": {}, "maxInflightMessages": 10_000,
                  "maxPayloadSize": 10_000_000}


class GatewayNotInstalled(RuntimeError):
    """thingsboard-gateway could not be installed or started here; the message says exactly why."""


def ensure_gateway(venv: Path) -> Path:
    """The `thingsboard-gateway` executable in `venv`, installing it from the package registry if missing."""
    exe = venv / "bin" / "thingsboard-gateway"
    if exe.exists():
        return exe
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"thingsboard-gateway=={TB_VERSION}"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise GatewayNotInstalled(f"`{' '.join(step)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    if not exe.exists():
        raise GatewayNotInstalled(f"thingsboard-gateway {TB_VERSION} installed into {venv}, but {exe} is missing")
    return exe


def gateway_config(config_dir: Path, venv: Path, port: int) -> None:
    """tb_gateway.json (platform = the bench's mosquitto, memory storage) and the MQTT connector's mapping."""
    shipped = next(venv.glob("lib/python3*/site-packages/thingsboard_gateway/config"))
    config_dir.mkdir(parents=True)
    shutil.copy(shipped / "logs.json", config_dir / "logs.json")  # the shipped logging, as a user runs it
    main = json.loads((shipped / "tb_gateway.json").read_text())
    main["thingsboard"].update({"host": "127.0.0.1", "port": port, "remoteConfiguration": False,
                                "security": {"type": "accessToken", "accessToken": "bench-gateway"}})
    main["thingsboard"]["statistics"]["enable"] = False
    main["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": 1_000_000}
    main["connectors"] = [{"type": "mqtt", "name": "devices", "configuration": "mqtt.json"}]
    (config_dir / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    connector = {
        "broker": {"host": "127.0.0.1", "port": port, "clientId": "tb-gateway-devices", "version": 5,
                   "maxMessageNumberPerWorker": 10, "maxNumberOfWorkers": 100, "cleanSession": True,
                   "cleanStart": True, "sessionExpiryInterval": 0, "security": {"type": "anonymous"}},
        "mapping": [{
            "topicFilter": topics.EVENTS_WILDCARD, "subscriptionQos": 1,
            "converter": {
                "type": "json",
                "deviceInfo": {"deviceNameExpressionSource": "topic",
                               "deviceNameExpression": f"(?<={topics.PREFIX}/dev/)(.*?)(?=/ev)",
                               "deviceProfileExpressionSource": "constant", "deviceProfileExpression": "band"},
                "timeout": 60000,
                "attributes": [],
                "timeseries": [{"type": "integer", "key": "bpm", "value": "${bpm}"},
                               {"type": "integer", "key": "seq", "value": "${seq}"}],
            },
        }],
    }
    (config_dir / "mqtt.json").write_text(json.dumps(connector, indent=2))


class Platform:
    """ThingsBoard's side of the gateway's MQTT session, on the same mosquitto: session limits, telemetry count."""

    def __init__(self, port: int) -> None:
        self.entries = 0
        self.last_at = 0.0
        self.limits_asked = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="bench-platform")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("v1/devices/me/rpc/request/+", 1), ("v1/gateway/telemetry", 1)])
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("v1/devices/me/rpc/request/"):
            request = json.loads(msg.payload)
            if request.get("method") == "getSessionLimits":
                request_id = msg.topic.rsplit("/", 1)[1]
                client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(SESSION_LIMITS), qos=1)
                self.limits_asked.set()
            return
        body: dict[str, Any] = json.loads(msg.payload)
        n = sum(len(v) if isinstance(v, list) else 1 for v in body.values())
        with self._lock:
            self.entries += n
            self.last_at = time.perf_counter()

    def count(self) -> int:
        with self._lock:
            return self.entries

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def json_load(devices: list[Any], count: int) -> list[tuple[str, bytes, int]]:
    """The same readings as the signed load, as JSON: (topic, payload, device index)."""
    now = int(time.time() * 1000)
    return [(topics.events(devices[i % len(devices)].device_id),
             json.dumps({"bpm": 60 + (i // len(devices)) % 40, "seq": i // len(devices), "ts": now}).encode(),
             i % len(devices)) for i in range(count)]


def run_thingsboard(exe: Path, venv: Path, work: Path, tier: MosquittoTier, devices: list[Any],
                    count: int) -> dict[str, Any]:
    config_dir = work / "tb" / "config"
    gateway_config(config_dir, venv, tier.ports[0])
    platform = Platform(tier.ports[0])
    log = (work / "tb" / "gateway.out").open("wb")
    proc = subprocess.Popen([str(exe)], cwd=work / "tb", stdout=log, stderr=subprocess.STDOUT,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(work), "TB_GW_CONFIG_DIR": str(config_dir)})
    pubs = Publishers(tier.ports, "bench-tb-pub")
    try:
        if not platform.limits_asked.wait(START_TIMEOUT_S):
            raise GatewayNotInstalled(f"thingsboard-gateway never asked for its session limits within "
                                      f"{START_TIMEOUT_S:.0f} s; its output: {_tail(work / 'tb' / 'gateway.out')}")
        # Ready when a reading published now comes out as telemetry (its connector has subscribed).
        deadline = time.monotonic() + START_TIMEOUT_S
        while platform.count() == 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise GatewayNotInstalled(f"thingsboard-gateway forwarded nothing within {START_TIMEOUT_S:.0f} s; "
                                          f"its output: {_tail(work / 'tb' / 'gateway.out')}")
            pubs.publish_raw(topics.events(devices[0].device_id), b'{"bpm": 1, "seq": -1, "ts": 0}', 0)
            time.sleep(0.5)
        # Warm up: the gateway announces each new device to the platform (`v1/gateway/connect`, waiting for
        # its PUBACK) before forwarding its first reading; measured is the steady state, every device known.
        warm = platform.count() + len(devices)
        for i, dev in enumerate(devices):
            pubs.publish_raw(topics.events(dev.device_id), b'{"bpm": 1, "seq": -1, "ts": 0}', i)
        while platform.count() < warm and time.monotonic() < deadline + START_TIMEOUT_S:
            time.sleep(0.2)
        base = platform.count()
        load = json_load(devices, count)
        meter = Meter({"tb-gateway": psutil.Process(proc.pid), **tier.processes()})
        with meter.phase() as resources:
            t0 = time.perf_counter()
            for topic, payload, device in load:
                pubs.publish_raw(topic, payload, device)
            deadline = time.monotonic() + CELL_TIMEOUT_S
            stalled_since, last = time.monotonic(), 0
            while platform.count() - base < count and time.monotonic() < deadline:
                time.sleep(0.1)
                now = platform.count()
                if now != last:
                    stalled_since, last = time.monotonic(), now
                elif time.monotonic() - stalled_since > 15:
                    break  # nothing more for 15 s: what it forwarded is what it will forward
            forwarded = platform.count() - base
            eps = forwarded / ((platform.last_at or time.perf_counter()) - t0)
        return {"gateway": f"thingsboard-gateway {TB_VERSION}", "entries_per_s": round(eps, 1),
                "entries": forwarded, "sent": count, "resources": resources}
    finally:
        pubs.close()
        platform.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-1500:] if path.exists() else "(no output)"


def run_carechain(work: Path, tier: MosquittoTier, devices: list[Any], count: int, workers: int) -> dict[str, Any]:
    template = work / "template"
    register(template, devices)
    messages, _ = signed_load(devices, count, 1)
    cell = work / "carechain"
    cell.mkdir()
    bridge = Bridge(cell, template, tier, workers)
    pubs = Publishers(tier.ports, "bench-cc-pub")
    try:
        meter = Meter({**bridge.processes(), **tier.processes()})
        with meter.phase() as resources:
            eps, anchored = anchored_rate(bridge, pubs, messages)
    finally:
        pubs.close()
        bridge.stop()
    return {"gateway": f"carechain bridge ({workers} workers)", "entries_per_s": round(eps, 1), "entries": anchored,
            "sent": count, "resources": resources}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="carechain bridge ingest workers")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where thingsboard-gateway is installed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    try:
        exe = ensure_gateway(args.venv)
    except GatewayNotInstalled as exc:
        sys.exit(f"blocked: {exc}")
    work = Path(tempfile.mkdtemp(prefix="cc-bench-peer-"))
    try:
        devices = fleet(args.devices)
        tier = MosquittoTier(work / "mosquitto")
        try:
            say(f"thingsboard-gateway {TB_VERSION}: {args.events} readings from {args.devices} devices…")
            tb = run_thingsboard(exe, args.venv, work, tier, devices, args.events)
            say("carechain bridge: the same readings, signed…")
            cc = run_carechain(work, tier, devices, args.events, args.workers)
        finally:
            tier.stop()
    except GatewayNotInstalled as exc:
        sys.exit(f"blocked: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [tb, cc]
    if args.json:
        print(json.dumps({"devices": args.devices, "events": args.events, "gateways": rows}))
        return
    for r in rows:
        res = "  ".join(f"{n} {v['cpu_pct']:.0f}% / {v['rss_mb']:.0f} MB" for n, v in r["resources"].items())
        print(f"{r['gateway']:<34} {r['entries_per_s']:>9,.0f} entries/s ({r['entries']} of {r['sent']})  {res}")


if __name__ == "__main__":
    main()
