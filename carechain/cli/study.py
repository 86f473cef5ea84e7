"""`carechain study post|status|contribute|disclose|close|result`: studies of the data market (docs/market.md).

A researcher posts a study (its deposit is locked, its aggregators drawn from a final checkpoint's seed); a
patient's agent contributes from her own sealed readings under her consent (shares sealed to the aggregators,
a commitment anchored); the aggregators' majority result decides it; anyone closes it, which pays out or
refunds. `carechain verify study ID` checks all of it offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import deployment_genesis, load_key, now_ms, print_result, read_json, replay, submit
from carechain.cli._options import BrokerOpt, ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load, out

study_app = typer.Typer(
    help="Studies of the data market: post one, contribute to one, read its result, disclose a sampled "
         "contribution to its audit, close it.",
    no_args_is_help=True,
    epilog=example("carechain study post hr-2026-q4 --key keys/lab.key --type mean --kind heart_rate --lo 30 "
                   "--hi 220 --from 2026-10-01 --to 2027-01-01 --price 150 --max-contributors 500 --fee 1000",
                   "carechain study contribute hr-2026-q4 --consent 42 --key keys/alice.key --pre-key keys/alice.pre",
                   "carechain study status hr-2026-q4", "carechain study result hr-2026-q4 --json"))

StudyArg = Annotated[str, typer.Argument(help="The study id (what `study post` named it).")]
KeyOpt = Annotated[Path, typer.Option("--key", help="Your Ed25519 key file (it signs).")]


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"{what} {text!r} must be comma-separated integers (60,80,100)") from None


def _study(state: Any, study_id: str) -> dict[str, Any]:  # noqa: ANN401 - a contract State
    from contract_rules.market import study_record

    record = study_record(state, study_id)
    if record is None:
        raise fail(f"no study {study_id!r} on this ledger (see `carechain study post`)", 1)
    return record


@study_app.command("post", epilog=example(
    "carechain study post hr-2026-q4 --key keys/lab.key --type histogram --kind heart_rate --lo 30 --hi 220 "
    "--bins 30,60,80,100,220 --from 2026-10-01 --to 2027-01-01 --price 150 --max-contributors 500 --fee 1000 "
    "--epsilon-milli 1000 --closes 14d --checkpoint final.note"))
def post(
    study_id: StudyArg, key: KeyOpt,
    type_: Annotated[str, typer.Option("--type", help="count, sum, mean, histogram, resting_heart_rate or "
                                                      "time_in_range.")],
    kind: Annotated[str, typer.Option(help="The sealed kind it reads (heart_rate, glucose).")],
    lo: Annotated[int, typer.Option(help="Lowest value one contributor may input (the measure's unit).")],
    hi: Annotated[int, typer.Option(help="Highest value one contributor may input.")],
    from_: Annotated[str, typer.Option("--from", help="Period start (ISO 8601 or epoch ms).")],
    to: Annotated[str, typer.Option(help="Period end, exclusive (ISO 8601, epoch ms or now).")],
    max_contributors: Annotated[int, typer.Option(help="At most this many contributions are taken.", min=1)],
    bins: Annotated[str | None, typer.Option(help="Histogram bin edges, ascending, comma-separated.")] = None,
    price: Annotated[int, typer.Option(help="Paid to each included contributor (minor units).", min=0)] = 0,
    fee: Annotated[int, typer.Option(help="Paid to each aggregator in the majority (minor units).", min=0)] = 0,
    epsilon_milli: Annotated[int, typer.Option(help="DP epsilon in thousandths (0: no noise).", min=0)] = 0,
    aggregators: Annotated[int, typer.Option(help="How many miners run the MPC (3..7).", min=3, max=7)] = 3,
    closes: Annotated[str, typer.Option(help="Contributions close after this long (14d).")] = "14d",
    age_band: Annotated[str | None, typer.Option(help="Filter: only this age band.")] = None,
    sex: Annotated[str | None, typer.Option(help="Filter: only this sex (f, m, x).")] = None,
    region: Annotated[str | None, typer.Option(help="Filter: only this region.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="A final checkpoint note (default: the retained one on "
                                                         "cc/v1/log/final, from the broker).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Post a study: lock its deposit (price × max contributors + fee × aggregators) and fix its aggregators,
    drawn from the seed of the latest final checkpoint."""
    from pydantic import ValidationError

    from carechain.cli._ledger import final_note
    from carechain.cli._options import parse_duration_ms, parse_time_ms
    from contract_rules import market as rules
    from contract_rules import transactions as ce

    note = final_note(checkpoint, config, broker)
    now = now_ms()
    try:
        study = ce.StudyPost(
            study_id=study_id, query=ce.StudyQuery(type=type_, kind=kind, lo=lo, hi=hi,
                                                   bins=_csv_ints(bins, "--bins") if bins else None),
            from_ms=parse_time_ms(from_, "--from"), to_ms=parse_time_ms(to, "--to"),
            filter=ce.CohortAttributes(age_band=age_band, sex=sex, region=region), price_minor=price,
            max_contributors=max_contributors, aggregator_fee_minor=fee, epsilon_milli=epsilon_milli,
            aggregators=aggregators, seed_checkpoint=note, closes_ms=now + parse_duration_ms(closes, "--closes"),
            ts=now)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'study'}: {e['msg']}" for e in exc.errors())
        raise fail(f"not a valid study: {problems}") from None
    index = submit(config, data_dir, ce.study_post_entry(load_key(key), study))
    record = _study(replay(config, data_dir).state, study_id)
    print_result({"study": study_id, "leaf": index, "deposit": rules.deposit_of(study),
                  "aggregators": ",".join(record["aggregators"]), "closes_ms": study.closes_ms}, as_json)


@study_app.command("status", epilog=example("carechain study status hr-2026-q4 --json"))
def status(study_id: StudyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
           as_json: JsonOpt = False) -> None:
    """A study's terms and progress: state, aggregators, contributions, results posted, escrow held."""
    from contract_rules.market import study_account

    state = replay(config, data_dir).state
    s = _study(state, study_id)
    summary = {"study": study_id, "state": s["state"], "researcher": s["researcher"],
               "query": s["query"], "price_minor": s["price_minor"], "max_contributors": s["max_contributors"],
               "aggregators": s["aggregators"], "contributions": len(s["contributions"]),
               "results_posted": sorted(s["results"]), "deposit": s["deposit"],
               "escrow": state.balance(study_account(study_id)), "closes_ms": s["closes_ms"],
               "epsilon_milli": s["epsilon_milli"], "closed_at": s["closed_at"], "audit": _audit_summary(s)}
    if as_json:
        out.print_json(data=summary)
    else:
        audit = summary.pop("audit")
        rows = {k: ",".join(v) if isinstance(v, list) else v for k, v in summary.items()}
        rows["audit"] = "not sampled" if audit is None else " ".join(
            f"{i}:{audit['outcome'].get(str(i)) or ('disclosed' if i in audit['disclosed'] else 'awaiting')}"
            for i in audit["sample"])
        print_result(rows, False)


def _audit_summary(study: dict[str, Any]) -> dict[str, Any] | None:
    """The study's audit as `status` shows it: the sample, who disclosed, each aggregator's verdict, the
    outcomes, the window, and (once closed) the forfeited contributions; None until it is sampled."""
    audit = study.get("audit")
    if audit is None:
        return None
    return {"sample": audit["sample"], "seed_checkpoint_size": audit["size"],
            "window_ends_ms": audit["window_ends_ms"], "disclosed": sorted(int(i) for i in audit["disclosed"]),
            "verdicts": audit["verdicts"], "outcome": audit["outcome"], "forfeited": audit.get("forfeited")}


@study_app.command("result", epilog=example("carechain study result hr-2026-q4 --json"))
def result(study_id: StudyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
           as_json: JsonOpt = False) -> None:
    """A decided study's answer (the majority of its aggregators signed it): counts, sums, a mean, a histogram.
    Exit 1 while it is undecided."""
    s = _study(replay(config, data_dir).state, study_id)
    decided = s["decided"]
    if decided is None:
        raise fail(f"study {study_id} is not decided yet ({len(s['results'])} of {len(s['aggregators'])} "
                   "aggregators posted a result)", 1)
    answer = decided["answer"]
    summary: dict[str, Any] = {"study": study_id, "state": s["state"], "answer": answer,
                               "included": len(decided["included"]), "valid": len(decided["valid"]),
                               "invalid": decided["invalid"], "epsilon_milli": decided["noise"]["epsilon_milli"],
                               "aggregators": decided["aggregators"]}
    if answer is not None and set(answer) == {"sum", "n"} and answer["n"]:
        summary["mean"] = answer["sum"] / answer["n"]
    if as_json:
        out.print_json(data=summary)
    else:
        print_result({k: ",".join(v) if isinstance(v, list) else v for k, v in summary.items()}, False)


@study_app.command("close", epilog=example("carechain study close hr-2026-q4 --key keys/lab.key"))
def close(study_id: StudyArg, key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
          as_json: JsonOpt = False) -> None:
    """Close a decided study (anyone may): pay each included contributor and the majority's aggregators from
    the escrow, refund the rest; an unanswered study, or one undecided a day after it closed, refunds it all."""
    from contract_rules import transactions as ce
    from contract_rules.market import study_account

    index = submit(config, data_dir, ce.study_close_entry(load_key(key), ce.StudyClose(study_id=study_id,
                                                                                       ts=now_ms())))
    state = replay(config, data_dir).state
    s = _study(state, study_id)
    print_result({"study": study_id, "closed_at_leaf": index, "state": s["state"],
                  "escrow": state.balance(study_account(study_id))}, as_json)


@study_app.command("contribute", epilog=example(
    "carechain study contribute hr-2026-q4 --consent 42 --key keys/alice.key --pre-key keys/alice.pre "
    "--opening alice-hr-2026-q4.json"))
def contribute(
    study_id: StudyArg,
    consent: Annotated[int, typer.Option(help="Your consent it is made under (its leaf index).", min=0)],
    key: KeyOpt,
    pre_key: Annotated[Path, typer.Option("--pre-key", help="Your re-encryption key file: opens your own "
                                                            "readings on this machine.")],
    opening: Annotated[Path | None, typer.Option(help="Keep the vector and salt that open your commitment here "
                                                      "(0600; an audit asks for them). Default: beside --key, "
                                                      "<key name>.<study>.opening.json.")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Contribute to a study from your own sealed readings: computed on this machine, Shamir-shared among the
    study's aggregators (each share sealed to one), committed and anchored. Your value never leaves it."""
    from carechain.cli._ledger import load_pre_key
    from chain_bridge.ledger.reader import LedgerReader
    from chain_bridge.registry import ledger_path
    from record_access.contributing import (
        ContributionError,
        aggregator_keys,
        build_contribution,
        find_own_readings,
        save_opening,
    )
    from record_access.ledger_view import LedgerViewError

    owner, owner_pre = load_key(key), load_pre_key(pre_key)
    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    genesis = deployment_genesis(cfg, bdir)
    state = replay(config, data_dir).state
    s = _study(state, study_id)
    query = s["query"]
    reader = LedgerReader(ledger_path(bdir))
    try:
        size = reader.size()
        own = find_own_readings(((i, leaf) for i, leaf in enumerate(reader.leaves(0, size))), reader.ciphertext,
                                owner.device_id, owner_pre, genesis.operators, query["kind"], s["from_ms"], s["to_ms"])
    finally:
        reader.close()
    try:
        built = build_contribution(owner, study_id, s, consent, aggregator_keys(state, s), own, now_ms())
    except (ContributionError, LedgerViewError) as exc:
        raise fail(str(exc), 1) from None
    opening = opening or default_opening(key, study_id)
    save_opening(opening, built)  # before the entry is anchored: a commitment whose salt is lost cannot be opened
    index = submit(config, data_dir, built.entry)
    save_opening(opening, built, index)
    print_result({"study": study_id, "contribution": index, "consent": consent, "readings": len(built.leaves),
                  "commitment": built.commitment, "aggregators": ",".join(s["aggregators"]),
                  "problems": len(own.problems), "opening": str(opening)}, as_json)


def default_opening(key: Path, study_id: str) -> Path:
    """Where `contribute` keeps an opening and `disclose` looks for it: beside the key that signed it."""
    return key.with_name(f"{key.stem}.{study_id}.opening.json")


@study_app.command("disclose", epilog=example(
    "carechain study disclose hr-2026-q4 --key keys/alice.key --pre-key keys/alice.pre",
    "carechain study disclose hr-2026-q4 --key keys/alice.key --pre-key keys/alice.pre "
    "--opening alice-hr-2026-q4.json"))
def disclose(
    study_id: StudyArg, key: KeyOpt,
    pre_key: Annotated[Path, typer.Option("--pre-key", help="Your re-encryption key file: opens the data keys of "
                                                            "the readings you cited.")],
    opening: Annotated[Path | None, typer.Option(help="The opening `study contribute` kept (default: beside "
                                                      "--key, <key name>.<study>.opening.json).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Open your sampled contribution to the study's aggregators, and to them only: the salt of your
    commitment, the data keys of the epochs your cited readings are in and their ciphertexts, sealed to each
    aggregator. The entry is the logged access record (who, which epochs, why). A sampled contribution that is
    not disclosed before the audit window ends is not paid."""
    from carechain.cli._ledger import load_pre_key
    from chain_bridge.ledger.reader import LedgerReader
    from chain_bridge.registry import ledger_path
    from contract_rules.market import CONTRIBUTIONS
    from record_access.contributing import ContributionError, aggregator_keys, build_disclosure, find_cited_data
    from record_access.ledger_view import LedgerViewError

    owner, owner_pre = load_key(key), load_pre_key(pre_key)
    opening = opening or default_opening(key, study_id)
    kept = read_json(opening, "the contribution's opening")
    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    genesis = deployment_genesis(cfg, bdir)
    state = replay(config, data_dir).state
    s = _study(state, study_id)
    table = state.table(CONTRIBUTIONS)
    mine = [i for i in s["contributions"] if table[str(i)]["owner"] == owner.device_id]
    if not mine:
        raise fail(f"{owner.device_id} has no contribution to study {study_id}", 1)
    index = mine[0]
    reader = LedgerReader(ledger_path(bdir))
    try:
        leaves = ((i, leaf) for i, leaf in enumerate(reader.leaves(0, reader.size())))
        data_keys, cts = find_cited_data(leaves, reader.ciphertext, owner.device_id, owner_pre, genesis.operators,
                                         s, table[str(index)]["leaves"])
        entry = build_disclosure(owner, study_id, s, index, kept, aggregator_keys(state, s), data_keys, cts,
                                 now_ms())
    except (ContributionError, LedgerViewError) as exc:
        raise fail(str(exc), 1) from None
    finally:
        reader.close()
    leaf = submit(config, data_dir, entry)
    print_result({"study": study_id, "contribution": index, "disclosed_at": leaf, "readings": len(cts),
                  "epochs": len(data_keys), "to": ",".join(s["aggregators"])}, as_json)
