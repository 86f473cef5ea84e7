"""Access benchmark (issue 13): grant → opened latency through 5 miners, and opening a day of 1 Hz heart rate.

One run, on one machine: a private mosquitto, `carechain bridge` (contracts on, final = 3 of 5 cosignatures,
checkpoints every --interval s) and five `carechain miner` processes share its cores with the requester
(tests/access_world.py builds the deployment). The patient's band sends a sealed reading every second
throughout (the log must grow for a new checkpoint, as in a deployment).

  grant → opened   the owner's [request, grant] appended to the ledger (as `carechain access grant` does)
                   → every reading of the last hour checked and decrypted by the requester
                   (`record_access.client.open_access`, as `carechain access open` does), over --grants
                   grants, one at a time. Finality is included: the requester asks the bridge once the
                   grant is under a final checkpoint (cc/v1/log/final), since the bridge refuses before.
                   Split into grant → final and final → opened. Timed from the append: the owner's tool
                   first dry-runs the entries against a replay of the whole ledger (`submit`), which grows
                   with the ledger (seconds for a day of 1 Hz readings) and is reported on its own.
  open one day     --days of 1 Hz readings (86,400 a day) of one device, sealed with the agent's code and
                   appended straight into the ledger before the processes start (set-up in seconds, not
                   days); then grant → opened for exactly those days, and the open alone (pages from the
                   bridge, ≥ 3 verified capsule fragments per hourly epoch, each reading's hash, device
                   signature and AEAD checked, in worker processes).
  30 days          measured with --days 30 (set-up: ~2.6 M readings sealed and replayed by the bridge and by
                   each miner: tens of minutes here); otherwise EXTRAPOLATED linearly from the days
                   measured, and marked so ("extrapolated": true): the open is linear in readings (pages,
                   checks) plus one capsule per epoch per miner.

    python bench/access.py [--grants 10] [--days 1] [--interval 1.0] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import topics  # noqa: E402
from carechain.config import BrokerConfig  # noqa: E402
from carechain.transport import connect_client  # noqa: E402
from chain_bridge.contract_admin import submit  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import ledger_path  # noqa: E402
from record_access import access_context, build_grant, build_request  # noqa: E402
from record_access.client import inbox_client_id, open_access  # noqa: E402
from record_access.ledger_view import registered_miners  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402
from tests.access_world import HOUR_MS, AccessWorld, now_ms, wait_for  # noqa: E402

DAY_MS = 24 * HOUR_MS


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {"p50_ms": r(percentile(values, 0.5)), "p90_ms": r(percentile(values, 0.9)),
            "max_ms": r(max(values) if values else None), "n": len(values)}


def subscribe_inbox(world: AccessWorld) -> None:
    """The requester's persistent session on its inbox (as `carechain access request --send` leaves it), so
    the capsule fragments miners send before the open starts wait in the broker."""
    import threading

    ready = threading.Event()
    client = connect_client(world.broker, inbox_client_id(world.doctor.id), clean_session=False,
                            subscriptions=[(topics.party_inbox(world.doctor.id), 1)], connected=ready)
    if not ready.wait(30):
        raise SystemExit("broker not reachable")
    time.sleep(0.5)  # the SUBACK: the subscription is part of the session from here on
    client.disconnect()
    client.loop_stop()


def grant_and_open(world: AccessWorld, from_ms: int, to_ms: int, workers: int | None,
                   timeout: float) -> dict[str, Any]:
    """Sign a request and its grant, append both (t0), wait for the grant to be final (t1), open (t2)."""
    assert world.observer is not None
    state = world.state()
    now = now_ms()
    req = build_request(world.doctor.identity, owner=world.patient.id, devices=[], kinds=[], from_ms=from_ms,
                        to_ms=to_ms, purpose="benchmark", expires_ms=now + DAY_MS,
                        nonce=int.from_bytes(os.urandom(7), "big"), ts=now)
    built = build_grant(world.patient.identity, world.patient.pre, req, requester_pre_pk=world.doctor.pre.public_key,
                        miners=registered_miners(state), final_note=world.observer.latest_final(),
                        expires_ms=now + DAY_MS, ts=now)
    ledger = Ledger(ledger_path(world.bridge_dir))
    try:
        ts = time.monotonic()
        # The owner's tool dry-runs the entries against a replay of the whole ledger, then appends (t0).
        access = submit(ledger, world.genesis, [req.entry, built.entry])[1]
        t0 = time.monotonic()
    finally:
        ledger.close()
    observer = world.observer
    wait_for(f"grant {access} to become final", lambda: observer.final_size() > access, timeout, world.logs)
    t1 = time.monotonic()
    ctx = access_context(world.state(), access)  # the requester's replica (not timed: it has one already)
    t1b = time.monotonic()
    marks: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        marks[phase] = time.monotonic()  # the last "pages" mark: every page in; "records": checks under way

    result = open_access(world.broker, world.doctor.identity, world.doctor.pre, ctx, timeout=timeout,
                         workers=workers, progress=progress)
    t2 = time.monotonic()
    expected = len(world.sent_between(from_ms, to_ms))
    if result.problems or len(result.readings) != expected:
        raise SystemExit(f"grant {access}: opened {len(result.readings)} of {expected} readings, "
                         f"problems {[p.to_json() for p in result.problems[:5]]}")
    return {"access": access, "readings": len(result.readings), "epochs": result.epochs,
            "miners": len(result.miners), "submit_s": t0 - ts, "grant_to_final_s": t1 - t0, "open_s": t2 - t1b,
            "grant_to_opened_s": (t1 - t0) + (t2 - t1b),
            "pages_s": marks.get("pages", t1b) - t1b, "after_pages_s": t2 - marks.get("pages", t1b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grants", type=int, default=10, help="grants for the latency figure")
    ap.add_argument("--days", type=int, default=1, help="days of 1 Hz readings to open (30 = the real 30 days)")
    ap.add_argument("--interval", type=float, default=1.0, help="checkpoint interval, seconds")
    ap.add_argument("--workers", type=int, default=None, help="requester's worker processes (default: cores)")
    ap.add_argument("--keep", action="store_true", help="keep the processes' data dirs and logs (printed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out: dict[str, Any] = {"miners": 5, "threshold": 3, "checkpoint_interval_s": args.interval,
                           "cores": os.cpu_count()}
    day0 = (now_ms() // DAY_MS - args.days) * DAY_MS  # whole UTC days, ending at today's midnight
    day_readings = [day0 + 1000 * i for i in range(args.days * 86_400)]
    with (contextlib.nullcontext(tempfile.mkdtemp(prefix="carechain-bench-access-")) if args.keep
          else tempfile.TemporaryDirectory(prefix="carechain-bench-access-")) as tmp:
        out["kept"] = tmp if args.keep else None
        with Mosquitto(Path(tmp) / "mosquitto") as broker:
            world = AccessWorld(Path(tmp) / "world", BrokerConfig(host=broker.host, port=broker.port),
                                checkpoint_interval_s=args.interval, max_packet_bytes=1024 * 1024)
            try:
                t = time.monotonic()
                world.start(before_processes=lambda: world.prefill(day_readings))
                start = now_ms() - 50 * 60_000
                world.publish_readings([start + 60_000 * i for i in range(50)])  # the last hour, one a minute
                world.stream(1.0)
                size = world.ledger_size()
                world.wait_final(size, timeout=1800)
                # Steady state: every miner has replayed the pre-filled log (a final checkpoint needs only 3 of
                # them; the other 2 would still be replaying on these same cores while we measure).
                observer = world.observer
                assert observer is not None
                wait_for("all five miners caught up", lambda: len(observer.cosigners_at_or_after(size)) == 5,
                         1800, world.logs)
                out["setup_s"] = round(time.monotonic() - t, 1)
                subscribe_inbox(world)

                runs = []
                for _ in range(args.grants):
                    now = now_ms()
                    runs.append(grant_and_open(world, now - HOUR_MS, now, args.workers, timeout=120))
                out["grant_to_opened"] = {
                    **summary_ms([r["grant_to_opened_s"] for r in runs]),
                    "grant_to_final": summary_ms([r["grant_to_final_s"] for r in runs]),
                    "final_to_opened": summary_ms([r["open_s"] for r in runs]),
                    "readings_per_open": runs[-1]["readings"] if runs else 0, "target_p50_ms": 2000,
                    "owner_submit_not_included": summary_ms([r["submit_s"] for r in runs])}

                if args.days == 0:
                    return finish(out, args)
                day = grant_and_open(world, day0, day0 + args.days * DAY_MS - 1, args.workers, timeout=1800)
                out["open_days"] = {"days": args.days, "readings": day["readings"], "epochs": day["epochs"],
                                    "open_s": round(day["open_s"], 2),
                                    "grant_to_opened_s": round(day["grant_to_opened_s"], 2),
                                    "owner_submit_s": round(day["submit_s"], 2),
                                    "open_s_per_day": round(day["open_s"] / args.days, 2),
                                    "pages_s": round(day["pages_s"], 2),
                                    "fragments_keys_and_checks_s": round(day["after_pages_s"], 2),
                                    "target_one_day_s": 5.0}
                per_day = day["open_s"] / args.days
                out["thirty_days"] = ({"open_s": round(day["open_s"], 2), "extrapolated": False}
                                      if args.days >= 30 else
                                      {"open_s": round(per_day * 30, 1), "extrapolated": True,
                                       "from_days": args.days})
            finally:
                world.stop()
    finish(out, args)


def finish(out: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(out))
        return
    print(f"set-up: {out['setup_s']} s on {out['cores']} core(s)")
    g = out["grant_to_opened"]
    print(f"grant → opened ({g['n']} grants, {g['readings_per_open']} readings each, 5 miners, 3-of-5, "
          f"{args.interval:g} s checkpoints): p50 {g['p50_ms']} ms, p90 {g['p90_ms']} ms, max {g['max_ms']} ms "
          f"(target < 2000 ms p50)")
    print(f"  of which grant → final p50 {g['grant_to_final']['p50_ms']} ms, final → opened p50 "
          f"{g['final_to_opened']['p50_ms']} ms; not included: the owner's tool checking the grant against a "
          f"replay of the whole ledger before appending it, p50 {g['owner_submit_not_included']['p50_ms']} ms")
    if "open_days" not in out:
        return
    d = out["open_days"]
    print(f"open {d['days']} day(s) of 1 Hz heart rate ({d['readings']} readings, {d['epochs']} epochs): "
          f"{d['open_s']} s (grant → opened {d['grant_to_opened_s']} s; target < 5 s for one day; the owner's "
          f"dry-run replay before appending: {d['owner_submit_s']} s)")
    print(f"  of which every records page in: {d['pages_s']} s, then data keys and the checks of every reading "
          f"(hash, device signature, AEAD, body): {d['fragments_keys_and_checks_s']} s")
    th = out["thirty_days"]
    print(f"open 30 days: {th['open_s']} s" + (f" (EXTRAPOLATED from {th['from_days']} day(s), not measured)"
                                                if th["extrapolated"] else " (measured)"))



if __name__ == "__main__":
    main()
