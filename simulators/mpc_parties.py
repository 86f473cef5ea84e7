"""MPC parties' TLS files for tests and benchmarks that start `python -m chain_miner.aggregator` themselves
(a miner's study runner writes them from its peers' hellos instead)."""

from __future__ import annotations

from pathlib import Path

from chain_miner.mpc_tls import MpcTls, write_party_files


def tls_work_dirs(base: Path, parties: int) -> list[Path]:
    """One working directory per party under `base` for `--mpc-tls`: a fresh MPC certificate each, every party
    trusting all of them."""
    own = [MpcTls.generate() for _ in range(parties)]
    certificates = [tls.cert_pem for tls in own]
    return [write_party_files(base / f"mpc-party{i}", i, tls, certificates) for i, tls in enumerate(own)]
