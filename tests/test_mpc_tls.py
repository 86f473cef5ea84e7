"""A miner's MPC certificate (chain_miner.mpc_tls): what a hello may carry, kept and renewed in the data dir, and
the files MPyC's --ssl reads. The channels themselves: tests/test_market_mpc.py (a party nobody trusts cannot
join) and tests/test_market_live.py (miners compute a study over them)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest

from carechain.market import MAX_AGGREGATORS
from chain_miner.aggregator import main as aggregator_main
from chain_miner.mpc_tls import (
    CERT_FILE,
    KEY_FILE,
    MpcTls,
    MpcTlsError,
    check_certificate,
    party_name,
    remove_party_files,
    write_party_files,
)

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def test_a_generated_certificate_names_every_party_place_and_is_valid_for_a_year() -> None:
    cert = check_certificate(MpcTls.generate(NOW).cert_pem, NOW)
    assert cert.not_valid_after_utc - NOW > datetime.timedelta(days=360)
    with pytest.raises(MpcTlsError, match="not now"):
        check_certificate(MpcTls.generate(NOW).cert_pem, NOW + datetime.timedelta(days=400))
    assert party_name(MAX_AGGREGATORS - 1) == f"MPyC party {MAX_AGGREGATORS - 1}"


@pytest.mark.parametrize(("pem", "reason"), [
    ("", "exactly one PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not parse"),
    ("x" * 3000, "at most 2048"),
])
def test_a_hello_certificate_that_cannot_serve_is_refused_with_its_reason(pem: str, reason: str) -> None:
    with pytest.raises(MpcTlsError, match=reason):
        check_certificate(pem, NOW)


def test_two_certificates_in_one_hello_are_refused() -> None:
    two = MpcTls.generate(NOW).cert_pem + MpcTls.generate(NOW).cert_pem
    with pytest.raises(MpcTlsError, match="exactly one"):
        check_certificate(two, NOW)


def test_the_key_is_kept_private_reused_and_renewed_before_it_ends(tmp_path: Path) -> None:
    first = MpcTls.load_or_create(tmp_path, NOW)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert (tmp_path / CERT_FILE).read_text() == first.cert_pem
    assert MpcTls.load_or_create(tmp_path, NOW + datetime.timedelta(days=200)) == first
    renewed = MpcTls.load_or_create(tmp_path, NOW + datetime.timedelta(days=340))  # 25 days left: renewed
    assert renewed != first and MpcTls.load_or_create(tmp_path, NOW + datetime.timedelta(days=340)) == renewed
    (tmp_path / CERT_FILE).write_text("damaged")
    assert MpcTls.load_or_create(tmp_path, NOW).cert_pem != "damaged"


def test_the_party_files_trust_exactly_the_study_certificates_and_go_away_after(tmp_path: Path) -> None:
    own = [MpcTls.generate(NOW) for _ in range(3)]
    certificates = [tls.cert_pem for tls in own]
    work = write_party_files(tmp_path / "job", 1, own[1], certificates)
    config = work / ".config"
    assert sorted(p.name for p in config.iterdir()) == ["mpyc_ca.crt", "party_1.crt", "party_1.key"]
    assert (config / "mpyc_ca.crt").read_text() == "".join(certificates)
    assert stat.S_IMODE((config / "party_1.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    with pytest.raises(MpcTlsError, match="not this miner's own"):
        write_party_files(tmp_path / "job2", 0, own[1], certificates)
    remove_party_files(work)
    assert not config.exists()


def test_the_aggregator_will_not_compute_in_the_clear_unless_told(tmp_path: Path) -> None:
    args = ["--study", "s", "--index", "0", "--peers", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "--key",
            str(tmp_path / "k"), "--inputs", str(tmp_path / "i.json")]
    with pytest.raises(SystemExit, match="give --mpc-tls DIR"):
        aggregator_main(args)
    with pytest.raises(SystemExit, match="missing .*party_0.crt"):
        aggregator_main([*args, "--mpc-tls", str(tmp_path)])
