"""`carechain party|rx|policy|balance`: contract entries appended to the ledger in the bridge data dir.

They run on the bridge host for now (like `carechain register`): each replays the ledger from the
deployment's genesis (DATA_DIR/contracts/genesis.json), dry-runs the new entry against the contracts so a
refused one never reaches the log, and appends it. `attach` adds them to the main app; they use its
helpers (config, errors, output) through `base`, the carechain.cli module (also when run as __main__).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

base: Any = None  # the carechain.cli module, set by `attach`

party_app = typer.Typer(help="Register parties (prescribers, pharmacies, insurers, miners) on the ledger.",
                        no_args_is_help=True)
rx_app = typer.Typer(help="Prescriptions: issue (sign + anchor), show, verify against the ledger, revoke.",
                     no_args_is_help=True)
policy_app = typer.Typer(help="Insurance policies: register a patient's coverage, settle a wellness week.",
                         no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
KeyOpt = Annotated[Path, typer.Option("--key", help="The acting party's key file (it signs the entry).")]


def attach(app: typer.Typer, cli_module: Any) -> None:
    global base
    base = cli_module
    app.add_typer(party_app, name="party")
    app.add_typer(rx_app, name="rx")
    app.add_typer(policy_app, name="policy")
    app.command("balance")(balance)


def contract_gate(cfg: Any, data_dir: Path) -> Any:
    """The bridge's contract gate: the deployment genesis (written on first use) and the operator key."""
    from chain_bridge.contract_gate import ContractGate
    from chain_bridge.registry import operator_key

    try:
        return ContractGate(_genesis(cfg, data_dir), operator_key(data_dir))
    except ValueError as exc:
        raise base._fail(str(exc)) from None


def _genesis(cfg: Any, data_dir: Path) -> Any:
    from chain_bridge.registry import contract_genesis

    try:
        return contract_genesis(data_dir, cfg.bridge.genesis_allocations or None, cfg.bridge.operator_keys)
    except ValueError as exc:
        raise base._fail(str(exc)) from None


def _load_key(path: Path) -> Any:
    from carechain.identity import Identity, KeyFileError

    try:
        return Identity.load(path)
    except KeyFileError as exc:
        raise base._fail(str(exc)) from None


def _submit(config: Path | None, data_dir: Path | None, entry: Any) -> int:
    """Check `entry` against a replay of the ledger and append it; its leaf index (exit 1 if refused)."""
    from chain_bridge.contract_admin import ContractRefused, submit
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path

    cfg = base._config(config)
    bdir = base._bridge_dir(cfg, data_dir)
    genesis = _genesis(cfg, bdir)
    ledger = base._open_store(Ledger, ledger_path(bdir))
    try:
        return submit(ledger, genesis, [entry])[0]
    except ContractRefused as exc:
        raise base._fail(f"{exc} (nothing appended)", 1) from None
    finally:
        ledger.close()


def _replay(config: Path | None, data_dir: Path | None) -> Any:
    from chain_bridge.contract_admin import replay_ledger
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path

    cfg = base._config(config)
    bdir = base._bridge_dir(cfg, data_dir)
    if not ledger_path(bdir).exists():
        raise base._fail(f"no ledger at {ledger_path(bdir)} (use --data-dir: the bridge's data directory)")
    genesis = _genesis(cfg, bdir)
    ledger = base._open_store(Ledger, ledger_path(bdir))
    try:
        return replay_ledger(ledger, genesis)
    finally:
        ledger.close()


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        base.out.print_json(data=data)
    else:
        width = max(len(k) for k in data)
        base.out.print("\n".join(f"{k:<{width}}  {v}" for k, v in data.items()), soft_wrap=True, markup=False,
                       highlight=False)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise base._fail(f"{path}: cannot read {what}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise base._fail(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise base._fail(f"{path}: {what} must be a JSON object")
    return raw


# -- party --------------------------------------------------------------------------------------------

@party_app.command("register")
def party_register(
    role: Annotated[str, typer.Argument(help="prescriber, pharmacy, insurer or miner.")],
    public_key: Annotated[str, typer.Argument(help="The party's public key: 64 hex digits, or its key file.")],
    name: Annotated[str, typer.Option(help="A display name (e.g. the pharmacy's name).")],
    config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a party's public key in a role, signed by the operator key; its account is ROLE:<party id>.

    A pharmacy's terminals are then registered with `carechain register`, owner = the pharmacy's party id.
    """
    from carechain.identity import device_id_for
    from chain_bridge.registry import operator_key
    from contract_rules import transactions as ce

    if role not in ce.PARTY_ROLES:
        raise base._fail(f"role {role!r} must be one of {', '.join(ce.PARTY_ROLES)}")
    if Path(public_key).is_file():
        pk = _load_key(Path(public_key)).public_key
    else:
        try:
            pk = bytes.fromhex(public_key)
        except ValueError:
            pk = b""
        if len(pk) != 32:
            raise base._fail(f"{public_key!r} is neither 64 hex digits (an Ed25519 public key) nor a key file")
    cfg = base._config(config)
    bdir = base._bridge_dir(cfg, data_dir)
    reg = ce.PartyRegistration(role=role, pk=pk, name=name, ts=_now_ms())
    index = _submit(config, data_dir, ce.signed(operator_key(bdir), ce.PARTY_REGISTER, reg))
    party = device_id_for(pk)
    _print({"party_id": party, "role": role, "account": f"{role}:{party}", "leaf": index}, as_json)


# -- rx -----------------------------------------------------------------------------------------------

@rx_app.command("issue")
def rx_issue(
    draft: Annotated[Path, typer.Argument(help="Rx JSON: patient_token, drug_code, code_system (ndc|rxnorm|gtin), "
                                               "quantity, refills, expires (YYYY-MM-DD) or expires_ms, "
                                               "controlled, sig_text.")],
    key: KeyOpt,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where to write the signed Rx file "
                                                  "(default: DRAFT with the suffix .rx.json).")] = None,
    config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Sign an Rx with the prescriber's key, write the signed Rx file (off-ledger) and anchor its hash.

    Give the signed file to the patient and the pharmacy; the pharmacy's terminal puts its rx_ref on the sale.
    """
    from pydantic import ValidationError

    from chain_bridge.contract_admin import RxFile
    from contract_rules import transactions as ce

    prescriber = _load_key(key)
    raw = _read_json(draft, "the Rx draft")
    now = _now_ms()
    if "expires" in raw:
        try:
            day = datetime.date.fromisoformat(str(raw.pop("expires")))
        except ValueError:
            raise base._fail(f"{draft}: expires must be a date YYYY-MM-DD") from None
        raw["expires_ms"] = int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()
                                * 1000)
    try:
        rx = ce.Prescription.model_validate({**raw, "prescriber": prescriber.device_id, "issued_ms": now,
                                             "nonce": os.urandom(16)})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise base._fail(f"{draft}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    signed = RxFile(rx, ce.sign_prescription(prescriber, rx), prescriber.public_key)
    index = _submit(config, data_dir, ce.signed(prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, now)))
    target = out_file or draft.with_name(draft.name.removesuffix(".json") + ".rx.json")
    signed.write(target)
    _print({"rx_ref": rx.rx_ref(), "anchor_leaf": index, "rx_file": str(target)}, as_json)


def _rx_file(path: Path) -> Any:
    from chain_bridge.contract_admin import RxFileError, read_rx_file

    try:
        return read_rx_file(path)
    except RxFileError as exc:
        raise base._fail(str(exc)) from None


@rx_app.command("show")
def rx_show(rx_file: Annotated[Path, typer.Argument(help="A signed Rx file (from `carechain rx issue`).")],
            as_json: JsonOpt = False) -> None:
    """Print a signed Rx file: its terms, rx_ref and whether the prescriber's signature holds (offline)."""
    from carechain.identity import verify_signature

    signed = _rx_file(rx_file)
    good = verify_signature(signed.prescriber_pk, b"carechain/rx/v1\x00" + signed.rx.encode(), signed.signature)
    body = signed.to_json()["rx"]
    _print({**{k: v for k, v in body.items() if k not in ("v", "nonce")}, "rx_ref": signed.rx.rx_ref(),
            "signature": "valid" if good else "INVALID"}, as_json)
    if not good:
        raise typer.Exit(1)


@rx_app.command("verify")
def rx_verify(rx_file: Annotated[Path, typer.Argument(help="A signed Rx file (from `carechain rx issue`).")],
              config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Check an Rx file against the ledger: prescriber signature, anchored terms, revocation, fills left.

    Exit 1 if the Rx would not allow a sale (unknown, altered, revoked, or signed by another key)."""
    from chain_bridge.contract_admin import rx_status

    signed = _rx_file(rx_file)
    status = rx_status(_replay(config, data_dir), signed)
    if "problem" not in status and status["expires_ms"] <= _now_ms():
        status["problem"] = "rx_expired"
    status["ok"] = "problem" not in status and status["fills_left"] + (status["open_quantity"] > 0) > 0
    _print(status, as_json)
    if not status["ok"]:
        raise typer.Exit(1)


@rx_app.command("revoke")
def rx_revoke(rx: Annotated[str, typer.Argument(help="A signed Rx file, or its rx_ref (64 hex digits).")],
              key: KeyOpt, reason: Annotated[str, typer.Option(help="Why (kept on the ledger).")],
              config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke an anchored Rx (only its prescriber can): later sales against it are refused."""
    import re

    from contract_rules import transactions as ce

    ref = rx if re.fullmatch(r"[0-9a-f]{64}", rx) else _rx_file(Path(rx)).rx.rx_ref()
    index = _submit(config, data_dir, ce.signed(_load_key(key), ce.RX_REVOKE,
                                                ce.RxRevoke(rx_ref=ref, reason=reason, ts=_now_ms())))
    _print({"rx_ref": ref, "revoked_at_leaf": index}, as_json)


# -- policy -------------------------------------------------------------------------------------------

@policy_app.command("register")
def policy_register(
    policy: Annotated[Path, typer.Argument(help="Policy JSON: policy_id, patient_token, coverage [{category, bp, "
                                                "items: [\"ndc:CODE\", …]}], optional wellness {min_active_minutes,"
                                                " rebate_minor}. bp: basis points billed to the insurer.")],
    key: KeyOpt, config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a coverage policy for a patient, signed by the insurer: covered sales are billed to it."""
    from pydantic import ValidationError

    from contract_rules import transactions as ce

    insurer = _load_key(key)
    raw = _read_json(policy, "the policy")
    try:
        reg = ce.PolicyRegistration.model_validate({**raw, "ts": _now_ms()}, strict=False)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise base._fail(f"{policy}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    index = _submit(config, data_dir, ce.signed(insurer, ce.POLICY_REGISTER, reg))
    _print({"policy_id": reg.policy_id, "insurer": f"insurer:{insurer.device_id}", "leaf": index}, as_json)


@policy_app.command("settle")
def policy_settle(
    patient_token: Annotated[str, typer.Argument(help="The patient's token.")],
    week: Annotated[str, typer.Argument(help="The ISO week to settle, e.g. 2026-W47 (must be over).")],
    key: KeyOpt, config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Evaluate a patient's wellness week from anchored telemetry; pays the rebate if it was earned."""
    from contract_rules import transactions as ce

    try:
        settle = ce.WellnessSettle(patient_token=patient_token, week=week, ts=_now_ms())
    except ValueError:
        raise base._fail(f"week {week!r} must look like 2026-W47") from None
    index = _submit(config, data_dir, ce.signed(_load_key(key), ce.WELLNESS_SETTLE, settle))
    result = _replay(config, data_dir).state.table("wellness").get(f"{patient_token}:{week}", {})
    _print({"leaf": index, **result}, as_json)


# -- balance ------------------------------------------------------------------------------------------

def balance(account: Annotated[str | None, typer.Argument(help="One account, e.g. insurer:<party id>.")] = None,
            config: base.ConfigOpt = None, data_dir: base.DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Replay the ledger through the contracts and print token balances (minor units) and the state root."""
    state = _replay(config, data_dir).state
    balances = {account: state.balance(account)} if account else dict(sorted(state.balances.items()))
    data = {"balances": balances, "supply": state.supply, "size": state.size, "state_root": state.root().hex(),
            "violations": dict(sorted(state.table("violations").items()))}
    if as_json:
        base.out.print_json(data=data)
        return
    lines = [f"{a:<40} {n:>14}" for a, n in balances.items()] or ["(no balances)"]
    lines.append(f"supply {state.supply}, ledger size {state.size}, state root {data['state_root']}")
    lines += [f"violations {a}: {n}" for a, n in data["violations"].items()]
    base.out.print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)
