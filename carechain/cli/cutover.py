"""`carechain cutover`: retire protocol 1 health readings from a tree size on (an operator-signed entry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carechain.cli._ledger import now_ms, print_result, submit
from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load

EPILOG = example("carechain cutover --data-dir carechain-data/bridge",
                 "carechain cutover --at-size 250000 --data-dir carechain-data/bridge --json")
# A default margin beyond the current size: the bridge keeps appending events while the entry is checked, and a
# cutover that is not in the future by the time it is appended is refused (`cutover_is_retroactive`).
DEFAULT_MARGIN = 100


def cutover(
    at_size: Annotated[int | None, typer.Option(min=1, help="Tree size from which plain-text (v1) readings of "
                                                "health kinds are refused with `version_retired`. Default: "
                                                f"the current size + {DEFAULT_MARGIN}.")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Retire protocol 1: append the operator-signed cutover entry (once per ledger).

    Agents move to protocol 2 one at a time, side by side with v1 agents on one bridge; once they all seal,
    this entry names the tree size after which the bridge (and every miner's rules) refuse v1 health readings.
    Pharmacy purchases stay accepted in either version. docs/protocol.md, "Cutover".
    """
    from carechain.cli._ledger import open_bridge_ledger
    from chain_bridge.registry import operator_key
    from contract_rules import transactions as ce

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir, missing="use --data-dir: the bridge's data directory")
    try:
        if (already := ledger.retire_v1_after()) is not None:
            raise fail(f"this ledger already retires protocol 1 from tree size {already} (nothing appended)", 1)
        size = ledger.size
    finally:
        ledger.close()
    retire = at_size if at_size is not None else size + DEFAULT_MARGIN
    if retire <= size:
        raise fail(f"--at-size {retire} is not in the future: the log already holds {size} entries")
    entry = ce.protocol_cutover_entry(operator_key(bdir), ce.ProtocolCutover(retire_v1_after=retire, ts=now_ms()))
    index = submit(config, data_dir, entry)
    print_result({"retire_v1_after": retire, "leaf": index, "data_dir": str(Path(bdir))}, as_json)
