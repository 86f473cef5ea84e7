"""`carechain token transfer`, `carechain bond post|unbond|withdraw`, `carechain balance`.

Like the other contract commands (carechain/cli/contracts.py) they run on the bridge host: each replays the
ledger from the deployment's genesis, dry-runs the new entry against the contracts so a refused one never
reaches the log, and appends it. `balance` also says whether what it reports is final: the balances at the
latest final checkpoint the ledger records (`checkpoint.final`) against those at the head.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, replay, submit
from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load, out

token_app = typer.Typer(help="Move tokens from your own account to another.", no_args_is_help=True,
                        epilog=example("carechain token transfer pharmacy:7xq3kd2m4n5p6r7s 2500 --key keys/alice.key"))
bond_app = typer.Typer(help="Bonds: pharmacies, insurers and miners lock tokens to be admitted; violations slash them.",
                       no_args_is_help=True, epilog=example("carechain bond post 50000 --key keys/pharmacy.key"))
KeyOpt = Annotated[Path, typer.Option("--key", help="The acting party's key file (it signs the entry).")]
NonceOpt = Annotated[int | None, typer.Option("--nonce", help="Makes the entry unique (default: random); a "
                                                              "reused nonce is refused.")]


def _nonce(nonce: int | None) -> int:
    return secrets.randbits(63) if nonce is None else nonce


def _party(state: Any, party_id: str) -> dict[str, Any]:
    party: dict[str, Any] | None = state.table("parties").get(party_id)
    if party is None:
        raise fail(f"party {party_id} is not registered on this ledger (`carechain party register`)")
    return party


# -- token ----------------------------------------------------------------------------------------------------

@token_app.command("transfer", epilog=example(
    "carechain token transfer pharmacy:7xq3kd2m4n5p6r7s 2500 --key keys/alice.key --memo 'flu shot'"))
def token_transfer(
    to: Annotated[str, typer.Argument(help="The receiving account, ROLE:ID (e.g. pharmacy:<party id>).")],
    amount: Annotated[int, typer.Argument(help="Minor units (2500 = 25.00).", min=1)],
    key: KeyOpt, memo: Annotated[str, typer.Option(help="A note kept on the ledger.")] = "",
    nonce: NonceOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Move AMOUNT minor units from the signer's own account (ROLE:<its party id>) to TO."""
    from pydantic import ValidationError

    from contract_rules import transactions as ce

    sender = load_key(key)
    try:
        transfer = ce.TokenTransfer(to=to, amount=amount, nonce=_nonce(nonce), memo=memo)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (an account looks like pharmacy:<party id>)") \
            from None
    role = _party(replay(config, data_dir).state, sender.device_id)["role"]
    index = submit(config, data_dir, ce.signed(sender, ce.TOKEN_TRANSFER, transfer))
    print_result({"from": f"{role}:{sender.device_id}", "to": to, "amount": amount, "leaf": index}, as_json)


# -- bond -----------------------------------------------------------------------------------------------------

def _bond_result(config: Path | None, data_dir: Path | None, party_id: str, index: int) -> dict[str, Any]:
    from contract_rules.bonds import MIN_BOND, is_admitted

    state = replay(config, data_dir).state
    record = state.table("bonds").get(party_id, {})
    role = record.get("role", "")
    return {"party_id": party_id, "leaf": index, "bond": record.get("amount", 0),
            "unbonding": record.get("unbonding", 0), "release_ms": record.get("release_ms"),
            "min_bond": MIN_BOND.get(role), "admitted": is_admitted(state, party_id),
            "suspended_at": record.get("suspended_at"), "offences": record.get("offences", [])}


@bond_app.command("post", epilog=example("carechain bond post 50000 --key keys/pharmacy.key"))
def bond_post(amount: Annotated[int, typer.Argument(help="Minor units to lock from your own account.", min=1)],
              key: KeyOpt, nonce: NonceOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None,
              as_json: JsonOpt = False) -> None:
    """Lock AMOUNT in bond:<party id>. A pharmacy, insurer or miner is admitted while its bond (less what it
    is unbonding) is at least the minimum for its role and it is not suspended."""
    from contract_rules import transactions as ce

    party = load_key(key)
    entry = ce.signed(party, ce.BOND_POST, ce.BondPost(amount=amount, nonce=_nonce(nonce), ts=now_ms()))
    print_result(_bond_result(config, data_dir, party.device_id, submit(config, data_dir, entry)), as_json)


@bond_app.command("unbond", epilog=example("carechain bond unbond 10000 --key keys/pharmacy.key"))
def bond_unbond(amount: Annotated[int, typer.Argument(help="Minor units of the bond to ask back.", min=1)],
                key: KeyOpt, nonce: NonceOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                as_json: JsonOpt = False) -> None:
    """Ask for AMOUNT of the bond back. It stays slashable, and no longer counts towards admission, until it is
    released a week of attested ledger time later; then `carechain bond withdraw`."""
    from contract_rules import transactions as ce

    party = load_key(key)
    entry = ce.signed(party, ce.BOND_UNBOND, ce.BondUnbond(amount=amount, nonce=_nonce(nonce), ts=now_ms()))
    print_result(_bond_result(config, data_dir, party.device_id, submit(config, data_dir, entry)), as_json)


@bond_app.command("withdraw", epilog=example("carechain bond withdraw --key keys/pharmacy.key"))
def bond_withdraw(key: KeyOpt, nonce: NonceOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Move the released unbonding amount back to your own account."""
    from contract_rules import transactions as ce

    party = load_key(key)
    entry = ce.signed(party, ce.BOND_WITHDRAW, ce.BondWithdraw(nonce=_nonce(nonce), ts=now_ms()))
    print_result(_bond_result(config, data_dir, party.device_id, submit(config, data_dir, entry)), as_json)


# -- balance --------------------------------------------------------------------------------------------------

BALANCE_EPILOG = example("carechain balance --data-dir carechain-data/bridge",
                         "carechain balance insurer:7xq3kd2m4n5p6r7s --json")


def _state_at(config: Path | None, data_dir: Path | None, size: int) -> Any:
    """The contract state of the ledger's first `size` leaves (a replay from the genesis)."""
    from carechain.cli._ledger import deployment_genesis, open_bridge_ledger
    from contract_rules.replay import Replica

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    replica = Replica(deployment_genesis(cfg, bdir))
    ledger = open_bridge_ledger(cfg, bdir, missing="use --data-dir: the bridge's data directory")
    try:
        replica.apply_leaves(ledger.leaves(0, size))
    finally:
        ledger.close()
    return replica.state


def balance(account: Annotated[str | None, typer.Argument(help="One account, e.g. insurer:<party id>.")] = None,
            config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Replay the ledger through the contracts and print token balances (minor units) and the state root.

    `final` says whether every balance printed is also the balance at the latest final checkpoint (signed by
    the log and cosigned by a majority of the active miners): a final balance cannot be undone by a fork.
    """
    from contract_rules.miners import final_size

    state = replay(config, data_dir).state
    balances = {account: state.balance(account)} if account else dict(sorted(state.balances.items()))
    size = final_size(state)
    if size >= state.size:
        at_final = state
    elif size:
        at_final = _state_at(config, data_dir, size)
    else:
        at_final = None
    final_balances = {a: at_final.balance(a) for a in balances} if at_final is not None else {}
    final = at_final is not None and final_balances == balances
    data = {"balances": balances, "supply": state.supply, "size": state.size, "state_root": state.root().hex(),
            "violations": dict(sorted(state.table("violations").items())), "final": final,
            "final_size": size, "final_balances": final_balances}
    if as_json:
        out.print_json(data=data)
        return
    lines = [f"{a:<40} {n:>14}{'' if final_balances.get(a) == n else '  (not final)'}" for a, n in balances.items()]
    lines = lines or ["(no balances)"]
    lines.append(f"supply {state.supply}, ledger size {state.size}, final up to {size}, "
                 f"state root {data['state_root']}")
    lines += [f"violations {a}: {n}" for a, n in data["violations"].items()]
    out.print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)
