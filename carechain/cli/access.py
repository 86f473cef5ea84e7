"""`carechain access request|grant|open|revoke|log`: owner-authorized, always-logged access to sealed records.

The requester signs a request (a file, and/or the owner's inbox topic); the owner's `grant` appends the
request and her signed grant — m-of-n key fragments sealed to miners drawn from a final checkpoint — on the
bridge host, after a dry run against the contracts; `open` collects the miners' capsule fragments and the
bridge's record pages and checks every reading; `log` reads every access from the ledger (docs/access.md).
The cores are in `record_access`; this module parses arguments and prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from carechain.cli._ledger import (
    final_note,
    load_key,
    load_pre_key,
    now_ms,
    print_result,
    replay,
    submit,
    submit_all,
    submit_faults,
)
from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    Progress,
    console,
    example,
    fail,
    load,
    out,
    parse_duration_ms,
    parse_time_ms,
    resolved_broker,
)

access_app = typer.Typer(
    help="Owner-authorized access to sealed health records: request, grant, open, revoke, and the access log.",
    no_args_is_help=True,
    epilog=example("carechain access request 7xq3kd2m4n5p6r7s --key keys/doctor.key --last 1h --purpose care "
                   "--out req.json", "carechain access grant req.json --key keys/alice.key --pre-key keys/alice.pre",
                   "carechain access open 42 --key keys/doctor.key --pre-key keys/doctor.pre --out readings.jsonl",
                   "carechain access log --fhir audit.json"))

KeyOpt = Annotated[Path, typer.Option("--key", help="Your Ed25519 key file (it signs).")]
PreKeyOpt = Annotated[Path, typer.Option("--pre-key", help="Your re-encryption key file (`carechain keys new --pre`).")]


# -- request ------------------------------------------------------------------------------------------

@access_app.command("request", epilog=example(
    "carechain access request 7xq3kd2m4n5p6r7s --key keys/doctor.key --last 1h --purpose 'follow-up' --out req.json",
    "carechain access request 7xq3kd2m4n5p6r7s --key keys/doctor.key --from 2026-12-01 --to 2026-12-02 "
    "--kind heart_rate --purpose study --send"))
def request(
    owner: Annotated[str, typer.Argument(help="The record owner's party id (16 base32 characters).")],
    key: KeyOpt,
    purpose: Annotated[str, typer.Option(help="Why you ask (kept on the ledger and in the access log).")],
    device: Annotated[list[str] | None, typer.Option("--device", help="A device id; repeatable (default: all the "
                                                                       "owner's devices).")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="A reading kind, e.g. heart_rate; repeatable "
                                                                   "(default: every sealed kind).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start: epoch ms or ISO 8601 time.")] = None,
    to: Annotated[str | None, typer.Option("--to", help="End: epoch ms, ISO 8601 time or now.")] = None,
    last: Annotated[str | None, typer.Option(help="Instead of --from/--to: the last DURATION (e.g. 1h, 30d).")] = None,
    valid_for: Annotated[str, typer.Option(help="How long the request (and so the grant) may be used.")] = "24h",
    out_file: Annotated[Path | None, typer.Option("--out", help="Where to write the signed request file "
                                                                "(mode 0600).")] = None,
    send: Annotated[bool, typer.Option(help="Also publish it to the owner's inbox topic over MQTT.")] = False,
    config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Sign an access request for an owner's sealed readings; give the file to the owner, or --send it.

    --send also subscribes your inbox in a persistent MQTT session, so that the capsule fragments the miners
    release once the owner grants wait in the broker until `carechain access open` runs.
    """
    from carechain.files import write_atomic
    from record_access import RequestError, build_request

    if out_file is None and not send:
        raise fail("give --out FILE (a request file for the owner) or --send (the owner's inbox), or both")
    now = now_ms()
    if last is not None:
        if from_ is not None or to is not None:
            raise fail("give either --last or --from/--to, not both")
        to_ms = now
        from_ms = now - parse_duration_ms(last, "--last")
    elif from_ is not None:
        from_ms = parse_time_ms(from_, "--from")
        to_ms = parse_time_ms(to, "--to") if to is not None else now
    else:
        raise fail("say which time range: --last DURATION, or --from TIME [--to TIME]")
    requester = load_key(key)
    try:
        signed = build_request(requester, owner=owner, devices=device or [], kinds=kind or [], from_ms=from_ms,
                               to_ms=to_ms, purpose=purpose,
                               expires_ms=now + parse_duration_ms(valid_for, "--valid-for"),
                               nonce=int.from_bytes(os.urandom(8), "big") >> 1, ts=now)
    except RequestError as exc:
        raise fail(str(exc)) from None
    if out_file is not None:
        write_atomic(out_file, (json.dumps(signed.to_json(), indent=2) + "\n").encode())
    if send:
        from record_access.client import AccessClientError, send_request

        try:
            send_request(resolved_broker(load(config, broker)), signed)
        except AccessClientError as exc:
            raise fail(str(exc), 1) from None
    from carechain.access import request_hash

    print_result({"request": request_hash(signed.leaf()).hex(), "requester": signed.requester, "owner": owner,
                  "from_ms": from_ms, "to_ms": to_ms, "expires_ms": signed.request.expires_ms,
                  "request_file": str(out_file) if out_file else None, "sent": send}, as_json)


# -- grant --------------------------------------------------------------------------------------------

@access_app.command("grant", epilog=example(
    "carechain access grant req.json --key keys/alice.key --pre-key keys/alice.pre --data-dir carechain-data/bridge",
    "carechain access grant req.json --key keys/alice.key --pre-key keys/alice.pre --threshold 2 --shares 3 "
    "--checkpoint final.note"))
def grant(
    request_file: Annotated[Path, typer.Argument(help="The requester's signed request file.")],
    key: KeyOpt, pre_key: PreKeyOpt,
    threshold: Annotated[int, typer.Option(help="m: how many miners' fragments open a record.", min=1)] = 3,
    shares: Annotated[int, typer.Option(help="n: how many miners hold a key fragment.", min=1, max=16)] = 5,
    valid_for: Annotated[str | None, typer.Option(help="Grant lifetime (default: until the request expires).")]
    = None,
    checkpoint: Annotated[Path | None, typer.Option(help="A final checkpoint note (default: the retained one on "
                                                         "cc/v1/log/final, from the broker).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Authorize a request: sign a grant with m-of-n key fragments sealed to miners drawn from the latest final
    checkpoint, and append [request, grant] to the ledger (checked against the contracts first).

    The grant's leaf index is the access record's number: the requester opens it with `carechain access open`.
    """
    from carechain.access import request_hash
    from record_access import GrantError, LedgerViewError, RequestError, build_grant, parse_request_file
    from record_access.ledger_view import find_request, party, party_with_pre_keys, registered_miners

    try:
        signed = parse_request_file(request_file.read_bytes())
    except OSError as exc:
        raise fail(f"{request_file}: cannot read the request: {exc.strerror}") from None
    except RequestError as exc:
        raise fail(f"{request_file}: {exc}") from None
    owner, owner_pre = load_key(key), load_pre_key(pre_key)
    state = replay(config, data_dir).state
    try:
        requester = party_with_pre_keys(state, signed.requester)
        me = party_with_pre_keys(state, owner.device_id)
    except LedgerViewError as exc:
        raise fail(str(exc), 1) from None
    if requester.pk != signed.requester_pk:
        raise fail(f"{request_file}: signed with a key that is not {signed.requester}'s registered key", 1)
    if me.pre_pk != owner_pre.public_key:
        raise fail(f"{pre_key} is not the re-encryption key registered for {owner.device_id}")
    note = final_note(checkpoint, config, broker)
    now = now_ms()
    expires = now + parse_duration_ms(valid_for, "--valid-for") if valid_for else signed.request.expires_ms
    assert requester.pre_pk is not None
    try:
        built = build_grant(owner, owner_pre, signed, requester_pre_pk=requester.pre_pk,
                            miners=registered_miners(state), final_note=note, threshold=threshold, shares=shares,
                            expires_ms=expires, ts=now)
    except (GrantError, ValueError) as exc:
        raise fail(str(exc), 1) from None
    entries = [built.entry] if find_request(state, request_hash(signed.leaf()).hex()) else [signed.entry, built.entry]
    leaves = submit_all(config, data_dir, entries)
    print_result({"access": leaves[-1], "request": built.request_hash.hex(), "request_leaf": leaves[0]
                  if len(leaves) == 2 else None, "requester": signed.requester,
                  "requester_name": party(state, signed.requester).name, "threshold": threshold,
                  "miners": built.grant.miners, "expires_ms": built.grant.expires_ms}, as_json)


# -- open ---------------------------------------------------------------------------------------------

@access_app.command("open", epilog=example(
    "carechain access open 42 --key keys/doctor.key --pre-key keys/doctor.pre --out readings.jsonl",
    "carechain access open 42 --key keys/doctor.key --pre-key keys/doctor.pre --json"))
def open_(
    access: Annotated[int, typer.Argument(help="The access record: the grant's leaf index.", min=0)],
    key: KeyOpt, pre_key: PreKeyOpt,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the readings here, one JSON object a line "
                                                                "(mode 0600); default: standard output.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the pages and the miners' fragments.")] = 60.0,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Open a granted access record: verify at least m miners' capsule fragments per epoch, decrypt, and check
    every reading against its anchored hash and its device's signature.

    A miner whose fragments do not verify is reported (an access.fault naming it is published and, with the
    bridge's data dir at hand, appended); the open goes on with the others. Exit 1 if a reading fails a check.
    """
    from carechain.files import write_atomic
    from record_access import LedgerViewError, OpeningError, access_context
    from record_access.client import AccessClientError, open_access

    requester, requester_pre = load_key(key), load_pre_key(pre_key)
    cfg = load(config, broker)
    runtime = replay(config, data_dir)
    try:
        ctx = access_context(runtime.state, access)
    except LedgerViewError as exc:
        raise fail(str(exc), 1) from None
    if ctx.requester.party_id != requester.device_id:
        raise fail(f"access {access} was granted to {ctx.requester.party_id}, not to {requester.device_id}", 1)
    if ctx.requester.pre_pk != requester_pre.public_key:
        raise fail(f"{pre_key} is not the re-encryption key registered for {requester.device_id}")
    progress = Progress(quiet=as_json and out_file is None)
    try:
        result = open_access(resolved_broker(cfg), requester, requester_pre, ctx, timeout=timeout, now_ms=now_ms,
                             progress=progress)
    except (AccessClientError, OpeningError) as exc:
        raise fail(str(exc), 1) from None
    finally:
        progress.done()
    for fault in result.faults:
        console.print(f"[yellow]warning:[/] miner {fault.miner}: {fault.detail}; evidence published", soft_wrap=True)
    fault_leaves = submit_faults(config, data_dir, result.fault_entries)
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in result.readings)
    if out_file is not None:
        write_atomic(out_file, lines.encode())
    summary = {"access": access, "readings": len(result.readings), "epochs": result.epochs, "miners": result.miners,
               "faults": [{"miner": f.miner, "detail": f.detail} for f in result.faults], "fault_leaves": fault_leaves,
               "problems": [p.to_json() for p in result.problems[:100]], "problem_count": len(result.problems),
               "seconds": round(result.seconds, 3), "out": str(out_file) if out_file else None}
    if as_json:
        if out_file is None:
            summary["records"] = result.readings
        print(json.dumps(summary), flush=True)
    else:
        if out_file is None:
            print(lines, end="", flush=True)
        console.print(f"opened access {access}: {len(result.readings)} readings from {result.epochs} epoch(s), "
                      f"fragments from {', '.join(result.miners)}, in {result.seconds:.2f} s", soft_wrap=True,
                      highlight=False)
        for p in result.problems[:20]:
            console.print(f"[red]record {p.index}:[/] {p.reason}", soft_wrap=True)
    if result.problems:
        raise typer.Exit(1)


# -- revoke -------------------------------------------------------------------------------------------

@access_app.command("revoke", epilog=example(
    "carechain access revoke 42 --key keys/alice.key --reason 'care episode over' --data-dir carechain-data/bridge"))
def revoke(
    access: Annotated[int, typer.Argument(help="The access record: the grant's leaf index.", min=0)],
    key: KeyOpt, reason: Annotated[str, typer.Option(help="Why (kept on the ledger).")],
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke a grant (only its owner can): miners and the bridge refuse it from then on."""
    from record_access import build_revoke

    index = submit(config, data_dir, build_revoke(load_key(key), access, reason, now_ms()))
    print_result({"access": access, "revoked_at_leaf": index}, as_json)


# -- log ----------------------------------------------------------------------------------------------

@access_app.command("log", epilog=example("carechain access log --data-dir carechain-data/bridge",
                                          "carechain access log --owner 7xq3kd2m4n5p6r7s --fhir audit.json"))
def access_log(
    owner: Annotated[str | None, typer.Option(help="Only this owner's records (party id).")] = None,
    requester: Annotated[str | None, typer.Option(help="Only this requester's accesses (party id).")] = None,
    fhir: Annotated[Path | None, typer.Option(help="Also write the log as a FHIR R4 Bundle of AuditEvents (IHE "
                                                   "BALP) to this file.")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Every access record on the ledger — requester, owner, scope, purpose, time, state — the owner's own too."""
    from record_access import access_log as read_log
    from record_access import audit_bundle

    entries = read_log(replay(config, data_dir).state, owner=owner, requester=requester)
    now = now_ms()
    if fhir is not None:
        from fhir.resources.R4B.bundle import Bundle

        from carechain.files import write_atomic

        bundle = audit_bundle(entries)
        Bundle.model_validate(bundle)  # never write a resource a FHIR server would refuse
        write_atomic(fhir, (json.dumps(bundle, indent=1) + "\n").encode())
    if as_json:
        out.print_json(data={"accesses": [{**e.to_json(), "status": e.status(now)} for e in entries],
                             "count": len(entries), "fhir": str(fhir) if fhir else None})
        return
    if not entries:
        out.print("(no access records)", highlight=False)
        return
    from record_access.audit_log import iso

    for e in entries:
        scope = f"{','.join(e.kinds) or 'all kinds'} of {','.join(e.devices) or 'all devices'}"
        who = "owner's own access" if e.own_access else f"{e.requester_role} {e.requester} ({e.requester_name})"
        out.print(f"access {e.index}  {iso(e.ts)}  {who} → owner {e.owner}\n    {scope}, {iso(e.from_ms)} .. "
                  f"{iso(e.to_ms)}; purpose: {e.purpose}; {e.status(now)}", soft_wrap=True, markup=False,
                  highlight=False)
