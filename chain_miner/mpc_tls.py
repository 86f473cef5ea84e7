"""Mutually authenticated TLS for the aggregators' MPC channels (docs/market.md, "The channels").

MPyC sends shares, masked shares and the messages of its multiplications between the parties: in the clear,
anyone on the path could rebuild the contributors' inputs, and anyone who reaches a listening port could join
as a party. So every computation runs over MPyC's `--ssl`: each aggregator miner keeps one TLS key and a
self-signed certificate (`MpcTls`, in its data directory), announces the certificate in its signed hello (the
miner's Ed25519 key vouches for it), and before each computation writes the TLS files MPyC reads from `.config`
of its working directory: its own certificate and key as `party_<index>`, and the study's aggregators'
certificates — and no others — as `mpyc_ca.crt` (`write_party_files`). A client checks that the server's
certificate is one of them and names the party it dials ("MPyC party <index>", which every carechain MPC
certificate names, for each place a study can give it); a server accepts only clients holding one of them.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from carechain.files import private_dir, read_private, write_atomic
from carechain.market import MAX_AGGREGATORS
from carechain.miner_messages import MAX_MPC_CERT_CHARS

__all__ = ["CERT_FILE", "KEY_FILE", "MpcTls", "MpcTlsError", "check_certificate", "party_name",
           "remove_party_files", "write_party_files"]

KEY_FILE = "mpc-tls.key"
CERT_FILE = "mpc-tls.crt"
VALID_DAYS = 365
RENEW_DAYS = 30  # a certificate this close to its end is replaced (the next hello announces the new one)
CONFIG_DIR = ".config"  # where MPyC's --ssl reads the TLS files, relative to its working directory


class MpcTlsError(ValueError):
    """A certificate that cannot serve an MPC channel, or TLS files that cannot be read or written."""


def party_name(index: int) -> str:
    """The host name MPyC checks the certificate of the party at `index` for."""
    return f"MPyC party {index}"


def check_certificate(pem: str, now: datetime.datetime | None = None) -> x509.Certificate:
    """A hello's `mpc_cert`, parsed and checked: one PEM certificate, valid now, naming every party place."""
    if len(pem) > MAX_MPC_CERT_CHARS:
        raise MpcTlsError(f"the MPC certificate has {len(pem)} characters; at most {MAX_MPC_CERT_CHARS}")
    if pem.count("-----BEGIN CERTIFICATE-----") != 1:
        raise MpcTlsError("the MPC certificate must be exactly one PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise MpcTlsError(f"the MPC certificate does not parse: {exc}") from None
    now = now or datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise MpcTlsError(f"the MPC certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    try:
        names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = set()
    missing = [i for i in range(MAX_AGGREGATORS) if party_name(i) not in names]
    if missing:
        raise MpcTlsError(f"the MPC certificate does not name party place(s) {missing}")
    return cert


@dataclass(frozen=True)
class MpcTls:
    """One aggregator miner's MPC TLS key (PEM, kept 0600) and its self-signed certificate (PEM)."""

    key_pem: bytes
    cert_pem: str

    @classmethod
    def load_or_create(cls, data_dir: Path, now: datetime.datetime | None = None) -> MpcTls:
        """The miner's MPC key and certificate from `data_dir`; new ones when there are none yet, or when the
        certificate ends within RENEW_DAYS (or no longer parses)."""
        now = now or datetime.datetime.now(datetime.UTC)
        key_file, cert_file = Path(data_dir) / KEY_FILE, Path(data_dir) / CERT_FILE
        if key_file.exists() and cert_file.exists():
            tls = cls(read_private(key_file), cert_file.read_text())
            try:
                check_certificate(tls.cert_pem, now)
            except MpcTlsError:
                pass
            else:
                if not tls.due_for_renewal(now):
                    return tls
        tls = cls.generate(now)
        private_dir(Path(data_dir))
        write_atomic(key_file, tls.key_pem)
        write_atomic(cert_file, tls.cert_pem.encode())  # public, but the data dir holds private files only
        return tls

    @cached_property
    def expires(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem.encode()).not_valid_after_utc

    def due_for_renewal(self, now: datetime.datetime | None = None) -> bool:
        """Whether the certificate ends within RENEW_DAYS: `load_or_create` then makes a new one."""
        now = now or datetime.datetime.now(datetime.UTC)
        return self.expires - now <= datetime.timedelta(days=RENEW_DAYS)

    @classmethod
    def generate(cls, now: datetime.datetime | None = None) -> MpcTls:
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "carechain MPC aggregator")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(party_name(i)) for i in range(MAX_AGGREGATORS)]), critical=False)
                # Its own trust anchor: the peers trust exactly this certificate, vouched for by the signed hello.
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(key_pem, cert.public_bytes(serialization.Encoding.PEM).decode())


def write_party_files(work_dir: Path, index: int, own: MpcTls, certificates: list[str]) -> Path:
    """Write what MPyC's `--ssl` reads for party `index` into `work_dir/.config` (0700; the key 0600), trusting
    exactly `certificates` (every aggregator's, in the study's order, its own at `index`). Returns `work_dir`,
    the computation's working directory. Call `remove_party_files` once it has ended."""
    if certificates[index] != own.cert_pem:
        raise MpcTlsError(f"party {index}'s certificate in the list is not this miner's own")
    config = private_dir(Path(work_dir) / CONFIG_DIR)
    write_atomic(config / f"party_{index}.key", own.key_pem)
    write_atomic(config / f"party_{index}.crt", own.cert_pem.encode())
    write_atomic(config / "mpyc_ca.crt", "".join(c if c.endswith("\n") else c + "\n" for c in certificates).encode())
    return Path(work_dir)


def remove_party_files(work_dir: Path) -> None:
    """Remove the TLS files `write_party_files` wrote (the key's copy among them)."""
    shutil.rmtree(Path(work_dir) / CONFIG_DIR, ignore_errors=True)
