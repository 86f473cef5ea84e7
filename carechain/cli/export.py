"""`carechain export`: the ledger's records in the formats of the field (docs/fhir.md).

`export fhir` writes one owner's records as a FHIR R4 Bundle. Readings are sealed, so they are opened
through an access record with the functions `carechain access open` uses — exporting is an access, and it
is on the access log: the owner's own export first appends her own request and grant (like any access);
anyone else exports under the grants the owner gave them. Prescriptions, fills, claims, consents and the
access log come from a replay of the ledger. `export fhir --verify` re-checks a bundle's Provenance offline.
The mappings are in `record_access.fhir`; this module gathers their inputs and prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import (
    final_note,
    load_key,
    load_pre_key,
    now_ms,
    open_bridge_ledger,
    replay,
    submit_all,
    submit_faults,
)
from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    Progress,
    bridge_dir,
    console,
    example,
    fail,
    load,
    out,
    parse_duration_ms,
    parse_when_ms,
    resolved_broker,
)

export_app = typer.Typer(
    no_args_is_help=True, help="Export records in the formats of the field (FHIR R4).",
    epilog=example("carechain export fhir --key keys/alice.key --pre-key keys/alice.pre --since 30d --out alice.json",
                   "carechain export fhir --verify alice.json --log-key 3b6a…e1"))

MAX_BUNDLE_BYTES = 1 << 30  # --verify reads the whole file: refuse what cannot be an export of ours
ALL_SECTIONS = "observations,medications,claims,audit,consents"


@export_app.command("fhir", epilog=example(
    "carechain export fhir --key keys/alice.key --pre-key keys/alice.pre --since 30d --out alice.fhir.json",
    "carechain export fhir --key keys/doctor.key --pre-key keys/doctor.pre --owner 7xq3kd2m4n5p6r7s "
    "--since 2026-12-01 --until 2026-12-02 --kinds observations --out visit.fhir.json",
    "carechain export fhir --verify alice.fhir.json --log-key 3b6a…e1"))
def fhir(
    key: Annotated[Path | None, typer.Option("--key", help="Your Ed25519 key file (it signs the access).")] = None,
    pre_key: Annotated[Path | None, typer.Option("--pre-key", help="Your re-encryption key file (`carechain keys "
                                                                   "new --pre`).")] = None,
    owner: Annotated[str | None, typer.Option(help="Whose records (party id); default: yours.")] = None,
    since: Annotated[str, typer.Option(help="Start: a duration back from now (30d, 12h), epoch ms or ISO 8601 "
                                            "time.")] = "24h",
    until: Annotated[str, typer.Option(help="End (exclusive): epoch ms, ISO 8601 time or now.")] = "now",
    kinds: Annotated[str, typer.Option(help="Comma-separated sections to export.")] = ALL_SECTIONS,
    access: Annotated[list[int] | None, typer.Option("--access", help="Open only this access record (the grant's "
                                                                      "leaf); repeatable. Default: your own new "
                                                                      "access as the owner, else every active "
                                                                      "grant the owner gave you.")] = None,
    patient_token: Annotated[list[str] | None, typer.Option("--patient-token", help="Another pseudonymous "
                                                                                    "patient token of the owner's "
                                                                                    "prescriptions; repeatable.")]
    = None,
    purpose: Annotated[str, typer.Option(help="The purpose on the owner's own access record.")] = "FHIR export",
    threshold: Annotated[int, typer.Option(help="The owner's own access: m of the n miners.", min=1)] = 3,
    shares: Annotated[int, typer.Option(help="The owner's own access: n miners.", min=1, max=16)] = 5,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where to write the bundle (mode 0600, "
                                                                "written atomically).")] = None,
    verify: Annotated[Path | None, typer.Option("--verify", help="Instead of exporting: check every Provenance "
                                                                 "of this bundle offline.")] = None,
    log_key: Annotated[str | None, typer.Option("--log-key", help="With --verify: the trusted log public key "
                                                                  "(hex), from the log's operator.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the pages and the miners' fragments, per "
                                                "access record.")] = 60.0,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Write one owner's records as a FHIR R4 Bundle: Observations (vital signs, LOINC + UCUM) with their Device
    and a Provenance (device signature, ledger inclusion proof), MedicationRequest/MedicationDispense, Claims,
    AuditEvents of the access log, Consents.

    Readings are opened through an access record like `carechain access open`, so the export is on the
    access log; a reading that fails a check stops the export (exit 1) and nothing is written.
    """
    if verify is not None:
        _verify(verify, log_key, as_json)
        return
    if key is None or pre_key is None or out_file is None:
        raise fail("give --key, --pre-key and --out (or --verify BUNDLE.json to check a bundle)")
    sections = [s.strip() for s in kinds.split(",") if s.strip()]
    from record_access.fhir import SECTIONS

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise fail(f"--kinds: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from "
                   f"{', '.join(SECTIONS)}")
    me, me_pre = load_key(key), load_pre_key(pre_key)
    now = now_ms()
    from_ms, to_ms = parse_when_ms(since, "--since", now, back=True), parse_when_ms(until, "--until", now, back=True)
    if to_ms <= from_ms:
        raise fail(f"--until ({until}) must be after --since ({since})")
    owner_id = owner or me.device_id
    opened: list[Any] = []
    if "observations" in sections:
        grants = access or _grants(config, data_dir, broker, me, me_pre, owner_id, from_ms, to_ms, purpose,
                                   threshold, shares, now)
        for index in grants:
            opened += _open(config, data_dir, broker, me, me_pre, pre_key, index, owner_id, timeout, as_json)
    records, left_out = _owner_records(config, data_dir, owner_id, opened, from_ms, to_ms, patient_token or [])
    from carechain.files import write_atomic
    from record_access.fhir import BundleError, build_bundle

    try:
        bundle, summary = build_bundle(records, sections, now_ms())
    except BundleError as exc:
        raise fail(f"{exc}; nothing written (please report this: a mapping made an invalid resource)", 1) from None
    write_atomic(out_file, (json.dumps(bundle, indent=1) + "\n").encode())
    result = {"out": str(out_file), "owner": owner_id, "from_ms": from_ms, "to_ms": to_ms, "sections": sections,
              "resources": summary.counts, "readings": len(opened), "readings_unmapped": summary.unmapped_readings,
              "readings_not_yet_checkpointed": left_out}
    if as_json:
        out.print_json(data=result)
        return
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.counts.items()))
    out.print(f"wrote {out_file}: {counts}", soft_wrap=True, markup=False, highlight=False)
    if summary.unmapped_readings:
        console.print(f"[yellow]note:[/] {summary.unmapped_readings} reading(s) have no FHIR mapping in their "
                      "device's profile and are not in the bundle", soft_wrap=True)
    if left_out:
        console.print(f"[yellow]note:[/] {left_out} reading(s) are not under a checkpoint yet (no inclusion proof): "
                      "left out; export again in a moment", soft_wrap=True)




# -- which access records ------------------------------------------------------------------------------


def _grants(config: Path | None, data_dir: Path | None, broker: str | None, me: Any, me_pre: Any, owner: str,
            from_ms: int, to_ms: int, purpose: str, threshold: int, shares: int, now: int) -> list[int]:
    """The owner exporting her own records gets a new access record of her own (the export is logged like any
    access); anyone else uses the active grants the owner gave them that overlap the period."""
    if owner == me.device_id:
        return [_own_access(config, data_dir, broker, me, me_pre, from_ms, to_ms, purpose, threshold, shares, now)]
    state = replay(config, data_dir).state
    found = [int(k) for k, r in state.table("access").items()
             if r["requester"] == me.device_id and r["owner"] == owner and r["revoked_at"] is None
             and r["expires_ms"] > now and r["from_ms"] < to_ms and from_ms < r["to_ms"]]
    if not found:
        raise fail(f"no active access record grants you ({me.device_id}) {owner}'s readings between the times "
                   f"asked: ask with `carechain access request {owner} --key … --send` and have the owner grant "
                   f"it; or export without readings (--kinds medications,claims,audit,consents)", 1)
    return sorted(found)


def _own_access(config: Path | None, data_dir: Path | None, broker: str | None, me: Any, me_pre: Any, from_ms: int,
                to_ms: int, purpose: str, threshold: int, shares: int, now: int) -> int:
    """Append the owner's own request and grant for the period; the access record's leaf index."""
    from record_access import GrantError, LedgerViewError, RequestError, build_grant, build_request
    from record_access.client import AccessClientError, send_request
    from record_access.ledger_view import party_with_pre_keys, registered_miners

    state = replay(config, data_dir).state
    try:
        registered = party_with_pre_keys(state, me.device_id)
    except LedgerViewError as exc:
        raise fail(str(exc), 1) from None
    if registered.pre_pk != me_pre.public_key:
        raise fail(f"the --pre-key is not the re-encryption key registered for {me.device_id}")
    expires = now + parse_duration_ms("1h", "expiry")
    try:
        request = build_request(me, owner=me.device_id, devices=[], kinds=[], from_ms=from_ms, to_ms=to_ms,
                                purpose=purpose, expires_ms=expires, nonce=int.from_bytes(os.urandom(8), "big") >> 1,
                                ts=now)
        # Opens our persistent inbox session first: the miners release the fragments once, when the grant is final.
        send_request(resolved_broker(load(config, broker)), request)
    except RequestError as exc:
        raise fail(str(exc)) from None
    except AccessClientError as exc:
        raise fail(str(exc), 1) from None
    note = final_note(None, config, broker)
    try:
        built = build_grant(me, me_pre, request, requester_pre_pk=me_pre.public_key, miners=registered_miners(state),
                            final_note=note, threshold=threshold, shares=shares, expires_ms=expires, ts=now)
    except (GrantError, ValueError) as exc:
        raise fail(str(exc), 1) from None
    leaves = submit_all(config, data_dir, [request.entry, built.entry])
    console.print(f"access {leaves[-1]}: your own access record for this export (on the access log)",
                  soft_wrap=True, highlight=False)
    return int(leaves[-1])


def _open(config: Path | None, data_dir: Path | None, broker: str | None, me: Any, me_pre: Any, pre_key: Path,
          index: int, owner: str, timeout: float, as_json: bool) -> list[dict[str, Any]]:
    """Open one access record as `carechain access open` does; its readings (exit 1 if one fails a check)."""
    from record_access import LedgerViewError, OpeningError, access_context
    from record_access.client import AccessClientError, open_access

    try:
        ctx = access_context(replay(config, data_dir).state, index)
    except LedgerViewError as exc:
        raise fail(str(exc), 1) from None
    if ctx.requester.party_id != me.device_id:
        raise fail(f"access {index} was granted to {ctx.requester.party_id}, not to {me.device_id}", 1)
    if ctx.owner.party_id != owner:
        raise fail(f"access {index} is to {ctx.owner.party_id}'s records, not {owner}'s", 1)
    if ctx.requester.pre_pk != me_pre.public_key:
        raise fail(f"{pre_key} is not the re-encryption key registered for {me.device_id}")
    progress = Progress(quiet=as_json)
    try:
        result = open_access(resolved_broker(load(config, broker)), me, me_pre, ctx, timeout=timeout, now_ms=now_ms,
                             progress=progress)
    except (AccessClientError, OpeningError) as exc:
        raise fail(f"access {index}: {exc}", 1) from None
    finally:
        progress.done()
    for fault in result.faults:
        console.print(f"[yellow]warning:[/] miner {fault.miner}: {fault.detail}; evidence published", soft_wrap=True)
    submit_faults(config, data_dir, result.fault_entries)
    if result.problems:
        for p in result.problems[:20]:
            console.print(f"[red]record {p.index}:[/] {p.reason}", soft_wrap=True)
        raise fail(f"access {index}: {len(result.problems)} reading(s) failed their checks; nothing written "
                   f"(`carechain access open {index}` lists them)", 1)
    return result.readings


# -- the owner's records -------------------------------------------------------------------------------


def _owner_records(config: Path | None, data_dir: Path | None, owner: str, readings: Sequence[dict[str, Any]],
                   from_ms: int, to_ms: int, tokens: Sequence[str]) -> tuple[Any, int]:
    """Everything the bundle needs from the ledger: each reading's leaf and inclusion proof, devices and profiles,
    prescriptions, fills, claims, consents and the access log (replayed now: it holds this export's access)."""
    from carechain.entries import Entry
    from carechain.profiles import load_profiles
    from record_access import access_log
    from record_access.fhir import (
        InclusionProof,
        OpenedReading,
        OwnerRecords,
        RegisteredDevice,
        owner_prescriptions,
        sale_of_leaf,
    )

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    state = replay(config, data_dir).state
    in_period = sorted((r for r in readings if from_ms <= r["ts"] < to_ms), key=lambda r: r["index"])
    devices_table = state.table("devices")
    prescriptions = owner_prescriptions(state.table("rx"), [owner, *tokens])
    claims = {int(k): v for k, v in state.table("claims").items() if v["patient"] == owner}
    sale_leaves = sorted({*claims, *(i for rx in prescriptions.values() for i in rx["sales"])})
    ledger = open_bridge_ledger(cfg, bdir)
    try:
        latest = ledger.latest_checkpoint()
        size, note = latest if latest is not None else (0, "")
        log_pk = _log_public_key(note, state.operators) if in_period else b""
        opened, proofs, left_out = [], {}, 0
        progress = Progress(quiet=False)
        for n, r in enumerate(in_period, start=1):
            index = int(r["index"])
            if index >= size:
                left_out += 1
                continue
            leaf = ledger.entry(index)
            opened.append(OpenedReading(index, Entry.decode(leaf).cose, r))
            path = ledger.tree.inclusion_proof(index, size)
            proofs[index] = InclusionProof(index, size, ledger.tree.root(size), path, leaf, note, log_pk)
            progress("inclusion proofs", n, len(in_period))
        progress.done()
        sales = {i: s for i in sale_leaves if (s := sale_of_leaf(i, ledger.entry(i))) is not None}
    finally:
        ledger.close()
    devices = {r.reading["dev"]: RegisteredDevice(r.reading["dev"], bytes(devices_table[r.reading["dev"]]["pk"]),
                                                  devices_table[r.reading["dev"]]["profile"], owner)
               for r in opened if r.reading["dev"] in devices_table}
    parties = state.table("parties")
    policy = state.table("policies").get(owner)
    records = OwnerRecords(
        owner=owner, owner_name=str((parties.get(owner) or {}).get("name", "")), devices=devices,
        profiles=load_profiles(), readings=opened, proofs=proofs, prescriptions=prescriptions, sales=sales,
        claims=claims, insurer=policy["insurer"] if policy else None,
        terminal_owners={s.terminal: devices_table[s.terminal]["owner"] for s in sales.values()
                         if s.terminal in devices_table},
        consents={int(k): v for k, v in state.table("consents").items() if v["owner"] == owner},
        accesses=access_log(state, owner=owner))
    return records, left_out


def _log_public_key(note: str, operators: Any) -> bytes:
    """The log key that signed `note`: one of the genesis operator keys (the bridge lists its log key there)."""
    from carechain.proofs import VerificationError, verify_checkpoint

    for pk in operators.values():
        try:
            verify_checkpoint(note, bytes(pk))
        except VerificationError:
            continue
        return bytes(pk)
    raise fail("the latest checkpoint is not signed by a genesis operator key: cannot name the log key the "
               "inclusion proofs are checked against (is this the bridge's data dir?)", 1)


# -- --verify ------------------------------------------------------------------------------------------


def _verify(path: Path, log_key_hex: str | None, as_json: bool) -> None:
    """Check a bundle: valid FHIR R4, and every Provenance's signature and inclusion proof (exit 1 if one fails)."""
    from carechain.identity import PublicKeyError, parse_public_key_hex
    from record_access.fhir import BundleError, validated, verify_bundle

    trusted = None
    if log_key_hex:
        try:
            trusted = parse_public_key_hex(log_key_hex, "--log-key")
        except PublicKeyError as exc:
            raise fail(str(exc)) from None
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise fail(f"{path}: larger than {MAX_BUNDLE_BYTES >> 20} MiB; not a bundle this tool writes")
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise fail(f"{path}: cannot read the bundle: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise fail(f"{path}: not JSON: {exc}") from None
    try:
        bundle = validated(raw)
    except BundleError as exc:
        raise fail(f"{path}: {exc}", 1) from None
    good, bad = verify_bundle(bundle, trusted)
    if as_json:
        out.print_json(data={"bundle": str(path), "verified": len(good), "failed": [{"provenance": p, "reason": r}
                                                                                     for p, r in bad],
                             "log_key_pinned": trusted is not None})
    else:
        if trusted is None:
            console.print("[yellow]WARNING:[/] no --log-key: checked only that each proof is consistent with the key "
                          "the bundle names, not that your log signed it. Pass --log-key HEX.", soft_wrap=True)
        for name, why in bad:
            console.print(f"[red]Provenance {name}:[/] {why}", soft_wrap=True)
        out.print(f"{path}: valid FHIR R4; {len(good)} Provenance verified, {len(bad)} failed", soft_wrap=True,
                  markup=False, highlight=False)
    if bad:
        raise typer.Exit(1)
