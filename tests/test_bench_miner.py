"""bench/miner.py measures the rules a new deployment runs, on a checkpoint those rules accept."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from carechain import envelope
from contract_rules import builtin_hashes
from contract_rules.replay import decode_leaf

BENCH = Path(__file__).resolve().parent.parent / "bench" / "miner.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_miner", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_miner_bench_judges_todays_mix_under_the_newest_rules() -> None:
    bench = _bench()
    log = bench.Log()
    witness = bench.synthetic_witness(log, 20_000, 2 * bench.RX_SALES)
    assert {name: history[-1][2] for name, history in witness.state.versions.items()} == builtin_hashes()
    for round_ in range(2):
        leaves = [e.encode() for e in log.checkpoint(round_)]
        start = witness.size
        bench.judge(witness, leaves)  # asserts: no violation, exactly the one void of each checkpoint
        kinds: Counter[tuple[str, str]] = Counter()
        for offset, leaf in enumerate(leaves):
            entry = decode_leaf(leaf)
            kind = envelope.parse(entry.cose).payload["kind"] if entry.type == "event" else entry.type
            kinds[kind, witness.state.results[start + offset][1]] += 1
        assert kinds == Counter({("clock.attest", "ok"): 1, ("heart_rate", "ok"): 20, ("spo2", "ok"): 10,
                                 ("activity", "ok"): 10, ("temperature", "ok"): 10, ("blood_pressure", "ok"): 10,
                                 ("purchase", "ok"): 24, ("token.transfer", "ok"): 13, ("sale.refused", "ok"): 1,
                                 ("purchase", bench.VOID_REASON): 1})
    assert len(witness.state.tables["claims"]) > 2 * 16  # the insured sales claimed, beside the filler's claims
