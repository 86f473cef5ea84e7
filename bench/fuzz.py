"""Fuzz the bridge's ingest check with ≥100,000 hostile inputs and report what happened to each.

Every input goes through `chain_bridge.ingest.Ingest.check` (envelope parsing, registry lookup, signature,
payload validation, time limits) with a registry that holds the real signing device, so mutated payloads
that are signed for real reach the checks behind the signature. An input must either be refused with a
reason from the table in docs/protocol.md or be accepted as an event that an independent check (cbor2's
canonical encoding, a hand-built Sig_structure, the registered key, the pydantic models) confirms.

Counted as bugs, with the first few reproducers saved to --crash-dir: any other exception (crash), an
input that takes longer than --hang-ms (hang), a reason not in the docs, an accepted input that the
independent check refuses.

Generators (mixed, seeded): random bytes; random bytes behind a COSE_Sign1 head; byte-level mutations of
real signed events (bit flips, truncation, insertion, deletion, splicing, special bytes); hostile payloads
(wrong types, NaN/inf, huge and negative seq/ts, odd Unicode, tags, deep nesting, huge declared lengths,
indefinite lengths, duplicate keys, long-form integers) and hostile kids, signed with the real key; and
genuine events as a control.

    python bench/fuzz.py [--inputs 100000] [--seed 1] [--json] [--crash-dir DIR] [--hang-ms 1000]
    python bench/fuzz.py --atheris [libFuzzer flags, e.g. -runs=200000 -max_len=4096]   # coverage-guided
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope  # noqa: E402
from carechain.config import Limits  # noqa: E402
from carechain.events import EventPayload, make_payload  # noqa: E402
from carechain.identity import Identity, verify_signature  # noqa: E402
from chain_bridge.ingest import Ingest, Rejection  # noqa: E402
from chain_bridge.ledger.store import DeviceRecord, EventCandidate  # noqa: E402
from simulators.hostile import SAMPLE_BODIES, documented_reasons  # noqa: E402

DEVICE = Identity.from_seed(b"\x05" * 32)
OTHER = Identity.from_seed(b"\x06" * 32)
NOW_MS = 1_800_000_000_000
REGISTRY = {DEVICE.device_id: DeviceRecord(DEVICE.device_id, DEVICE.public_key, "wearable", "patient:a", "ward",
                                           0, None)}
FIELDS = ["v", "dev", "seq", "ts", "kind", "body"]
ODD_TEXT = ["", "\u0000", "A" * 65, DEVICE.device_id.upper(), DEVICE.device_id + "\n", DEVICE.device_id + "\u200b",
            "\u0430" + DEVICE.device_id[1:], "\ufeff" + DEVICE.device_id, "e\u0301", "\U0001f600",
            DEVICE.device_id[::-1], OTHER.device_id, "heart_rate ", "HEART_RATE"]
SPECIAL_INTS = [0, -1, 1, 23, 24, 255, 256, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1,
                2**64, -(2**64), 10**30]
SPECIAL_BYTES = [0x00, 0x17, 0x18, 0x1B, 0x1F, 0x40, 0x5B, 0x5F, 0x7F, 0x9F, 0xBF, 0xC0, 0xC4, 0xD2, 0xD8, 0xF7,
                 0xF9, 0xFB, 0xFF]
RAW_VALUES = [
    b"\x5b" + b"\xff" * 8, b"\x9b\x7f" + b"\xff" * 7, b"\x7a\xff\xff\xff\xff", b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00",
    b"\xf9\x7e\x00", b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xf9\x7c\x00", b"\xf9\xfc\x00", b"\xf9\x00\x01",
    b"\x7f\x61a\x61b\xff", b"\x9f\x01\xff", b"\xbf\xff", b"\x5f\x41a\xff", b"\xc4\x82\x01\x61x",
    b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01", b"\xd8\x1e\x82\x01\x00", b"\xd8\x23\x61(", b"\xc1\xf9\x7e\x00",
    b"\xd8\x1c\x81\xd8\x1d\x00", b"\xd9\x01\x00\x80", b"\xd9\xd9\xf7\x01", b"\xf7", b"\xf0", b"\xf8\xff", b"\xff",
    b"\x1b\x00\x00\x00\x00\x00\x00\x00\x05", b"\x38\x00", b"\xc2\x49\x01" + b"\x00" * 8,
]




# -- generators -----------------------------------------------------------------------------------------


class Generator:
    """Seeded mix of hostile inputs; each call returns (generator name, topic device, bytes)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [self.genuine() for _ in range(200)]
        self.kinds: list[tuple[str, Callable[[], bytes], float]] = [
            ("random_bytes", self.random_bytes, 0.15),
            ("cose_head_random", self.cose_head_random, 0.05),
            ("byte_mutation", self.byte_mutation, 0.35),
            ("hostile_payload_signed", self.hostile_payload, 0.30),
            ("hostile_header_signed", self.hostile_header, 0.05),
            ("raw_cbor_tricks_signed", self.raw_tricks, 0.05),
            ("genuine", self.genuine, 0.05),
        ]
        self._weights = [w for _n, _f, w in self.kinds]

    def __call__(self) -> tuple[str, str, bytes]:
        name, make, _w = self.rng.choices(self.kinds, self._weights)[0]
        topic = DEVICE.device_id if self.rng.random() < 0.97 else OTHER.device_id
        return name, topic, make()

    # building blocks

    def payload(self) -> dict[str, Any]:
        kind, body = self.rng.choice(SAMPLE_BODIES)
        return make_payload(DEVICE.device_id, self.rng.randrange(0, 100_000), NOW_MS + self.rng.randint(-86_400_000,
                                                                                                       60_000),
                            kind, body)

    def genuine(self) -> bytes:
        return envelope.sign(DEVICE, self.payload())

    def sign_raw(self, payload_bytes: bytes, kid: bytes | None = None) -> bytes:
        protected = cbor2.dumps({1: -8, 4: kid if kid is not None else DEVICE.device_id.encode()})
        signature = DEVICE.sign(cbor2.dumps(["Signature1", protected, b"", payload_bytes]))
        return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload_bytes, signature]))

    def hostile_value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(12 if depth < 3 else 9)
        if pick == 0:
            return r.choice([None, True, False])
        if pick == 1:
            return r.choice(ODD_TEXT)
        if pick == 2:
            return r.randbytes(r.randrange(0, 20))
        if pick == 3:
            return r.choice(SPECIAL_INTS) * r.choice([1, 1, -1])
        if pick == 4:
            return r.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, r.uniform(-1e6, 1e6)])
        if pick == 5:
            return r.randint(-1000, 100_000)
        if pick == 6:
            return cbor2.CBORTag(r.choice([0, 1, 2, 4, 5, 24, 30, 32, 35, 37, 258, 1004, 55799, 99, 18]),
                                 r.choice([None, 0, -1, "x", b"x", 2**70]))
        if pick == 7:
            return "".join(chr(r.choice([0x41, 0x7F, 0xE9, 0x200B, 0x202E, 0xFEFF, 0x1F600, 0x10FFFF]))
                           for _ in range(r.randrange(1, 8)))
        if pick == 8:
            return r.uniform(-10, 1200)
        if pick in (9, 10):
            return [self.hostile_value(depth + 1) for _ in range(r.randrange(0, 4))]
        return {r.choice([*FIELDS, "bpm", "x", 1, -1]): self.hostile_value(depth + 1) for _ in range(r.randrange(0, 4))}

    # generators

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, 600))

    def cose_head_random(self) -> bytes:
        return b"\xd2\x84" + self.rng.randbytes(self.rng.randrange(0, 300))

    def byte_mutation(self) -> bytes:
        r = self.rng
        data = bytearray(r.choice(self.pool))
        for _ in range(r.randint(1, 4)):
            op = r.randrange(7)
            pos = r.randrange(0, max(1, len(data)))
            if op == 0 and data:
                data[pos] ^= 1 << r.randrange(8)
            elif op == 1:
                del data[pos:]
            elif op == 2:
                data[pos:pos] = r.randbytes(r.randint(1, 8)) if r.random() < 0.5 else r.choice(RAW_VALUES)
            elif op == 3:
                del data[pos:pos + r.randint(1, 16)]
            elif op == 4:
                other = r.choice(self.pool)
                data = bytearray(bytes(data[:pos]) + other[r.randrange(0, len(other)):])
            elif op == 5 and data:
                data[pos] = r.choice(SPECIAL_BYTES)
            else:
                end = min(len(data), pos + r.randint(1, 32))
                data[pos:pos] = data[pos:end]
        return bytes(data)

    def hostile_payload(self) -> bytes:
        r = self.rng
        payload = dict(self.payload())
        how = r.randrange(5)
        if how == 0:
            payload[r.choice(FIELDS)] = self.hostile_value()
        elif how == 1:
            del payload[r.choice(FIELDS)]
        elif how == 2:
            payload[r.choice(["x", "V", 7, -1, "body "])] = self.hostile_value()
        else:
            body = dict(payload["body"])
            body[r.choice([*body, "bpm", "extra"])] = self.hostile_value() if how == 3 else r.choice(
                [r.randint(-10, 1200), r.uniform(-10, 1200)])
            payload["body"] = body
        try:
            payload_bytes = cbor2.dumps(payload, canonical=r.random() < 0.8)
        except (ValueError, TypeError, cbor2.CBOREncodeError):  # e.g. a tag cbor2 will not encode
            payload_bytes = cbor2.dumps(self.payload(), canonical=True)
        return self.sign_raw(payload_bytes)

    def hostile_header(self) -> bytes:
        r = self.rng
        kid = r.choice([b"", DEVICE.device_id.upper().encode(), "é".encode() * 8, DEVICE.device_id.encode() + b"\x00",
                        b"a" * 65, OTHER.device_id.encode(), DEVICE.device_id.encode()])
        header: dict[Any, Any] = {1: r.choice([-8, -8, -7, -8.0, "EdDSA", None]), 4: kid}
        if r.random() < 0.3:
            header[r.choice([2, 3, 5, 33, -1])] = self.hostile_value()
        payload_bytes = cbor2.dumps(self.payload(), canonical=True)
        protected = cbor2.dumps(header)
        signature = DEVICE.sign(cbor2.dumps(["Signature1", protected, b"", payload_bytes]))
        unprotected = {} if r.random() < 0.8 else {4: kid}
        return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload_bytes, signature]))

    def raw_tricks(self) -> bytes:
        r = self.rng
        payload = self.payload()
        items = [(cbor2.dumps(k), cbor2.dumps(v, canonical=True))
                 for k, v in sorted(payload.items(), key=lambda kv: (len(kv[0]), kv[0]))]
        body = b"".join(k + v for k, v in items)
        trick = r.randrange(5)
        if trick == 0:  # indefinite-length map
            raw = b"\xbf" + body + b"\xff"
        elif trick == 1:  # a duplicate key with a hostile raw value
            raw = bytes([0xA0 + len(items) + 1]) + body + cbor2.dumps(r.choice(FIELDS)) + r.choice(RAW_VALUES)
        elif trick == 2:  # deep nesting as the body
            depth = r.randint(5, 5000)
            raw = bytes([0xA0 + len(items)]) + b"".join(
                k + (b"\x81" * depth + b"\x00" if k == cbor2.dumps("body") else v) for k, v in items)
        elif trick == 3:  # seq with a long-form head: same number, other bytes
            raw = bytes([0xA0 + len(items)]) + b"".join(
                k + (b"\x1b" + payload["seq"].to_bytes(8, "big") if k == cbor2.dumps("seq") else v) for k, v in items)
        else:  # trailing bytes
            raw = bytes([0xA0 + len(items)]) + body + r.choice(RAW_VALUES)
        return self.sign_raw(raw)


# -- the check ------------------------------------------------------------------------------------------


def independently_valid(topic_device: str, raw: bytes, verdict: EventCandidate) -> str | None:
    """None if an accepted input is a genuine event of that device by a check that shares no carechain code."""
    try:
        tag = cbor2.loads(raw)
        if tag.tag != 18 or cbor2.dumps(tag, canonical=True) != raw:
            return "accepted bytes are not the canonical tag-18 encoding"
        protected, unprotected, payload_bytes, signature = tag.value
        if cbor2.loads(protected) != {1: -8, 4: topic_device.encode()} or unprotected != {}:
            return "accepted a header other than {1: -8, 4: kid}"
        sig_structure = cbor2.dumps(["Signature1", protected, b"", payload_bytes])
        if not verify_signature(REGISTRY[topic_device].public_key, sig_structure, signature):
            return "accepted a signature that does not verify"
        payload = cbor2.loads(payload_bytes)
        if cbor2.dumps(payload, canonical=True) != payload_bytes:
            return "accepted a non-canonical payload"
        event = EventPayload.model_validate(payload)
        event.parsed_body()
        if (event.dev, event.seq) != (verdict.device_id, verdict.seq):
            return "candidate names another (device, seq) than the payload"
    except Exception as exc:  # noqa: BLE001 - any failure here means the acceptance was wrong
        return f"independent check failed: {type(exc).__name__}: {exc}"
    return None


class Fuzzer:
    def __init__(self, crash_dir: Path, hang_ms: float, keep: int = 5) -> None:
        self.ingest = Ingest(Limits(), REGISTRY.get)
        self.reasons = documented_reasons()
        self.crash_dir = crash_dir
        self.hang_s = hang_ms / 1000
        self.keep = keep
        self.inputs = 0
        self.crashes = 0
        self.hangs = 0
        self.bugs = 0  # undocumented reasons and wrong acceptances
        self.stalls = 0  # slow once, fast when re-run: the machine, not the input
        self.max_s = 0.0
        self.slowest: tuple[str, bytes] = ("", b"")
        self.times: list[float] | None = []  # None: do not keep (atheris runs are open-ended)
        self.busy_s = 0.0
        self.by_reason: Counter[str] = Counter()
        self.by_generator: Counter[str] = Counter()
        self.accepted_valid = 0
        self.saved: list[str] = []

    def one(self, generator: str, topic_device: str, raw: bytes) -> str | None:
        """Run one input; returns a problem description, or None if the verdict is a proper one."""
        self.inputs += 1
        self.by_generator[generator] += 1
        t0 = time.perf_counter()
        try:
            verdict = self.ingest.check(topic_device, raw, NOW_MS)
        except Exception:  # noqa: BLE001 - exactly what we are looking for
            self.busy_s += time.perf_counter() - t0
            self.crashes += 1
            return self._save("crash", generator, topic_device, raw, traceback.format_exc())
        dt = time.perf_counter() - t0
        self.busy_s += dt
        if self.times is not None:
            self.times.append(dt)
        if dt > self.max_s:
            self.max_s, self.slowest = dt, (topic_device, raw)
        if dt > self.hang_s:
            again = _timed(self.ingest, topic_device, raw)
            if again <= self.hang_s:
                self.stalls += 1
            else:
                self.hangs += 1
                return self._save("hang", generator, topic_device, raw, f"{dt * 1000:.0f} ms, {again * 1000:.0f} ms")
        if isinstance(verdict, Rejection):
            self.by_reason[verdict.reason] += 1
            if verdict.reason not in self.reasons:
                self.bugs += 1
                return self._save("undocumented", generator, topic_device, raw, verdict.reason)
            return None
        problem = independently_valid(topic_device, raw, verdict)
        if problem:
            self.bugs += 1
            return self._save("wrong_accept", generator, topic_device, raw, problem)
        self.accepted_valid += 1
        return None

    def _save(self, kind: str, generator: str, topic_device: str, raw: bytes, detail: str) -> str:
        name = f"{kind}-{hashlib.sha256(raw).hexdigest()[:16]}"
        if len(self.saved) < self.keep:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            (self.crash_dir / f"{name}.bin").write_bytes(raw)
            (self.crash_dir / f"{name}.txt").write_text(
                f"generator: {generator}\ntopic device: {topic_device}\n{detail}\n"
                f"reproduce: Ingest(Limits(), registry).check({topic_device!r}, open({name + '.bin'!r}, 'rb')"
                f".read(), {NOW_MS})\n")
            self.saved.append(str(self.crash_dir / f"{name}.bin"))
        return f"{kind}: {detail.strip().splitlines()[-1]}"

    def summary(self, wall_s: float, seed: int) -> dict[str, Any]:
        times = sorted(self.times or [0.0])
        # Re-time the slowest input: a one-off maximum is usually a GC pause or another process on the core.
        rerun = min(_timed(self.ingest, *self.slowest) for _ in range(3)) if self.slowest[1] else 0.0
        return {
            "inputs": self.inputs, "seed": seed, "wall_s": round(wall_s, 2),
            "inputs_per_s": round(self.inputs / wall_s) if wall_s else None,
            "checks_per_s": round(self.inputs / self.busy_s) if self.busy_s else None,
            "crashes": self.crashes, "hangs": self.hangs, "stalls": self.stalls, "other_bugs": self.bugs,
            "max_ms": round(self.max_s * 1000, 3), "slowest_rerun_ms": round(rerun * 1000, 3),
            "p99_ms": round(times[int(len(times) * 0.99)] * 1000, 3),
            "p999_ms": round(times[int(len(times) * 0.999)] * 1000, 3), "accepted_valid": self.accepted_valid,
            "rejected_by_reason": dict(self.by_reason.most_common()),
            "inputs_by_generator": dict(self.by_generator.most_common()), "reproducers": self.saved,
        }


def _timed(ingest: Ingest, topic_device: str, raw: bytes) -> float:
    t0 = time.perf_counter()
    ingest.check(topic_device, raw, NOW_MS)
    return time.perf_counter() - t0


def run(inputs: int, seed: int, crash_dir: Path, hang_ms: float) -> dict[str, Any]:
    gen = Generator(seed)
    fuzzer = Fuzzer(crash_dir, hang_ms)
    t0 = time.perf_counter()
    for _ in range(inputs):
        fuzzer.one(*gen())
    return fuzzer.summary(time.perf_counter() - t0, seed)


def run_atheris(libfuzzer_args: list[str], seed: int, crash_dir: Path, hang_ms: float) -> None:
    """Coverage-guided: libFuzzer mutates a corpus of genuine and generated events; any bug raises."""
    import atheris

    atheris.instrument_all()
    gen = Generator(seed)
    corpus = Path(tempfile.mkdtemp(prefix="carechain-fuzz-corpus-"))
    for i in range(300):
        (corpus / f"seed-{i}").write_bytes(gen()[2] if i >= 50 else gen.genuine())
    fuzzer = Fuzzer(crash_dir, math.inf)  # hangs: libFuzzer's -timeout, below
    fuzzer.times = None

    def test_one_input(data: bytes) -> None:
        problem = fuzzer.one("atheris", DEVICE.device_id, data)
        if problem:
            raise RuntimeError(problem)

    atheris.Setup([sys.argv[0], f"-seed={seed}", f"-timeout={max(1, math.ceil(hang_ms / 1000))}", "-max_len=4096",
                   *libfuzzer_args, str(corpus)], test_one_input)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="how many inputs (default 100,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-reproducers"),
                    help="where the first few reproducers go (created only if there is one)")
    ap.add_argument("--hang-ms", type=float, default=1000.0, help="an input slower than this counts as a hang")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing with atheris (libFuzzer); "
                    "extra arguments go to libFuzzer (needs `pip install .[fuzz]`)")
    args, rest = ap.parse_known_args()
    if args.atheris:
        run_atheris(rest, args.seed, args.crash_dir, args.hang_ms)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    s = run(args.inputs, args.seed, args.crash_dir, args.hang_ms)
    if args.json:
        print(json.dumps(s))
        return
    print(f"inputs            {s['inputs']:,} (seed {s['seed']}) in {s['wall_s']} s, generation included")
    print(f"inputs/s          {s['inputs_per_s']:,} overall; {s['checks_per_s']:,} ingest checks/s")
    print(f"crashes           {s['crashes']}   (unexpected exceptions)")
    print(f"hangs             {s['hangs']}   (> {args.hang_ms:g} ms, and again when re-run; "
          f"{s['stalls']} stalls were fast when re-run)")
    print(f"other bugs        {s['other_bugs']}   (undocumented reasons, wrong acceptances)")
    print(f"per input         max {s['max_ms']} ms (that input re-run: {s['slowest_rerun_ms']} ms), "
          f"p99 {s['p99_ms']} ms, p99.9 {s['p999_ms']} ms")
    print(f"accepted, valid   {s['accepted_valid']:,}")
    print("rejected by reason:")
    for reason, n in s["rejected_by_reason"].items():
        print(f"  {reason:22s} {n:>8,}")
    print("inputs by generator: " + ", ".join(f"{k} {v:,}" for k, v in s["inputs_by_generator"].items()))
    if s["reproducers"]:
        print("reproducers: " + " ".join(s["reproducers"]))
    sys.exit(1 if s["crashes"] or s["hangs"] or s["other_bugs"] else 0)


if __name__ == "__main__":
    main()
