"""Storage benchmark (issue 7): put and get throughput against raw AES-GCM and raw zfec, and audit costs.

Measured in one run, on one machine, single-threaded, on random data held in memory (no disk, no network):
  raw AES-GCM       AES-256-GCM seal of each segment (the `cryptography` primitive alone)
  raw zfec          zfec encode of each segment's ciphertext into n shares / decode from k (alone)
  put               plan_put: seal + zfec encode + one Merkle root per share (1 KiB chunks) + placement
  get               decode_dataset from the k highest-numbered shares (check k roots + zfec decode + open);
                    the worst case: all k are check shares, none is a primary block
Rates are MB of *dataset plaintext* per second (MB = 10^6 bytes). Audit figures use the default schedule
(`audit.AuditSchedule`) and the default shapes (1 MiB segments, k = 4, n = 8, 1 KiB chunks).

    python bench/storage.py [--mib 64] [--k 4] [--n 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zfec  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from carechain.storage import audit  # noqa: E402
from carechain.storage.codec import DatasetKey, StorageParams, split_segments  # noqa: E402
from carechain.storage.manifest import decode_dataset, plan_put  # noqa: E402

TB = 10**12


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(mib: int, k: int, n: int) -> dict[str, object]:
    params = StorageParams(k=k, n=n)
    data = os.urandom(mib << 20)
    mb = len(data) / 1e6
    segments = split_segments(data, params.segment_size)
    key_bytes = os.urandom(32)
    aead = AESGCM(key_bytes)

    def raw_aes() -> list[bytes]:
        return [aead.encrypt(i.to_bytes(12, "big"), s, None) for i, s in enumerate(segments)]

    t_aes, cts = timed(raw_aes)
    size = params.share_length(len(cts[0]))
    blocks = [tuple(c[j * size:(j + 1) * size].ljust(size, b"\0") for j in range(k)) for c in cts]
    enc = zfec.Encoder(k, n)
    t_zenc, coded = timed(lambda: [enc.encode(b) for b in blocks])
    dec = zfec.Decoder(k, n)
    nums = tuple(range(n - k, n))
    t_zdec, _ = timed(lambda: [dec.decode(tuple(c[i] for i in nums), nums) for c in coded])

    key = DatasetKey("bench", key_bytes)
    miners = [f"miner-{i}" for i in range(2 * n)]
    t_put, plan = timed(lambda: plan_put(key, "owner", data, miners, bytes(32), params))
    held = {e.index: {i: e.shares[i] for i in nums} for e in plan.upload}
    t_get, back = timed(lambda: decode_dataset(key, plan.manifest, held))
    if back != data:
        raise SystemExit("get returned different bytes")

    chunks_per_share = -(-size // params.chunk_size)
    schedule = audit.AuditSchedule()
    per_challenge = audit.bytes_per_challenge(params.chunk_size, chunks_per_share)
    raw_put = mb / (t_aes + t_zenc)
    raw_get = mb / (t_aes + t_zdec)  # AES-GCM open costs the same as seal
    return {
        "data_mib": mib, "k": k, "n": n, "segment_size": params.segment_size, "chunk_size": params.chunk_size,
        "segments": len(segments), "share_bytes": size, "storage_overhead": n / k,
        "raw_aes_gcm_MBps": round(mb / t_aes, 1),
        "raw_zfec_encode_MBps": round(mb / t_zenc, 1),
        "raw_zfec_decode_MBps": round(mb / t_zdec, 1),
        "raw_put_MBps": round(raw_put, 1), "raw_get_MBps": round(raw_get, 1),
        "put_MBps": round(mb / t_put, 1), "get_MBps": round(mb / t_get, 1),
        "put_vs_raw": round((mb / t_put) / raw_put, 3), "get_vs_raw": round((mb / t_get) / raw_get, 3),
        "audit": {
            "challenges_for_999": {str(f): audit.challenges_needed(f) for f in (0.01, 0.05, 0.10, 0.50)},
            "bytes_per_challenge": per_challenge,
            "schedule": {"challenges_per_miner_epoch": schedule.challenges_per_miner_epoch,
                         "epochs_per_month": schedule.epochs_per_month},
            "bytes_per_miner_month": schedule.bytes_per_miner_month(params.chunk_size, chunks_per_share),
            "GB_per_TB_month": {f"{tb}TB_per_miner": round(
                schedule.bytes_per_tb_month(params.chunk_size, chunks_per_share, tb) / 1e9, 4)
                for tb in (0.1, 1, 10)},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="dataset size in MiB")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.mib, args.k, args.n)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['data_mib']} MiB, {r['segments']} segments, k={r['k']} n={r['n']}, shares of {r['share_bytes']} B")
    print(f"raw AES-GCM       {r['raw_aes_gcm_MBps']:>8} MB/s")
    print(f"raw zfec enc/dec  {r['raw_zfec_encode_MBps']:>8} / {r['raw_zfec_decode_MBps']} MB/s")
    print(f"put               {r['put_MBps']:>8} MB/s  ({r['put_vs_raw']:.2f} × raw AES-GCM + zfec encode)")
    print(f"get               {r['get_MBps']:>8} MB/s  ({r['get_vs_raw']:.2f} × raw zfec decode + AES-GCM)")
    a = r["audit"]
    print(f"audit: challenges for 99.9 %: {a['challenges_for_999']}; {a['bytes_per_challenge']} B per challenge")
    print(f"audit: {a['schedule']} -> {a['bytes_per_miner_month'] / 1e6:.1f} MB per miner-month; "
          f"GB per stored TB-month: {a['GB_per_TB_month']}")


if __name__ == "__main__":
    main()
