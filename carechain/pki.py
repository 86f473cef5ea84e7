"""A small deployment CA for the broker's TLS listener (ECDSA P-256, via pyca/cryptography).

`carechain keys ca init` makes the CA; `server` issues the broker's certificate for the names and
addresses clients connect to (subjectAltName: that is what clients check); `client` issues a client
certificate whose CN is a device id (or another principal's name). Private keys are PEM (PKCS#8) files
of mode 0600; certificates are public (0644). This is TLS transport identity only: device events are
still signed with the device's Ed25519 key (carechain.identity).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from carechain.files import PUBLIC, FilePermissionError, read_private, write_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_DAYS, LEAF_DAYS = 3650, 825
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences between issuer and verifier
_HOSTNAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*\.?")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PkiError(ValueError):
    """What the operator must fix: missing CA, a file that exists, a bad host name."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER certificate, hex


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise PkiError(f"{', '.join(existing)} already exist(s); refusing to overwrite (use --force)")


def _write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> Issued:
    write_atomic(key_path, _key_pem(key))  # the key first: a certificate never exists without its key
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)
    return Issued(cert_path, key_path, _fingerprint(cert))


def init_ca(ca_dir: Path, *, name: str = "carechain deployment CA", days: int = CA_DAYS,
            overwrite: bool = False) -> Issued:
    """Create `ca.key` (0600) and a self-signed `ca.crt` that may sign leaf certificates only."""
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    _refuse_existing([cert_path, key_path], overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(cert, key, cert_path, key_path)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise PkiError(f"no CA in {ca_dir} (expected {CA_CERT} and {CA_KEY}); create one with "
                       f"`carechain keys ca init --dir {ca_dir}`")
    try:
        key = serialization.load_pem_private_key(read_private(key_path), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FilePermissionError as exc:
        raise PkiError(str(exc)) from None
    except ValueError as exc:
        raise PkiError(f"{ca_dir}: CA certificate or key is not readable PEM: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def _leaf(ca_dir: Path, subject_cn: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issue_server(ca_dir: Path, *, hosts: list[str], ips: list[str], out_dir: Path | None = None,
                 name: str = "server", days: int = LEAF_DAYS, overwrite: bool = False) -> Issued:
    """`<name>.crt` and `<name>.key` for the broker, valid for every host name and IP address given."""
    if not hosts and not ips:
        raise PkiError("give at least one --host NAME or --ip ADDRESS: clients check that the certificate "
                       "names the broker they connect to")
    san: list[x509.GeneralName] = []
    for h in hosts:
        if not _HOSTNAME.fullmatch(h) or len(h) > 253:
            raise PkiError(f"--host {h!r} is not a DNS name (for an address use --ip)")
        san.append(x509.DNSName(h.rstrip(".").lower()))
    for a in ips:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            raise PkiError(f"--ip {a!r} is not an IPv4 or IPv6 address") from None
    paths = _leaf_paths(Path(out_dir or ca_dir), name, overwrite)
    cert, key = _leaf(ca_dir, (hosts or ips)[0], san, ExtendedKeyUsageOID.SERVER_AUTH, days)
    return _write_pair(cert, key, *paths)


def issue_client(ca_dir: Path, name: str, *, out_dir: Path | None = None, days: int = LEAF_DAYS,
                 overwrite: bool = False) -> Issued:
    """`<name>.crt` and `<name>.key` with CN = name (a device id, or e.g. the bridge's user name)."""
    paths = _leaf_paths(Path(out_dir or ca_dir), name, overwrite)
    cert, key = _leaf(ca_dir, name, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)
    return _write_pair(cert, key, *paths)


def _leaf_paths(out: Path, name: str, overwrite: bool) -> list[Path]:
    if not _FILE_NAME.fullmatch(name) or name == "ca":
        raise PkiError(f"{name!r} cannot name a certificate file: use letters, digits, '.', '_' or '-' (not 'ca')")
    paths = [out / f"{name}.crt", out / f"{name}.key"]
    _refuse_existing(paths, overwrite)
    return paths
