"""`carechain trial register|commit|consent|enroll|dispense|withdraw|unblind|answer|lock|reveal|recover|outcome|
certify|status|verify`: a randomised, blinded trial on the ledger (docs/trials.md).

Each command is one party's act, signed with that party's own key file: the sponsor registers, commits a seed
(kept 0600 before the commitment is built), locks and reveals; a participant signs her consent into a file and,
after the lock, discloses her sealed outcome reading; an investigator enrols her with that file, may withdraw her
or log an emergency unblinding; a pharmacy dispenses her kit through its terminal; anyone certifies the result
the rules recompute and verifies the whole trial. The labelling miners commit, reveal, recover a silent
committer's seed and answer unblindings by themselves; the sponsor does the same with `trial recover` and `trial
answer`. Entries are checked against a replay and appended as every `carechain` contract command does
(`carechain.cli._ledger`); the client logic is `record_access.trials`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, read_json, replay, submit
from carechain.cli._options import BrokerOpt, ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load, out

trial_app = typer.Typer(
    help="Randomised, blinded trials: register one, commit a seed, consent, enrol, dispense kits, lock, reveal, "
         "disclose outcomes, certify the pre-registered result, verify it all.",
    no_args_is_help=True,
    epilog=example("carechain trial register hrt-1 --key keys/sponsor.key --protocol hrt-1.toml "
                   "--document hrt-1-protocol.pdf --enrol-closes 30d",
                   "carechain trial commit hrt-1 --key keys/sponsor.key",
                   "carechain trial status hrt-1", "carechain trial verify hrt-1 --json"))

TrialArg = Annotated[str, typer.Argument(help="The trial id (what `trial register` named it).")]
ParticipantArg = Annotated[str, typer.Argument(help="The participant's party id.")]
KeyOpt = Annotated[Path, typer.Option("--key", help="Your Ed25519 key file (it signs).")]
SeedOpt = Annotated[Path | None, typer.Option("--seed-file", help="Where your seed is kept (0600). Default: beside "
                                                                 "--key, <key name>.<trial>.seed.")]
ReasonOpt = Annotated[str, typer.Option(help="A reason code (lowercase letters, digits, _).")]


def _client_error() -> type[Exception]:
    from record_access.trials import TrialClientError

    return TrialClientError


def _trial(state: Any, trial_id: str) -> dict[str, Any]:  # noqa: ANN401 - a contract State
    from contract_rules.trials import trial_record

    record = trial_record(state, trial_id)
    if record is None:
        raise fail(f"no trial {trial_id!r} on this ledger (see `carechain trial register`)", 1)
    return record


def default_seed_file(key: Path, trial_id: str) -> Path:
    """Where `commit` keeps a committer's seed and `reveal` and `answer` look for it: beside its key."""
    return key.with_name(f"{key.stem}.{trial_id}.seed")


def _append(config: Path | None, data_dir: Path | None, build: Any) -> int:  # noqa: ANN401
    """Build the entry (a TrialClientError exits 1 with its message) and append it."""
    try:
        entry = build()
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    return submit(config, data_dir, entry)


@trial_app.command("register", epilog=example(
    "carechain trial register hrt-1 --key keys/sponsor.key --protocol hrt-1.toml --document hrt-1-protocol.pdf "
    "--enrol-closes 30d --checkpoint final.note",
    "# hrt-1.toml:\n"
    "#   investigators = [\"<investigator party id>\"]\n"
    "#   labellers = 3\n"
    "#   max_participants = 40\n"
    "#   reveal_window_ms = 86400000\n"
    "#   [design]\n"
    "#   arms = [\"treatment\", \"placebo\"]\n"
    "#   ratio = [1, 1]\n"
    "#   block_sizes = [4]\n"
    "#   strata = { sex = [\"f\", \"m\"] }\n"
    "#   [outcome]\n"
    "#   kind = \"heart_rate\"\n"
    "#   measure = \"resting_heart_rate\"\n"
    "#   baseline_from_ms = 1767225600000\n"
    "#   baseline_to_ms = 1767830400000\n"
    "#   followup_from_ms = 1769817600000\n"
    "#   followup_to_ms = 1770422400000\n"
    "#   direction = \"decrease\"\n"
    "#   [analysis]\n"
    "#   alpha_milli = 50"))
def register(
    trial_id: TrialArg, key: KeyOpt,
    protocol: Annotated[Path, typer.Option(help="The protocol file (TOML or JSON): design, outcome, analysis, "
                                                "investigators, labellers, max_participants, reveal_window_ms.")],
    document: Annotated[Path, typer.Option(help="The full protocol document: only its SHA-256 goes on the log.")],
    enrol_closes: Annotated[str, typer.Option("--enrol-closes", help="Enrolment closes after this long (30d), or "
                                                                     "at this time (ISO 8601 or epoch ms).")],
    checkpoint: Annotated[Path | None, typer.Option(help="A final checkpoint note whose seed draws the labellers "
                                                         "(default: the retained one on cc/v1/log/final).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a trial (sponsor): the protocol's hash, design, primary outcome and analysis are fixed before
    anyone enrols; its labelling miners are drawn from a final checkpoint's seed."""
    from carechain.cli._ledger import final_note
    from carechain.cli._options import parse_when_ms
    from record_access.trials import build_register, load_protocol

    try:
        body = document.read_bytes()
    except OSError as exc:
        raise fail(f"{document}: cannot read the protocol document: {exc.strerror}") from None
    now = now_ms()
    closes = parse_when_ms(enrol_closes, "--enrol-closes", now)
    note = final_note(checkpoint, config, broker)
    try:
        doc = load_protocol(protocol)
    except _client_error() as exc:
        raise fail(str(exc)) from None
    sponsor = load_key(key)
    index = _append(config, data_dir, lambda: build_register(sponsor, trial_id, body, doc, note, closes, now))
    t = _trial(replay(config, data_dir).state, trial_id)
    print_result({"trial": trial_id, "leaf": index, "protocol_hash": t["protocol_hash"],
                  "labellers": ",".join(t["labellers"]), "enrol_closes_ms": t["enrol_closes_ms"]}, as_json)


@trial_app.command("commit", epilog=example("carechain trial commit hrt-1 --key keys/sponsor.key",
                                            "carechain trial commit hrt-1 --key keys/sponsor.key "
                                            "--seed-file secrets/hrt-1.seed"))
def commit(trial_id: TrialArg, key: KeyOpt, seed_file: SeedOpt = None, config: ConfigOpt = None,
           data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Commit to a fresh seed (sponsor; the labelling miners commit by themselves): the seed is drawn and kept
    (0600, fsynced) before the commitment is built; Shamir shares of it are sealed to the other committers so a
    missing reveal cannot block the unblinding. Keep the seed file: `trial reveal` needs it after the lock."""
    from record_access.trials import build_commit, committer_keys, draw_seed, load_seed, save_seed

    me = load_key(key)
    state = replay(config, data_dir).state
    t = _trial(state, trial_id)
    if me.device_id in t["commitments"]:
        raise fail(f"{me.device_id} already committed to trial {trial_id} (leaf "
                   f"{t['commitments'][me.device_id]['at']}): a committer commits once", 1)
    path = seed_file or default_seed_file(key, trial_id)
    try:
        seed = load_seed(path, trial_id) if path.exists() else draw_seed()
        save_seed(path, trial_id, me.device_id, seed)  # before the entry is built: a lost seed cannot be revealed
        keys = committer_keys(state, t)
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = _append(config, data_dir, lambda: build_commit(me, t, seed, keys, now_ms()))
    t = _trial(replay(config, data_dir).state, trial_id)
    print_result({"trial": trial_id, "committed_at": index, "seed_file": str(path),
                  "committed": f"{len(t['commitments'])} of {len(t['labellers']) + 1}"}, as_json)


@trial_app.command("consent", epilog=example(
    "carechain trial consent hrt-1 --key keys/alice.key --out alice-hrt-1.consent.json"))
def consent(trial_id: TrialArg, key: KeyOpt,
            out_file: Annotated[Path, typer.Option("--out", help="Write your consent signature here (give it to "
                                                                 "the investigator).")],
            config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Sign your consent to the trial's registered protocol (participant), including the disclosure of your
    primary-outcome measure after the lock. Nothing is appended: the investigator enrols you with this file."""
    from record_access.trials import sign_consent_file

    t = _trial(replay(config, data_dir).state, trial_id)
    signed = sign_consent_file(load_key(key), t)
    try:
        out_file.write_text(json.dumps(signed.to_json(), indent=1) + "\n")
    except OSError as exc:
        raise fail(f"{out_file}: cannot write the consent: {exc.strerror}") from None
    print_result({"trial": trial_id, "participant": signed.participant, "protocol_hash": signed.protocol_hash,
                  "consent": str(out_file)}, as_json)


def _attributes(pairs: list[str] | None) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise fail(f"--attr {pair!r} must be NAME=VALUE (sex=f)")
        attributes[name] = value
    return attributes


@trial_app.command("enroll", epilog=example(
    "carechain trial enroll hrt-1 --key keys/investigator.key --consent alice-hrt-1.consent.json --attr sex=f"))
def enroll(trial_id: TrialArg, key: KeyOpt,
           consent_file: Annotated[Path, typer.Option("--consent", help="The participant's consent file "
                                                                        "(`trial consent`).")],
           attr: Annotated[list[str] | None, typer.Option(help="A stratification factor NAME=VALUE; repeatable.")]
           = None,
           config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Enrol a consenting participant (investigator) into the next slot of her stratum; prints her slot and
    the public label of the kit the pharmacy dispenses to her. Her arm stays concealed until the lock."""
    from contract_rules.trials import participant_record
    from record_access.trials import build_enroll, read_consent_file

    state = replay(config, data_dir).state
    t = _trial(state, trial_id)
    doc = read_json(consent_file, "the consent file")
    party = state.table("parties").get(str(doc.get("participant")))
    if party is None:
        raise fail(f"participant {doc.get('participant')} is not a registered party", 1)
    me = load_key(key)
    try:
        signed = read_consent_file(doc, t, bytes(party["pk"]))
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = _append(config, data_dir, lambda: build_enroll(me, trial_id, signed, _attributes(attr), now_ms()))
    p = participant_record(replay(config, data_dir).state, trial_id, signed.participant)
    assert p is not None
    print_result({"trial": trial_id, "participant": signed.participant, "enrolled_at": index,
                  "stratum": p["stratum"], "position": p["position"], "kit": p["label"]}, as_json)


def _participant(state: Any, trial_id: str, participant: str) -> dict[str, Any]:  # noqa: ANN401
    from contract_rules.trials import participant_record

    p = participant_record(state, trial_id, participant)
    if p is None:
        raise fail(f"{participant} is not enrolled in trial {trial_id}", 1)
    return p


@trial_app.command("dispense", epilog=example(
    "carechain trial dispense hrt-1 3b6a…e1 --key keys/pharmacy.key --terminal-key keys/terminal-1.key"))
def dispense(trial_id: TrialArg, participant: ParticipantArg, key: KeyOpt,
             terminal_key: Annotated[Path, typer.Option("--terminal-key", help="Your registered terminal's key: "
                                                                               "it signs the sale of the kit.")],
             seq: Annotated[int | None, typer.Option(help="The terminal's event sequence number (default: the "
                                                          "time in ms).", min=0)] = None,
             config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Dispense a participant's kit (bonded pharmacy): your terminal signs the sale of the kit labelled for her
    slot, to her, and you sign the dispensing."""
    from record_access.trials import build_dispense

    p = _participant(replay(config, data_dir).state, trial_id, participant)
    pharmacy, terminal = load_key(key), load_key(terminal_key)
    ts = now_ms()
    index = _append(config, data_dir, lambda: build_dispense(pharmacy, terminal, trial_id, p,
                                                             ts if seq is None else seq, ts))
    print_result({"trial": trial_id, "participant": participant, "kit": p["label"], "dispensed_at": index}, as_json)


@trial_app.command("withdraw", epilog=example(
    "carechain trial withdraw hrt-1 3b6a…e1 --key keys/alice.key --reason personal",
    "carechain trial withdraw hrt-1 3b6a…e1 --key keys/investigator.key --reason lost_to_follow_up"))
def withdraw(trial_id: TrialArg, participant: ParticipantArg, key: KeyOpt, reason: ReasonOpt = "withdrawn",
             config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Withdraw a participant before the lock (she herself, or an investigator): her outcome is not analysed."""
    from record_access.trials import build_withdraw

    me = load_key(key)
    index = _append(config, data_dir, lambda: build_withdraw(me, trial_id, participant, reason, now_ms()))
    print_result({"trial": trial_id, "participant": participant, "withdrawn_at": index, "reason": reason}, as_json)


@trial_app.command("unblind", epilog=example(
    "carechain trial unblind hrt-1 3b6a…e1 --key keys/investigator.key --reason adverse_event",
    "carechain trial unblind hrt-1 3b6a…e1 --key keys/investigator.key --open"))
def unblind(trial_id: TrialArg, participant: ParticipantArg, key: KeyOpt, reason: ReasonOpt = "emergency",
            open_: Annotated[bool, typer.Option("--open", help="Instead: open the committers' answers to your "
                                                              "logged unblinding and print her arm.")] = False,
            config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Emergency unblinding of one participant (investigator): a public, logged entry; each committer answers
    with its keys of the blocks that may hold her slot (one block when the design has one block size), sealed to
    you. Then `--open` finds her block from everyone's keys and prints her arm (exit 1 while answers are
    missing). You may learn the arms of every candidate block; `verify trial` lists those slots."""
    from record_access.trials import build_unblind, open_unblinding, unblind_answers

    me = load_key(key)
    if not open_:
        index = _append(config, data_dir, lambda: build_unblind(me, trial_id, participant, reason, now_ms()))
        print_result({"trial": trial_id, "participant": participant, "unblinding": index, "reason": reason},
                     as_json)
        return
    state = replay(config, data_dir).state
    t = _trial(state, trial_id)
    leaf = next((int(at) for at, u in t["unblindings"].items() if u["participant"] == participant), None)
    if leaf is None:
        raise fail(f"{participant} was not unblinded in trial {trial_id}: log it first (without --open)", 1)
    try:
        opened = open_unblinding(me, t, leaf, unblind_answers(_leaves(config, data_dir), trial_id, leaf))
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    print_result({"trial": trial_id, "unblinding": leaf, **opened}, as_json)


def _leaves(config: Path | None, data_dir: Path | None) -> list[tuple[int, bytes]]:
    from chain_bridge.ledger.reader import LedgerReader
    from chain_bridge.registry import ledger_path

    reader = LedgerReader(ledger_path(bridge_dir(load(config), data_dir)))
    try:
        return list(enumerate(reader.leaves(0, reader.size())))
    finally:
        reader.close()


@trial_app.command("answer", epilog=example("carechain trial answer hrt-1 1234 --key keys/sponsor.key"))
def answer(trial_id: TrialArg,
           unblinding: Annotated[int, typer.Argument(help="The leaf of the logged `trial unblind`.", min=0)],
           key: KeyOpt, seed_file: SeedOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None,
           as_json: JsonOpt = False) -> None:
    """Answer an emergency unblinding (sponsor; the labelling miners answer by themselves): your key of her
    stratum's block sizes and your keys of every block that may hold her slot, sealed to the investigator who
    asked. Nothing else of your seed."""
    from record_access.trials import answer_unblinding, load_seed

    state = replay(config, data_dir).state
    t = _trial(state, trial_id)
    u = t["unblindings"].get(str(unblinding))
    if u is None:
        raise fail(f"no emergency unblinding at leaf {unblinding} in trial {trial_id}", 1)
    me = load_key(key)
    investigator = state.table("parties")[u["investigator"]]
    try:
        seed = load_seed(seed_file or default_seed_file(key, trial_id), trial_id)
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = _append(config, data_dir, lambda: answer_unblinding(me, t, unblinding, seed, bytes(investigator["pk"]),
                                                                now_ms()))
    print_result({"trial": trial_id, "unblinding": unblinding, "answered_at": index, "to": u["investigator"]},
                 as_json)


@trial_app.command("lock", epilog=example("carechain trial lock hrt-1 --key keys/sponsor.key"))
def lock(trial_id: TrialArg, key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
         as_json: JsonOpt = False) -> None:
    """Lock the database (sponsor), once enrolment has closed on attested time: readings anchored from here on
    do not count, and the committers reveal their seeds within the reveal window."""
    from record_access.trials import build_lock

    me = load_key(key)
    index = _append(config, data_dir, lambda: build_lock(me, trial_id, now_ms()))
    t = _trial(replay(config, data_dir).state, trial_id)
    print_result({"trial": trial_id, "locked_at": index, "reveal_ends_ms": t["lock"]["reveal_ends_ms"]}, as_json)


@trial_app.command("reveal", epilog=example("carechain trial reveal hrt-1 --key keys/sponsor.key"))
def reveal(trial_id: TrialArg, key: KeyOpt, seed_file: SeedOpt = None, config: ConfigOpt = None,
           data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Reveal your committed seed after the lock (sponsor; the labelling miners reveal by themselves)."""
    from record_access.trials import build_reveal, load_seed

    me = load_key(key)
    try:
        seed = load_seed(seed_file or default_seed_file(key, trial_id), trial_id)
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = _append(config, data_dir, lambda: build_reveal(me, trial_id, seed, now_ms()))
    t = _trial(replay(config, data_dir).state, trial_id)
    print_result({"trial": trial_id, "revealed_at": index,
                  "seeds": f"{len(t['seeds'])} of {len(t['labellers']) + 1}"}, as_json)


@trial_app.command("recover", epilog=example(
    "carechain trial recover hrt-1 7c0f…a2 --key keys/sponsor.key",
    "carechain trial recover hrt-1 7c0f…a2 --key keys/sponsor.key --json"))
def recover(trial_id: TrialArg,
            party: Annotated[str, typer.Argument(help="The committer (a labelling miner) that did not reveal.")],
            key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Give your escrow share of a silent committer's seed (sponsor; the labelling miners give theirs by
    themselves), once the reveal window closed without its reveal: the share sealed to you in its accepted
    commitment is opened with your key and logged. When a majority of the committers gave theirs, the rules
    recover the seed and check it against its commitment (a seed that fails it voids the trial)."""
    from contract_rules.trials import threshold
    from record_access.trials import build_recover, commit_payload

    me = load_key(key)
    t = _trial(replay(config, data_dir).state, trial_id)
    try:
        commit = commit_payload(_leaves(config, data_dir), t, party)
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = _append(config, data_dir, lambda: build_recover(me, t, party, commit, now_ms()))
    t = _trial(replay(config, data_dir).state, trial_id)
    seed = t["seeds"].get(party)
    print_result({"trial": trial_id, "party": party, "share_at": index,
                  "shares": f"{len(t['recoveries'].get(party, {}))} of {threshold(t)} needed",
                  "recovered": seed is not None and seed["how"] == "recovered", "state": t["state"]}, as_json)


@trial_app.command("outcome", epilog=example(
    "carechain trial outcome hrt-1 --key keys/alice.key --pre-key keys/alice.pre"))
def outcome(trial_id: TrialArg, key: KeyOpt,
            pre_key: Annotated[Path, typer.Option("--pre-key", help="Your re-encryption key file: opens your sealed "
                                                                    "reading on this machine.")],
            config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Disclose your primary-outcome reading after the lock (participant): your device's sealed trial_measure
    reading anchored before the lock, with the data key that opens it."""
    from carechain.cli._ledger import deployment_genesis, load_pre_key
    from chain_bridge.ledger.reader import LedgerReader
    from chain_bridge.registry import ledger_path
    from record_access.trials import build_outcome, find_reading

    me, pre = load_key(key), load_pre_key(pre_key)
    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    genesis = deployment_genesis(cfg, bdir)
    t = _trial(replay(config, data_dir).state, trial_id)
    reader = LedgerReader(ledger_path(bdir))
    try:
        leaves = list(enumerate(reader.leaves(0, reader.size())))
        reading = find_reading(leaves, reader.ciphertext, me.device_id, pre, genesis.operators, t)
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    finally:
        reader.close()
    index = _append(config, data_dir, lambda: build_outcome(me, trial_id, reading, now_ms()))
    print_result({"trial": trial_id, "disclosed_at": index, "reading": reading.leaf, "baseline": reading.baseline,
                  "followup": reading.followup, "change": reading.followup - reading.baseline}, as_json)


@trial_app.command("certify", epilog=example("carechain trial certify hrt-1 --key keys/anyone.key --json"))
def certify(trial_id: TrialArg, key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
            as_json: JsonOpt = False) -> None:
    """Certify the pre-registered result (anyone), once every seed is revealed or recovered: the analysis is
    recomputed here as the rules will, and the rules accept only an exact match."""
    from record_access.trials import build_certificate

    me = load_key(key)
    state = replay(config, data_dir).state
    try:
        entry, result = build_certificate(me, state, trial_id, now_ms())
    except _client_error() as exc:
        raise fail(str(exc), 1) from None
    index = submit(config, data_dir, entry)
    if as_json:
        out.print_json(data={"trial": trial_id, "certified_at": index, "result": result})
    else:
        print_result({"trial": trial_id, "certified_at": index, **result}, False)


@trial_app.command("status", epilog=example("carechain trial status hrt-1", "carechain trial status hrt-1 --json"))
def status(trial_id: TrialArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
           as_json: JsonOpt = False) -> None:
    """A trial's registration and progress: state, committers and who has committed and revealed, enrolment
    per stratum, dispensed kits, withdrawals, unblindings, lock, outcomes disclosed, the certificate."""
    from contract_rules.trials import committers, participant_record

    state = replay(config, data_dir).state
    t = _trial(state, trial_id)
    people = [participant_record(state, trial_id, pid) or {} for pid in t["participants"]]
    summary: dict[str, Any] = {
        "trial": trial_id, "state": t["state"], "sponsor": t["sponsor"], "protocol_hash": t["protocol_hash"],
        "investigators": t["investigators"], "committers": committers(t), "committed": sorted(t["commitments"]),
        "revealed": sorted(t["seeds"]), "enrol_closes_ms": t["enrol_closes_ms"], "enrolled": len(people),
        "strata": t["strata_counts"], "dispensed": sum(p.get("dispensed") is not None for p in people),
        "withdrawn": sum(p.get("withdrawn") is not None for p in people),
        "unblinded": [u["participant"] for u in t["unblindings"].values()],
        "locked_at": (t["lock"] or {}).get("at"), "outcomes": sum(p.get("outcome") is not None for p in people),
        "faults": t["faults"], "certificate": (t["certificate"] or {}).get("result")}
    if as_json:
        out.print_json(data=summary)
    else:
        print_result({k: ",".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
                      for k, v in summary.items()}, False)


@trial_app.command("verify", epilog=example("carechain trial verify hrt-1 --data-dir carechain-data/bridge",
                                            "carechain verify trial hrt-1 --data-dir carechain-data/bridge "
                                            "--checkpoint note.txt --json"))
def verify(trial_id: TrialArg,
           checkpoint: Annotated[Path | None, typer.Option(help="A signed checkpoint note (default: the ledger's "
                                                                "latest).")] = None,
           log_key_hex: Annotated[str | None, typer.Option("--log-key", help="Trusted log public key (hex).")]
           = None,
           config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Verify a trial from the log alone (the same as `carechain verify trial ID`): registration, commitments,
    reveals, allocation, balance, outcomes, concealment, analysis, anchoring. Exit 1 if any check fails."""
    from carechain.cli.proofs import verify_ledger_item

    verify_ledger_item("trial", trial_id, config, data_dir, checkpoint, log_key_hex, as_json)
