"""`carechain formulary set|show`: the authority's signed formulary, which decides which sales need an Rx.

Like the other contract commands it runs on the bridge host: `set` dry-runs the authority's `formulary.set`
against a replay of the ledger and appends it; `show` replays the ledger and prints what the rules read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, read_json, replay, submit
from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, example, fail, out

formulary_app = typer.Typer(
    help="The formulary: which drugs need a prescription, their schedule, and how much one sale may hold. "
         "An item not on it is Rx-only.",
    no_args_is_help=True, epilog=example("carechain formulary set formulary.json --key keys/authority.key",
                                         "carechain formulary show ndc:70882-114-20"))


@formulary_app.command("set", epilog=example("carechain formulary set formulary.json --key keys/authority.key"))
def formulary_set(
    items: Annotated[Path, typer.Argument(help="Formulary JSON: {\"items\": [{item: \"ndc:CODE\", rx_only: true, "
                                               "schedule: 0-5, max_quantity: N}, …]}. Listed items are added or "
                                               "replaced; the others stay as they are.")],
    key: Annotated[Path, typer.Option("--key", help="The authority's key file (a party registered with role "
                                                    "authority) that signs the entry.")],
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Sign and append formulary items: from the next sale on, the rules decide Rx-only from them.

    A controlled item (schedule 1-5) must be Rx-only. The terminal's own rx_only flag can only make a sale
    stricter, never looser.
    """
    from pydantic import ValidationError

    from contract_rules import transactions as ce

    authority = load_key(key)
    raw = read_json(items, "the formulary")
    try:
        entry = ce.FormularySet.model_validate({**raw, "ts": now_ms()}, strict=False)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{items}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    index = submit(config, data_dir, ce.formulary_set_entry(authority, entry))
    print_result({"items": len(entry.items), "authority": authority.device_id, "leaf": index}, as_json)


@formulary_app.command("show", epilog=example("carechain formulary show", "carechain formulary show ndc:70882-114-20 "
                                                                          "--json"))
def formulary_show(
    item: Annotated[str | None, typer.Argument(help="One item, \"system:code\" (e.g. ndc:70882-114-20).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Print the formulary as the rules read it (replaying the ledger); an unlisted item is shown as Rx-only."""
    from contract_rules.formulary import TABLE, terms_of

    state = replay(config, data_dir).state
    if item is not None:
        terms = terms_of(state, item)
        print_result({"item": item, "listed": item in state.table(TABLE), **_terms(terms)}, as_json)
        return
    listed = {name: _terms(terms) for name, terms in sorted(state.table(TABLE).items())}
    if as_json:
        out.print_json(data={"items": listed, "unlisted": "rx_only"})
        return
    lines = [f"{name:<36} {'Rx-only' if t['rx_only'] else 'OTC':<8} schedule {t['schedule']}  "
             f"max {t['max_quantity']}  (leaf {t['at']})" for name, t in listed.items()]
    lines.append("(items not listed are Rx-only)")
    out.print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)


def _terms(terms: dict[str, Any]) -> dict[str, Any]:
    return {k: terms.get(k) for k in ("rx_only", "schedule", "max_quantity", "authority", "at")}
