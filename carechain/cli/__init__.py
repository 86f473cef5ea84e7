"""The `carechain` command line: this module only builds the Typer app from the command groups.

One module per group (keys, register, cutover, bridge, agent, miner, contracts, access, store, proofs, demo), sharing
options and helpers through `carechain.cli._options`. Heavy modules (bridge, agent, broker) are imported
only by the command that needs them, so `carechain verify` stays small and fast on an auditor's laptop;
assembling a party from config is its own package's `assembly` module, not the CLI's.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from carechain.cli import (
    access,
    agent,
    bridge,
    consent,
    console,
    contracts,
    cutover,
    demo,
    export,
    formulary,
    keys,
    miner,
    proofs,
    register,
    store,
    study,
    tokens,
    trial,
)
from carechain.cli._options import example, out

SET_UP, RUN, CONTRACTS, RECORDS, STORAGE, AUDIT, TRY = ("Set up", "Run a party", "Contracts", "Records",
                                                        "Storage", "Audit", "Try it")

# In the order a deployment meets them: keys, register, run the bridge, agents and miners, then the
# contracts, storage and the proofs anyone can check; the demo last.
ORDER = ("keys", "register", "cutover", "bridge", "agent", "miner", "console", "party", "formulary", "rx",
         "policy", "token", "bond", "balance", "access", "consent", "study", "trial", "export", "store", "proof",
         "verify", "demo")


class _InOrder(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:  # typer's click Context
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


app = typer.Typer(cls=_InOrder,
    help="carechain: signed health events from edge devices, anchored in a verifiable ledger.",
    epilog=example("carechain demo", "carechain keys new keys/band-1.key", "carechain bridge --help"),
    no_args_is_help=True, add_completion=True, pretty_exceptions_show_locals=False,
)


def _version() -> str:
    try:
        return version("carechain")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        out.print(f"carechain {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version_: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """carechain: signed health events from edge devices, anchored in a verifiable ledger."""


app.add_typer(keys.keys_app, name="keys", rich_help_panel=SET_UP)
app.command("register", epilog=register.EPILOG, rich_help_panel=SET_UP)(register.register)
app.command("cutover", epilog=cutover.EPILOG, rich_help_panel=SET_UP)(cutover.cutover)
app.add_typer(bridge.bridge_app, name="bridge", rich_help_panel=RUN)
app.command("agent", epilog=agent.EPILOG, rich_help_panel=RUN)(agent.agent)
app.command("miner", epilog=miner.EPILOG, rich_help_panel=RUN)(miner.miner)
app.add_typer(contracts.party_app, name="party", rich_help_panel=CONTRACTS)
app.add_typer(contracts.rx_app, name="rx", rich_help_panel=CONTRACTS)
app.add_typer(contracts.policy_app, name="policy", rich_help_panel=CONTRACTS)
app.add_typer(formulary.formulary_app, name="formulary", rich_help_panel=CONTRACTS)
app.add_typer(tokens.token_app, name="token", rich_help_panel=CONTRACTS)
app.add_typer(tokens.bond_app, name="bond", rich_help_panel=CONTRACTS)
app.command("balance", epilog=tokens.BALANCE_EPILOG, rich_help_panel=CONTRACTS)(tokens.balance)
app.add_typer(access.access_app, name="access", rich_help_panel=RECORDS)
app.add_typer(consent.consent_app, name="consent", rich_help_panel=RECORDS)
app.add_typer(study.study_app, name="study", rich_help_panel=RECORDS)
app.add_typer(trial.trial_app, name="trial", rich_help_panel=RECORDS)
app.add_typer(store.store_app, name="store", rich_help_panel=STORAGE)
app.add_typer(export.export_app, name="export", rich_help_panel=RECORDS)
app.add_typer(console.console_app, name="console", rich_help_panel=RUN)
app.command("proof", epilog=proofs.PROOF_EPILOG, rich_help_panel=AUDIT)(proofs.proof)
app.command("verify", epilog=proofs.VERIFY_EPILOG, rich_help_panel=AUDIT)(proofs.verify)
app.command("demo", epilog=demo.EPILOG, rich_help_panel=TRY)(demo.demo)



def _reflow(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph, so help text wraps to the terminal, whatever its width.
    Indented lines (examples, tables) keep their line breaks."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(p if any(line.startswith((" ", "|", "-")) for line in p.splitlines())
                       else " ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    for cmd in typer_app.registered_commands:
        doc = cmd.help or (cmd.callback.__doc__ if cmd.callback else None)
        if doc:
            cmd.help = _reflow(doc)
    callback = typer_app.registered_callback
    if callback is not None:
        doc = callback.help or (callback.callback.__doc__ if callback.callback else None)
        if doc:
            callback.help = _reflow(doc)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)

if __name__ == "__main__":  # pragma: no cover
    app()
