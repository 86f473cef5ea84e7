"""`carechain proof` (print a proof bundle from the ledger) and `carechain verify` (check one offline).

`verify` exits 0 when the proof holds, 1 when it does not (or the file is not a bundle), 2 on a usage error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from carechain.cli._options import ConfigOpt, DataDirOpt, bridge_dir, console, example, fail, load, open_store, out

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

PROOF_EPILOG = example("carechain proof 7xq3kd2m4n5p6r7s 0 --data-dir carechain-data/bridge --json > p.json",
                       "carechain proof --consistency 4:8 --data-dir carechain-data/bridge")
VERIFY_EPILOG = example("carechain verify p.json --log-key 3b6a…e1",
                        "carechain verify --checkpoint note.txt --log-key 3b6a…e1",
                        "carechain verify --full --data-dir carechain-data/bridge",
                        "carechain verify --tiles https://log.example.org/ --log-key 3b6a…e1 --index 42",
                       "carechain verify study hr-2026-q4 --data-dir carechain-data/bridge --checkpoint note.txt",
                        "carechain verify trial hrt-1 --data-dir carechain-data/bridge --json",
                        "carechain verify anchor --checkpoint note.txt --log-key 3b6a…e1 --anchor-rpc "
                        "http://127.0.0.1:8545 --data-dir carechain-data/bridge")
NO_LOG_KEY_WARNING = ("WARNING: no --log-key: checked only that the bundle is self-consistent, not that the log "
                      "signed it. Pass --log-key HEX, the log's public key from its operator.")


def proof(
    device_id: Annotated[str | None, typer.Argument(help="Device id of the event.")] = None,
    seq: Annotated[int | None, typer.Argument(help="The event's seq.")] = None,
    consistency: Annotated[str | None, typer.Option(
        help="Instead: a consistency proof OLD[:NEW] between two checkpointed tree sizes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the proof bundle as JSON.")] = False,
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Print an inclusion proof for event (DEVICE_ID, SEQ) — or a consistency proof — checkable offline
    with `carechain verify` (format: docs/proofs.md)."""
    from carechain.cli._ledger import open_bridge_ledger
    from chain_bridge.ledger.proofs import consistency_bundle, inclusion_bundle
    from chain_bridge.ledger.store import LedgerError
    from chain_bridge.registry import log_key

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir, missing="use --data-dir")
    pk = log_key(bdir).public_key
    try:
        if consistency:
            old, _, new = consistency.partition(":")
            bundle: BaseModel = consistency_bundle(ledger, int(old), int(new) if new else None, pk)
        elif device_id is not None and seq is not None:
            bundle = inclusion_bundle(ledger, device_id, seq, pk)
        else:
            raise fail("give DEVICE_ID SEQ, or --consistency OLD[:NEW]")
    except (LedgerError, ValueError) as exc:
        raise fail(str(exc)) from None
    finally:
        ledger.close()
    if as_json:
        out.print_json(bundle.model_dump_json())
    else:
        # Plain text, never wrapped: the output is redirected to a file that `verify` must parse.
        out.print(bundle.model_dump_json(indent=2), soft_wrap=True, markup=False, highlight=False)


def _bundle_problem(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first problem of a bundle that does not parse (never pydantic's dump)."""
    err = exc.errors()[0]
    where = ".".join(map(str, err["loc"])) or "bundle"
    if err["type"] == "extra_forbidden":
        return (f"not a proof bundle: unknown field {where!r} (a {model.__name__} has "
                f"{', '.join(model.model_fields)}; see docs/proofs.md)")
    if err["type"] == "missing":
        return f"not a proof bundle: field {where!r} is missing (see docs/proofs.md)"
    return f"not a proof bundle: {where}: {err['msg']}"


def _trusted_key(log_key_hex: str | None) -> bytes | None:
    from carechain.identity import PublicKeyError, parse_public_key_hex

    if not log_key_hex:
        return None
    try:
        return parse_public_key_hex(log_key_hex, "--log-key")
    except PublicKeyError as exc:
        raise fail(str(exc)) from None


def verify(
    bundle_file: Annotated[Path | None, typer.Argument(help="A proof bundle JSON file, or - for stdin; or the "
                                                       "word `study` or `trial` followed by its id; or the word "
                                                       "`anchor` (with --checkpoint and --anchor-rpc).")] = None,
    study_id: Annotated[str | None, typer.Argument(help="With `verify study` or `verify trial`: the study or "
                                                   "trial to check.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Instead: check a signed checkpoint note file.")] = None,
    log_key_hex: Annotated[str | None, typer.Option("--log-key", help="Trusted log public key (hex). "
                                                    "Without it, the key in the bundle is used.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Instead: audit a whole ledger (--data-dir): every leaf "
                                       "hash, tree head, checkpoint, consistency and event signature.")] = False,
    data_dir: DataDirOpt = None,
    operator_keys: Annotated[list[str] | None, typer.Option("--operator-key", help="With --full: an operator "
                             "public key (hex) trusted for registrations; repeatable.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="With --full: processes that check "
                       "event signatures (0: none, all in this one); default: one per core.")] = None,
    state: Annotated[Path | None, typer.Option("--state", metavar="FILE", help="With --full: resume from the "
                     "audit state in FILE if it exists (only the leaves appended since are read), and save the "
                     "state at the last checkpoint there after a successful audit (mode 0600).")] = None,
    config: ConfigOpt = None,
    tiles: Annotated[str | None, typer.Option("--tiles", metavar="URL", help="Instead: read the log from C2SP "
                     "tlog-tiles at URL (docs/tiles.md) and check its checkpoint (needs --log-key); with --index N, "
                     "leaf N's inclusion; with --checkpoint NOTE, that the log extends NOTE; with --full, every "
                     "entry and tile.")] = None,
    index: Annotated[int | None, typer.Option("--index", min=0, help="With --tiles: the leaf to prove.")] = None,
    anchor_rpc: Annotated[str | None, typer.Option("--anchor-rpc", metavar="URL", help="With --checkpoint: check "
                          "that an anchor transaction on the chain at this JSON-RPC URL covers the checkpoint "
                          "(docs/anchoring.md).")] = None,
    anchor_tx: Annotated[str | None, typer.Option("--anchor-tx", metavar="HASH", help="The anchor transaction; "
                         "default: the smallest mined anchor covering the checkpoint in --data-dir's anchor "
                         "records.")] = None,
    anchor_proof: Annotated[Path | None, typer.Option("--anchor-proof", help="A consistency bundle from the "
                            "checkpoint to the anchored size (`carechain proof --consistency OLD:NEW --json`); "
                            "default: computed from --data-dir's ledger.")] = None,
    confirmations: Annotated[int, typer.Option("--confirmations", min=1, help="With --anchor-rpc: blocks, the "
                             "anchor's included, required on top of the anchor transaction.")] = 12,
    anchor_account: Annotated[str | None, typer.Option("--anchor-account", help="With --anchor-rpc: also require "
                              "the anchor to come from this address (the log's anchoring account).")] = None,
    chain_id: Annotated[int | None, typer.Option("--chain-id", help="With --anchor-rpc: also require the node to "
                        "be on this chain.")] = None,
) -> None:
    """Check a proof offline, from public data alone: an inclusion proof (event → signed checkpoint),
    a consistency proof between two checkpoints, or a checkpoint signature. Exit 0 if it holds, 1 if it
    does not, 2 on a usage error. With --full, audit a whole ledger store instead (docs/proofs.md). With
    `study ID`, check a data-market study from the ledger (--data-dir) against a checkpoint (docs/market.md);
    with `trial ID`, a clinical trial (docs/trials.md). With `anchor` (or --anchor-rpc), that a checkpoint is
    covered by a confirmed anchor transaction on an Ethereum-compatible chain (docs/anchoring.md). With
    --tiles URL, read the log from its static tiles instead (docs/tiles.md)."""
    from pydantic import ValidationError

    word = str(bundle_file)
    if anchor_rpc is not None or (word == "anchor" and not Path(word).exists()):
        if study_id is not None or (bundle_file is not None and word != "anchor"):
            raise fail("verify anchor takes no file argument: carechain verify anchor --checkpoint NOTE "
                       "--anchor-rpc URL [--anchor-tx HASH] [--anchor-proof BUNDLE | --data-dir DIR]")
        _verify_anchor(checkpoint, log_key_hex, anchor_rpc, anchor_tx, anchor_proof, data_dir, confirmations,
                       anchor_account, chain_id, as_json)
        return
    if study_id is not None or (word in ("study", "trial") and not Path(word).exists()):
        if word not in ("study", "trial") or study_id is None:
            what = word if word in ("study", "trial") else "study|trial"
            raise fail(f"to check a {what.replace('|', ' or a ')}: carechain verify {what} ID --data-dir DIR "
                       "[--checkpoint NOTE]")
        verify_ledger_item(word, study_id, config, data_dir, checkpoint, log_key_hex, as_json)
        return
    if tiles is not None:
        _verify_tiles(tiles, log_key_hex, index, checkpoint, full, operator_keys, as_json)
        return
    if full:
        _verify_full(data_dir, log_key_hex, operator_keys, as_json, workers, state, config)
        return

    from carechain.proofs import (
        ConsistencyBundle,
        InclusionBundle,
        VerificationError,
        verify_checkpoint,
        verify_consistency_bundle,
        verify_inclusion_bundle,
    )

    trusted = _trusted_key(log_key_hex)
    if checkpoint is None and bundle_file is None:
        raise fail("give a proof bundle file (or -), or --checkpoint NOTE --log-key HEX")
    if checkpoint is not None and trusted is None:
        raise fail("--log-key is required to check a checkpoint")
    source = checkpoint if checkpoint is not None else bundle_file
    try:
        text = sys.stdin.read() if str(source) == "-" else Path(str(source)).read_text()
    except OSError as exc:
        raise fail(f"{source}: cannot read it: {exc.strerror}") from None
    result: dict[str, Any]
    try:
        if checkpoint is not None:
            assert trusted is not None
            cp = verify_checkpoint(text, trusted)
            result = {"ok": True, "checkpoint": {"origin": cp.origin, "tree_size": cp.tree_size,
                                                 "root_hash": cp.root_hash.hex()}}
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise VerificationError(f"not a proof bundle: the file is not JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise VerificationError("not a proof bundle: a proof bundle is a JSON object (see docs/proofs.md)")
            model: type[BaseModel] = ConsistencyBundle if "consistency_path" in raw else InclusionBundle
            try:
                parsed = model.model_validate(raw)
            except ValidationError as exc:
                raise VerificationError(_bundle_problem(exc, model)) from None
            if isinstance(parsed, ConsistencyBundle):
                old, new = verify_consistency_bundle(parsed, trusted)
                result = {"ok": True, "consistency": {"old_size": old.tree_size, "new_size": new.tree_size}}
            else:
                assert isinstance(parsed, InclusionBundle)
                v = verify_inclusion_bundle(parsed, trusted)
                result = {"ok": True, "inclusion": {"leaf_index": v.leaf_index, "tree_size": v.checkpoint.tree_size,
                                                    "entry_type": v.entry_type, "device_id": v.device_id,
                                                    "seq": v.seq, "kind": v.kind}}
    except (VerificationError, ValueError) as exc:
        if as_json:
            out.print_json(data={"ok": False, "error": str(exc)})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if trusted is None:
        console.print(f"[bold yellow]{escape(NO_LOG_KEY_WARNING)}[/]", soft_wrap=True)
    if as_json:
        out.print_json(data=result)
    else:
        details = json.dumps({k: v for k, v in result.items() if k != 'ok'})
        out.print(f"[bold green]VERIFIED[/] {escape(details)}", soft_wrap=True)


def _verify_tiles(url: str, log_key_hex: str | None, index: int | None, older: Path | None, full: bool,
                  operator_hex: list[str] | None, as_json: bool) -> None:
    """`verify --tiles URL`: the served checkpoint, and an inclusion (--index), a consistency (--checkpoint) or
    everything (--full), from tiles over HTTP (carechain.tile_client); exit 1 when something does not hold."""
    from carechain.identity import PublicKeyError, device_id_for, parse_public_key_hex
    from carechain.proofs import VerificationError, verify_consistency_bundle, verify_inclusion_bundle
    from carechain.tile_client import HttpTiles, TiledLog, TileFetchError
    from carechain.tiles import TileError

    trusted = _trusted_key(log_key_hex)
    if trusted is None:
        raise fail("--tiles needs --log-key HEX: the log's public key, from its operator (tiles carry no key)")
    if sum((index is not None, older is not None, full)) > 1:
        raise fail("with --tiles give at most one of --index N, --checkpoint NOTE and --full")
    try:
        operators = ({device_id_for(k): k for k in (parse_public_key_hex(h, "--operator-key") for h in operator_hex)}
                     if operator_hex else None)
        older_note = older.read_text() if older is not None else None
    except PublicKeyError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{older}: cannot read the checkpoint: {exc.strerror}") from None
    result: dict[str, Any]
    try:
        log = TiledLog(HttpTiles(url), trusted)
        cp, note = log.checkpoint()
        result = {"ok": True, "checkpoint": {"origin": cp.origin, "tree_size": cp.tree_size,
                                             "root_hash": cp.root_hash.hex()}}
        if index is not None:
            v = verify_inclusion_bundle(log.inclusion_bundle(index, note), trusted)
            result["inclusion"] = {"leaf_index": v.leaf_index, "tree_size": cp.tree_size, "entry_type": v.entry_type,
                                   "device_id": v.device_id, "seq": v.seq, "kind": v.kind}
        elif older_note is not None:
            old, new = verify_consistency_bundle(log.consistency_bundle(older_note, note), trusted)
            result["consistency"] = {"old_size": old.tree_size, "new_size": new.tree_size}
        elif full:
            result["full"] = _audit_tiles(log, cp, note, trusted, operators)
    except (VerificationError, TileFetchError, TileError, ValueError) as exc:
        if as_json:
            out.print_json(data={"ok": False, "error": str(exc)})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(data=result)
    else:
        details = json.dumps({k: v for k, v in result.items() if k != "ok"})
        out.print(f"[bold green]VERIFIED[/] {escape(url)}: {escape(details)}", soft_wrap=True, highlight=False)


def _audit_tiles(log: Any, cp: Any, note: str, trusted: bytes, operators: dict[str, bytes] | None
                 ) -> dict[str, Any]:
    """Every entry of a tiled log through the ledger auditor (signatures, registrations), every tile rebuilt."""
    from carechain.entries import Entry, EntryError
    from carechain.proofs import VerificationError
    from chain_bridge.ledger.integrity import AuditFailure, LogAuditor

    auditor = LogAuditor(trusted, operator_keys=operators)
    try:
        for e in log.entries(cp):
            try:
                entry_type = Entry.decode(e.data).type
            except EntryError as exc:
                raise VerificationError(f"leaf {e.index}: not a carechain entry: {exc}") from None
            auditor.entry(e.index, entry_type, e.leaf_hash, e.data)
        auditor.checkpoint(cp.tree_size, cp.root_hash, note)
    except AuditFailure as exc:
        raise VerificationError(str(exc)) from None
    return auditor.finish().as_dict()


def _verify_full(data_dir: Path | None, log_key_hex: str | None, operator_hex: list[str] | None,
                 as_json: bool, workers: int | None, state: Path | None, config: Path | None) -> None:
    """`verify --full`: audit a whole ledger store (chain_bridge.ledger.integrity) where `bridge.store` says
    (DATA_DIR/ledger.db, or the PostgreSQL database), progress bar on stderr; event signatures checked on
    `workers` processes; resumed from and saved to the `state` file."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from carechain.identity import Identity, KeyFileError, PublicKeyError, device_id_for, parse_public_key_hex
    from carechain.sqlite_store import StoreError
    from chain_bridge.ledger.integrity import AuditFailure, AuditReport, audit_ledger
    from chain_bridge.ledger.sql import SqliteLocation
    from chain_bridge.ledger.store import store_location
    from chain_bridge.registry import LOG_KEY_FILE, OPERATOR_KEY_FILE

    if data_dir is None:
        raise fail("--full needs --data-dir: the bridge data directory that holds ledger.db")
    try:
        if log_key_hex:
            log_key = parse_public_key_hex(log_key_hex, "--log-key")
        elif (data_dir / LOG_KEY_FILE).exists():
            log_key = Identity.load(data_dir / LOG_KEY_FILE).public_key
        else:
            raise fail(f"no log key: pass --log-key HEX (the log's public key, from its operator), or a "
                       f"--data-dir with {LOG_KEY_FILE}")
        operators: dict[str, bytes] | None = None
        if operator_hex:
            keys = [parse_public_key_hex(k, "--operator-key") for k in operator_hex]
            operators = {device_id_for(k): k for k in keys}
        elif (data_dir / OPERATOR_KEY_FILE).exists():
            op = Identity.load(data_dir / OPERATOR_KEY_FILE)
            operators = {op.device_id: op.public_key}
    except (KeyFileError, PublicKeyError) as exc:
        raise fail(str(exc)) from None

    bar: Progress | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= 20_000:  # small logs verify in well under a second
            bar = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TextColumn("entries"),
                           TimeRemainingColumn(), console=console, transient=True)
            bar.start()
            bar.add_task("entries", total=total)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done)

    location = store_location(load(config).bridge, data_dir, role="carechain verify")
    if isinstance(location, SqliteLocation) and location.moved_marker.exists():
        raise fail(f"{location.path}: this data directory's ledger is in PostgreSQL: give the config that names "
                   "it in bridge.store (--config)")
    where = str(location.path) if isinstance(location, SqliteLocation) else location.describe()

    def audit(source: Any) -> AuditReport:
        return audit_ledger(source, log_key, operator_keys=operators, on_progress=on_progress, state_file=state,
                            workers=(os.cpu_count() or 1) if workers is None else workers)

    try:
        if isinstance(location, SqliteLocation):
            report = audit(location.path)
        else:
            from chain_bridge.ledger.postgres import PostgresLocation, PostgresLogSource

            assert isinstance(location, PostgresLocation)  # the only other backend
            with PostgresLogSource(location) as log:
                report = audit(log)
    except (AuditFailure, StoreError) as exc:
        if bar is not None:
            bar.stop()
        if as_json:
            out.print_json(data={"ok": False, "error": str(exc), "where": getattr(exc, "where", "store"),
                                 "index": getattr(exc, "index", None)})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if bar is not None:
        bar.stop()
    if as_json:
        out.print_json(data={"ok": True, "full": report.as_dict()})
        return
    r = report
    notes = [f"root {r.root.hex()} at size {r.entries}"]
    if r.uncovered:
        notes.append(f"{r.uncovered} entries after the last checkpoint are not yet covered by a signed one")
    if not r.operator_signatures_checked:
        notes.append("registration signers not checked (give --operator-key HEX)")
    if r.resumed_at is not None:
        notes.append(f"resumed at checkpoint {r.resumed_at}, audited {r.entries - r.resumed_at} new leaves")
    if state is not None and r.last_checkpoint_size is not None:
        notes.append(f"state saved to {state} at checkpoint {r.last_checkpoint_size}")
    elif state is not None:
        notes.append("no checkpoint yet, so no state saved")
    contract = f", {r.contract_entries} contract entries" if r.contract_entries else ""
    out.print(f"[bold green]VERIFIED[/] {escape(where)}: {r.entries} entries ({r.events} events, "
              f"{r.registrations} registrations, {r.revocations} revocations{contract}), {r.checkpoints} checkpoints "
              f"signed by the log key, {r.consistency_proofs} consistency proofs; {escape('; '.join(notes))}",
              soft_wrap=True, highlight=False)


def verify_ledger_item(kind: str, item_id: str, config: Path | None, data_dir: Path | None,
                       checkpoint: Path | None, log_key_hex: str | None, as_json: bool) -> None:
    """`verify study ID` or `verify trial ID` (`kind`): replay the ledger and re-check the study
    (contract_rules.study_check) or the trial (contract_rules.trial_check) against a checkpoint verified with
    the log key: --checkpoint NOTE, or the ledger's latest one. Exit 1 when a check fails."""
    from carechain.cli._ledger import deployment_genesis, open_bridge_ledger
    from carechain.identity import Identity, KeyFileError
    from carechain.proofs import VerificationError, verify_checkpoint
    from chain_bridge.registry import LOG_KEY_FILE
    from contract_rules.study_check import verify_study
    from contract_rules.trial_check import verify_trial

    if data_dir is None:
        raise fail(f"verify {kind} needs --data-dir: the bridge data directory (its log key, genesis and ledger)")
    cfg = load(config)
    ledger = open_bridge_ledger(cfg, data_dir, missing="use --data-dir")
    ledger.close()  # opened first: a missing or damaged ledger is said before anything else
    trusted = _trusted_key(log_key_hex)
    if trusted is None:
        try:
            trusted = Identity.load(data_dir / LOG_KEY_FILE).public_key
        except KeyFileError as exc:
            raise fail(f"no log key: pass --log-key HEX (the log's public key, from its operator): {exc}") from None
    genesis = deployment_genesis(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, data_dir)
    try:
        leaves = list(ledger.leaves(0, ledger.size))
        latest = ledger.latest_checkpoint()
    finally:
        ledger.close()
    if checkpoint is not None:
        try:
            note: str | None = checkpoint.read_text()
        except OSError as exc:
            raise fail(f"{checkpoint}: cannot read the checkpoint: {exc.strerror}") from None
    else:
        note = latest[1] if latest else None
    problem: str | None = None
    try:
        cp = verify_checkpoint(note, trusted) if note is not None else None
    except (VerificationError, ValueError) as exc:
        cp, problem = None, str(exc)
    report = (verify_trial if kind == "trial" else verify_study)(leaves, genesis, item_id, cp)
    result = report.as_dict()
    if problem is not None:
        result["ok"] = False
        result["checks"].append({"check": "checkpoint", "ok": False, "detail": problem})
    if as_json:
        out.print_json(data=result)
    else:
        for c in result["checks"]:
            mark = "[green]ok[/]  " if c["ok"] else "[bold red]FAIL[/]"
            out.print(f"{mark} {escape(c['check'])}: {escape(c['detail'])}", soft_wrap=True, highlight=False)
        verdict = "[bold green]VERIFIED[/]" if result["ok"] else "[bold red]NOT VERIFIED:[/]"
        out.print(f"{verdict} {kind} {escape(item_id)} ({escape(str(report.state))})", soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)


def _verify_anchor(checkpoint: Path | None, log_key_hex: str | None, rpc: str | None, tx_text: str | None,
                   proof_file: Path | None, data_dir: Path | None, confirmations: int, account: str | None,
                   chain_id: int | None, as_json: bool) -> None:
    """`verify anchor`: the checkpoint (signed by the log key) is covered by a confirmed anchor transaction —
    fetched from the node at --anchor-rpc, decoded, its block checked on the node's chain, then the consistency
    proof from the checkpoint to the anchored tree head (carechain.anchor.verify_coverage)."""
    from carechain.anchor import AnchorError, decode_calldata, verify_coverage
    from carechain.identity import Identity, KeyFileError
    from carechain.proofs import VerificationError, verify_checkpoint
    from chain_bridge.anchoring import ANCHORS_DB, AnchoringError, AnchorRecords, EthereumChain, parse_tx_hash
    from chain_bridge.registry import LOG_KEY_FILE

    if checkpoint is None or rpc is None:
        raise fail("verify anchor needs --checkpoint NOTE and --anchor-rpc URL")
    trusted = _trusted_key(log_key_hex)
    if trusted is None and data_dir is not None and (data_dir / LOG_KEY_FILE).exists():
        try:
            trusted = Identity.load(data_dir / LOG_KEY_FILE).public_key
        except KeyFileError as exc:
            raise fail(str(exc)) from None
    if trusted is None:
        raise fail("verify anchor needs --log-key HEX (the log's public key, from its operator)")
    try:
        note = checkpoint.read_text()
    except OSError as exc:
        raise fail(f"{checkpoint}: cannot read the checkpoint: {exc.strerror}") from None

    def not_verified(problem: str) -> typer.Exit:
        if as_json:
            out.print_json(data={"ok": False, "error": problem})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(problem)}", soft_wrap=True)
        return typer.Exit(1)

    try:
        cp = verify_checkpoint(note, trusted)
    except VerificationError as exc:
        raise not_verified(str(exc)) from None
    if tx_text is not None:
        try:
            tx_hash = parse_tx_hash(tx_text)
        except ValueError as exc:
            raise fail(f"--anchor-tx: {exc}") from None
    else:
        db = data_dir / ANCHORS_DB if data_dir is not None else None
        if db is None or not db.exists():
            raise fail("give --anchor-tx HASH, or a --data-dir whose anchors.db records the bridge's anchors")
        records = AnchorRecords(db)
        try:
            found = records.covering(cp.origin, cp.tree_size)
        finally:
            records.close()
        if found is None:
            raise not_verified(f"no mined anchor in {db} covers tree size {cp.tree_size} of {cp.origin!r} yet")
        tx_hash = found.tx_hash
    try:
        facts = EthereumChain.from_url(rpc).facts(tx_hash)
        anchored = decode_calldata(facts.input)
        path: list[bytes] = []
        if anchored.tree_size > cp.tree_size:
            path = _anchor_consistency_path(cp.tree_size, anchored.tree_size, proof_file, data_dir, trusted)
        coverage = verify_coverage(facts, cp, trusted, path, confirmations, chain_id=chain_id, sender=account)
    except (AnchoringError, AnchorError) as exc:
        raise not_verified(str(exc)) from None
    if as_json:
        out.print_json(data={"ok": True, "anchor": coverage.as_dict()})
    else:
        out.print(f"[bold green]VERIFIED[/] {escape(json.dumps(coverage.as_dict()))}", soft_wrap=True)


def _anchor_consistency_path(old: int, new: int, proof_file: Path | None, data_dir: Path | None,
                             log_key: bytes) -> list[bytes]:
    """The consistency path from tree size `old` to `new`: from a bundle file, or from the ledger in `data_dir`
    (either way only a path: `check_covered` checks it against the two roots)."""
    from pydantic import ValidationError

    from carechain.proofs import ConsistencyBundle

    if proof_file is not None:
        try:
            bundle = ConsistencyBundle.model_validate_json(proof_file.read_text())
        except OSError as exc:
            raise fail(f"{proof_file}: cannot read it: {exc.strerror}") from None
        except ValidationError as exc:
            raise fail(f"{proof_file}: {_bundle_problem(exc, ConsistencyBundle)}") from None
        return [bytes.fromhex(h) for h in bundle.consistency_path]
    from chain_bridge.ledger.proofs import consistency_bundle
    from chain_bridge.ledger.store import Ledger, LedgerError
    from chain_bridge.registry import ledger_path

    if data_dir is None or not ledger_path(data_dir).exists():
        raise fail(f"the anchor covers tree size {new}, the checkpoint {old}: give --anchor-proof (from "
                   f"`carechain proof --consistency {old}:{new} --json`) or the log's --data-dir")
    ledger = open_store(Ledger, ledger_path(data_dir))
    try:
        return [bytes.fromhex(h) for h in consistency_bundle(ledger, old, new, log_key).consistency_path]
    except (LedgerError, ValueError) as exc:
        raise fail(f"cannot prove {old} → {new} from {data_dir}: {exc}") from None
    finally:
        ledger.close()
