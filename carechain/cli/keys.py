"""`carechain keys new|show` and `carechain keys ca init|server|client`: key files and the deployment CA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._options import JsonOpt, example, fail, out

keys_app = typer.Typer(help="Create and inspect key files (mode 0600): Ed25519, and re-encryption keys (--pre).",
                       no_args_is_help=True,
                       epilog=example("carechain keys new keys/band-1.key", "carechain keys ca init"))
ca_app = typer.Typer(
    help="A deployment CA for the broker's TLS listener: CA, server and client certificates (ECDSA P-256; "
         "keys mode 0600). See docs/broker-security.md.", no_args_is_help=True,
    epilog=example("carechain keys ca init", "carechain keys ca server --ip 127.0.0.1"))
keys_app.add_typer(ca_app, name="ca")

CaDirOpt = Annotated[Path, typer.Option("--dir", help="The CA's folder (ca.crt, ca.key).")]
CertOutOpt = Annotated[Path | None, typer.Option("--out", help="Where to write the certificate and key "
                                                 "(default: the CA's folder).")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite existing files.")]
DEFAULT_CA_DIR = Path("carechain-data/ca")


def _identity(ident: Any, path: Path | None, as_json: bool) -> None:
    data = {"device_id": ident.device_id, "public_key": ident.public_key.hex()}
    if path is not None:
        data["key_file"] = str(path)
    _print(data, as_json)


def _print(data: dict[str, str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data), flush=True)
        return
    width = max(map(len, data))
    out.print("\n".join(f"{k:<{width}} {v}" for k, v in data.items()), soft_wrap=True, markup=False,
              highlight=False)


@keys_app.command("new", epilog=example("carechain keys new keys/band-1.key",
                                        "carechain keys new --pre keys/alice.pre"))
def keys_new(path: Annotated[Path, typer.Argument(help="Where to write the private key (mode 0600).")],
             force: Annotated[bool, typer.Option(help="Overwrite an existing key file.")] = False,
             pre: Annotated[bool, typer.Option("--pre", help="A re-encryption key pair (umbral, secp256k1) instead: "
                                                              "record owners and requesters register it with "
                                                              "`carechain party register --pre-key`.")] = False,
             as_json: JsonOpt = False) -> None:
    """Generate an Ed25519 key; prints its device id and public key (safe to share). With --pre, a re-encryption
    key pair; prints its public and verifying keys."""
    from carechain.identity import Identity, KeyFileError

    if pre:
        _pre_key_new(path, force, as_json)
        return
    ident = Identity.generate()
    try:
        ident.save(path, overwrite=force)
    except KeyFileError as exc:
        raise fail(str(exc)) from None
    _identity(ident, path, as_json)


def _pre_key_new(path: Path, force: bool, as_json: bool) -> None:
    from carechain.identity import KeyFileError
    from carechain.reencryption import PreKey

    key = PreKey.generate()
    try:
        key.save(path, overwrite=force)
    except (KeyFileError, OSError) as exc:
        raise fail(str(exc)) from None
    data = {"pre_public_key": key.public_key.hex(), "pre_verifying_key": key.verifying_key.hex(), "key_file": str(path)}
    if as_json:
        print(json.dumps(data), flush=True)
        return
    width = max(map(len, data))
    out.print("\n".join(f"{k:<{width}} {v}" for k, v in data.items()), soft_wrap=True, markup=False, highlight=False)


@keys_app.command("show", epilog=example("carechain keys show carechain-data/bridge/keys/log.key",
                                          "carechain keys show keys/alice.key --field device_id",
                                          "carechain keys show keys/alice.pre --field pre_public_key"))
def keys_show(path: Annotated[Path, typer.Argument(help="A carechain key file (Ed25519, or re-encryption).")],
              field: Annotated[str | None, typer.Option(help="Print only this field (e.g. device_id, public_key, "
                                                        "pre_public_key): for scripts.")] = None,
              as_json: JsonOpt = False) -> None:
    """Print the public half of a key file (never the private key): an Ed25519 key's device id and public key,
    or a re-encryption key's public and verifying keys."""
    from carechain.identity import Identity, KeyFileError
    from carechain.reencryption import PreKey

    try:
        ident = Identity.load(path)
        data = {"device_id": ident.device_id, "public_key": ident.public_key.hex()}
    except KeyFileError as exc:
        try:
            pre = PreKey.load(path)
        except KeyFileError:
            raise fail(str(exc)) from None
        data = {"pre_public_key": pre.public_key.hex(), "pre_verifying_key": pre.verifying_key.hex()}
    if field is not None:
        if field not in data:
            raise fail(f"{path} has no field {field!r}; it has: {', '.join(data)}")
        print(data[field], flush=True)
    else:
        _print(data, as_json)


def _issued(what: str, issued: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"issued": what, "cert": str(issued.cert), "key": str(issued.key),
                          "sha256": issued.fingerprint}), flush=True)
        return
    out.print(f"{what}\ncert        {issued.cert}\nkey         {issued.key}   (mode 0600)\n"
              f"sha256      {issued.fingerprint}", soft_wrap=True, markup=False, highlight=False)


@ca_app.command("init", epilog=example("carechain keys ca init --dir carechain-data/ca"))
def ca_init(ca_dir: CaDirOpt = DEFAULT_CA_DIR,
            name: Annotated[str, typer.Option(help="The CA's common name.")] = "carechain deployment CA",
            days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 3650,
            force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Create the deployment CA: ca.key (mode 0600, keep it offline) and ca.crt (give it to every client)."""
    from carechain.pki import PkiError, init_ca

    try:
        _issued("CA created", init_ca(ca_dir, name=name, days=days, overwrite=force), as_json)
    except (PkiError, OSError) as exc:
        raise fail(str(exc)) from None


@ca_app.command("server", epilog=example("carechain keys ca server --host broker.example.org --ip 127.0.0.1"))
def ca_server(host: Annotated[list[str] | None, typer.Option(
                  help="A DNS name clients use to reach the broker; repeatable.")] = None,
              ip: Annotated[list[str] | None, typer.Option(
                  help="An IP address clients use to reach the broker; repeatable.")] = None,
              ca_dir: CaDirOpt = DEFAULT_CA_DIR, out_dir: CertOutOpt = None,
              name: Annotated[str, typer.Option(help="File name stem: NAME.crt, NAME.key.")] = "server",
              days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 825,
              force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Issue the broker's certificate for every --host and --ip clients connect to (checked by clients)."""
    from carechain.pki import PkiError, issue_server

    try:
        issued = issue_server(ca_dir, hosts=host or [], ips=ip or [], out_dir=out_dir, name=name, days=days,
                              overwrite=force)
    except (PkiError, OSError) as exc:
        raise fail(str(exc)) from None
    _issued(f"server certificate for {', '.join([*(host or []), *(ip or [])])}", issued, as_json)


@ca_app.command("client", epilog=example("carechain keys ca client carechain-bridge"))
def ca_client(name: Annotated[str, typer.Argument(help="The certificate's CN: a device id, or e.g. the bridge "
                                                       "user's name.")],
              ca_dir: CaDirOpt = DEFAULT_CA_DIR, out_dir: CertOutOpt = None,
              days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 825,
              force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Issue a client certificate (CN = NAME) for a broker that requires one (require_certificate true)."""
    from carechain.pki import PkiError, issue_client

    try:
        _issued(f"client certificate for {name}",
                issue_client(ca_dir, name, out_dir=out_dir, days=days, overwrite=force), as_json)
    except (PkiError, OSError) as exc:
        raise fail(str(exc)) from None
