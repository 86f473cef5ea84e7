"""Storage over the network (issue 7): put/get MB/s through a private mosquitto to 8 miner processes, against
raw AES-256-GCM + zfec measured in the same run (bench/storage.py's `run`), and audit bandwidth.

Everything runs on this machine: one mosquitto on loopback, 8 `python -m chain_miner.storage_server` processes
(shares on disk in temporary data dirs), one StorageClient (default window of requests in flight). Rates are
MB (10^6 bytes) of dataset plaintext per second, wall clock, including encryption, coding, hashing, CBOR,
MQTT (QoS 1) and the miners' disk writes; put waits for every share's acknowledgement, a store receipt each
miner signs over the share's Merkle root (computed from the bytes it received) and the client verifies. Every
get is a signed retrieval request answered with a signed answer, recorded by the client. Audit figures: one
audit round over the stored dataset at the default schedule's challenges per miner (timed, and its answer
bytes computed), and bytes per stored TB per month from `audit.AuditSchedule`.

    python bench/storage_network.py [--mib 16] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain.config import BrokerConfig  # noqa: E402
from carechain.storage import audit  # noqa: E402
from carechain.storage.codec import StorageParams  # noqa: E402
from carechain.storage.keyfile import load_dataset_key  # noqa: E402
from chain_bridge.storage_client import StorageClient, key_path, load_receipts, receipts_path  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402

MINERS = 8


def _raw_bench():  # noqa: ANN202 - bench/storage.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("bench_storage", REPO / "bench" / "storage.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_miners(root: Path, broker: BrokerConfig, count: int) -> list[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(count):
        d = root / f"miner{i}"
        d.mkdir()
        err = open(d / "stderr.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen([sys.executable, "-m", "chain_miner.storage_server", "--data-dir", str(d),
                                       "--broker", broker.address], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=err, text=True))
    out = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"a miner did not start; see {root}/miner*/stderr.log")
        out.append((p, json.loads(line)["miner"]))
    return out


def run(mib: int) -> dict[str, object]:
    params = StorageParams()
    raw = _raw_bench().run(mib, params.k, params.n)
    data = os.urandom(mib << 20)
    mb = len(data) / 1e6
    with tempfile.TemporaryDirectory(prefix="cc-storage-net-") as tmp:
        root = Path(tmp)
        with Mosquitto(root / "mosquitto") as mq:
            broker = BrokerConfig(host=mq.host, port=mq.port)
            miners = start_miners(root, broker, MINERS)
            try:
                ids = [m for _, m in miners]
                with StorageClient(broker, timeout=30.0) as client:
                    path = root / "bench.manifest.json"
                    t = time.perf_counter()
                    manifest = client.put(data, ids, bytes(32), path, params=params)
                    t_put = time.perf_counter() - t
                    receipts = len(load_receipts(receipts_path(path)))
                    key = load_dataset_key(key_path(path), manifest.dataset_id)
                    t = time.perf_counter()
                    back = client.get(manifest, key)
                    t_get = time.perf_counter() - t
                    if back != data:
                        raise SystemExit("get returned different bytes")
                    schedule = audit.AuditSchedule()
                    c = schedule.challenges_per_miner_epoch
                    t = time.perf_counter()
                    verdicts = client.audit(manifest, bytes(range(32)), challenges=c)
                    t_audit = time.perf_counter() - t
                    if not all(v.passed for v in verdicts.values()):
                        raise SystemExit(f"audit failed: {verdicts}")
                    sent = client.bytes_sent
            finally:
                for p, _ in miners:
                    p.terminate()
                for p, _ in miners:
                    p.wait(10)
    a = raw["audit"]
    assert isinstance(a, dict)
    return {
        "data_mib": mib, "k": params.k, "n": params.n, "miners": MINERS, "segments": len(manifest.segments),
        "share_bytes_uploaded": sent, "store_receipts": receipts, "signed_retrievals": len(client.retrieval_log),
        "raw_aes_gcm_MBps": raw["raw_aes_gcm_MBps"], "raw_put_MBps": raw["raw_put_MBps"],
        "raw_get_MBps": raw["raw_get_MBps"],
        "local_put_MBps": raw["put_MBps"], "local_get_MBps": raw["get_MBps"],
        "net_put_MBps": round(mb / t_put, 1), "net_get_MBps": round(mb / t_get, 1),
        "net_put_vs_raw": round(mb / t_put / float(raw["raw_put_MBps"]), 3),
        "net_get_vs_raw": round(mb / t_get / float(raw["raw_get_MBps"]), 3),
        "audit_round": {"challenges_per_miner": c, "miners": len(verdicts), "seconds": round(t_audit, 3),
                        "answer_bytes": c * len(verdicts) * a["bytes_per_challenge"]},
        "audit": a,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=16, help="dataset size in MiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.mib)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['data_mib']} MiB, {r['segments']} segments, k={r['k']} n={r['n']}, {r['miners']} miner processes, "
          f"{r['share_bytes_uploaded']} share bytes uploaded, {r['store_receipts']} store receipts verified, "
          f"{r['signed_retrievals']} signed retrievals recorded")
    print(f"raw AES-GCM + zfec (put / get path)  {r['raw_put_MBps']} / {r['raw_get_MBps']} MB/s")
    print(f"in-process put / get (no network)    {r['local_put_MBps']} / {r['local_get_MBps']} MB/s")
    print(f"network put                          {r['net_put_MBps']} MB/s ({r['net_put_vs_raw']:.3f} × raw)")
    print(f"network get                          {r['net_get_MBps']} MB/s ({r['net_get_vs_raw']:.3f} × raw)")
    ar, a = r["audit_round"], r["audit"]
    print(f"audit round: {ar['challenges_per_miner']} challenges × {ar['miners']} miners in {ar['seconds']} s, "
          f"{ar['answer_bytes']} B of answers")
    print(f"audit bandwidth: {a['bytes_per_miner_month'] / 1e6:.1f} MB per miner-month; "
          f"GB per stored TB-month: {a['GB_per_TB_month']}")


if __name__ == "__main__":
    main()
