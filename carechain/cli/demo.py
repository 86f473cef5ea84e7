"""`carechain demo`: the whole flow on one machine (carechain.demo.pipeline), shown as live tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from carechain.cli._options import StopSignal, console, example, fail, out

if TYPE_CHECKING:
    from carechain.demo.pipeline import ConsoleLogin

EPILOG = example("carechain demo", "carechain demo --json", "carechain demo --data-dir demo-data --ble",
                 "carechain demo --skip market --skip trial",
                 "carechain demo --data-dir demo-data && carechain access log --data-dir demo-data/bridge",
                 "carechain demo --http 127.0.0.1:8080")
JSON_KEYS = ("sent", "anchored", "rejected", "duplicates", "checkpoints", "proof_verified", "access_opened",
             "access_logged", "access_refused_without_grant", "miners", "final_checkpoints", "formulary_refusals",
             "study_result", "study_contributors", "study_verified", "trial_certificate", "trial_verified")


def demo(
    broker: Annotated[str | None, typer.Option(help="Use this MQTT broker HOST:PORT (e.g. a mosquitto) "
                                               "instead of the embedded one.")] = None,
    seconds: Annotated[float, typer.Option(help="How long devices produce readings.", min=1)] = 6.0,
    speedup: Annotated[float, typer.Option(help="Sample simulated devices this many times faster.", min=0.1)] = 20.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep the demo's data (ledger, keys, outbox) here "
                                                  "(default: a temporary folder, removed at exit).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the summary as one JSON object.")] = False,
    ble: Annotated[bool, typer.Option("--ble", help="The health devices are virtual BLE peripherals (bumble) "
                                      "reached through the agent's bleak code, as on a Raspberry Pi.")] = False,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Leave out the data market or the trial "
                                                   "(repeatable: --skip market --skip trial); their JSON keys "
                                                   "are then null.")] = None,
    http: Annotated[str | None, typer.Option("--http", metavar="HOST:PORT", help="Serve the bridge's web console, "
                                             "/metrics and /healthz here while the demo runs, and keep them up "
                                             "after it until Ctrl-C (an account for this run is printed "
                                             "once).")] = None,
) -> None:
    """The whole flow on one machine: 6 BLE health devices + a pharmacy terminal → agent → MQTT → bridge →
    verifiable log cosigned by 5 miners, with hostile traffic injected, then one inclusion proof verified end to end.

    The health readings are sealed at the edge to their owner, Alice (the ledger anchors hashes, never
    readings). Then a doctor in another city asks for Alice's last hour of heart rate, Alice grants it
    3-of-5, and once the grant is final the miners release capsule fragments and the doctor opens and
    verifies every reading; the access log follows, and an outsider asking without a grant is refused.
    --json adds access_opened, access_logged (access records on the ledger) and access_refused_without_grant,
    miners (active: registered and bonded), final_checkpoints (cosigned by a majority of them) and
    formulary_refusals (sales rung up as not Rx-only that the authority's formulary lists as Rx-only).
    Then a researcher's studies over 22 patients' sealed readings, computed by 3 aggregator miners in MPC by
    themselves, a sample of contributions audited: --json adds study_result (the mean resting heart rate),
    study_contributors (included) and study_verified (every study re-checked from the log by
    `contract_rules.study_check.verify_study`). Last, a 40-participant randomised trial whose labelling miners
    commit and reveal by themselves: --json adds trial_certificate (the pre-registered result the contract
    certified) and trial_verified (`contract_rules.trial_check.verify_trial` from the log alone).
    """
    from carechain.demo.pipeline import SKIPPABLE, DemoUnavailable, check_available

    skipped = frozenset(skip or ())
    if not skipped <= set(SKIPPABLE):
        raise fail(f"--skip takes {' or '.join(SKIPPABLE)}, not {', '.join(sorted(skipped - set(SKIPPABLE)))}")
    try:
        check_available(ble=ble)
    except DemoUnavailable as exc:
        raise fail(str(exc)) from None
    if http is not None:
        from chain_bridge.console.serve import listen_address

        try:
            listen_address(http)
        except ValueError as exc:
            raise fail(str(exc)) from None
    logging.basicConfig(level=logging.ERROR)
    web = _ConsoleHold(as_json) if http is not None else None
    console_args: dict[str, Any] = {} if web is None else {"http": http, "on_console": web.announce,
                                                           "hold": web.hold}
    if as_json:
        summary = _run_or_fail(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup, ble=ble,
                               skip=skipped, **console_args)
        if web is None:
            print(json.dumps({k: summary[k] for k in JSON_KEYS}), flush=True)
        raise typer.Exit(0 if _succeeded(summary) else 1)
    from rich.live import Live

    def render(s: dict[str, Any]) -> Table:
        t = Table(title=f"carechain demo — {s['phase']}", show_header=False)
        for key in ("signed", "outbox", "received", "anchored", "duplicates", "rejected", "checkpoints", "tree_size"):
            t.add_row(key, str(s[key]))
        return t

    with Live(render({"phase": "starting", "signed": 0, "outbox": 0, "received": 0, "anchored": 0,
                      "duplicates": 0, "rejected": 0, "checkpoints": 0, "tree_size": 0}),
              console=out, refresh_per_second=5) as live:
        summary = _run_or_fail(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup, ble=ble,
                               skip=skipped, on_tick=lambda s: live.update(render(s)), **console_args)
    if web is None:
        out.line()  # a pipe gets the live table's last frame without its line end
        _print_summary(summary)
    raise typer.Exit(0 if _succeeded(summary) else 1)


def _run_or_fail(**kwargs: Any) -> dict[str, Any]:  # noqa: ANN401 - run_demo's keyword arguments
    from carechain.demo.pipeline import run_demo
    from chain_bridge.console.server import ConsoleError

    try:
        return run_demo(**kwargs)
    except ConsoleError as exc:  # --http: the address cannot be served (taken, or not this host's)
        raise fail(str(exc)) from None


class _ConsoleHold:
    """`demo --http`: show the console's URL and this run's account once, then, after the summary, keep the console
    up until Ctrl-C (the demo's data stays until then)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.url = ""

    def announce(self, login: ConsoleLogin) -> None:
        # On the terminal only, never through logging: the password is for this run and this person. Printed through
        # the live display's console (above the table it redraws), or on stderr when stdout carries the JSON.
        self.url = login.url
        terminal = console if self.as_json else out
        terminal.print(f"console: {login.url}  user [bold]{login.user}[/]  password [bold]{escape(login.password)}[/]  "
                       "(made for this run; shown once, never logged)", soft_wrap=True, highlight=False)

    def hold(self, summary: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps({k: summary[k] for k in JSON_KEYS}), flush=True)
        else:
            out.line()
            _print_summary(summary)
        stop = StopSignal()
        console.print(f"console: still serving {self.url} (the final ledger) — press Ctrl-C to stop",
                      soft_wrap=True, highlight=False)
        stop.wait()


def _succeeded(s: dict[str, Any]) -> bool:
    return bool(s["proof_verified"] and s["access_opened"] and s["access_refused_without_grant"]
                and s["study_verified"] is not False and s["trial_verified"] is not False)


def _counts(counts: dict[str, int]) -> str:
    """`reason n, reason n` — readable, never a Python dict."""
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _tally(outcomes: dict[str, str]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for outcome in outcomes.values():
        counted[outcome] = counted.get(outcome, 0) + 1
    return counted


def _print_summary(s: dict[str, Any]) -> None:
    t = Table(title="summary", show_header=False)
    t.add_row("broker", s["broker"])
    t.add_row("events signed and sent by agents", str(s["sent"]))
    t.add_row("anchored in the log (exactly once)", str(s["anchored"]))
    t.add_row("  by kind", _counts(s["anchored_by_kind"]))
    if s["ble"]:
        t.add_row("  read over BLE (bleak → bumble)", ", ".join(s["ble"]))
    t.add_row("rejected (expected: hostile traffic, sales without Rx)", str(s["rejected"]))
    for reason, n in sorted(s["rejected_by_reason"].items()):
        t.add_row(f"  refused: {reason}", str(n))
    t.add_row("duplicates re-acknowledged", str(s["duplicates"]))
    t.add_row("checkpoints signed", str(s["checkpoints"]))
    t.add_row(f"  final (cosigned by a majority of the {s['miners']} active miners)", str(s["final_checkpoints"]))
    t.add_row("outbox left / quarantined", f"{s['outbox_left']} / {s['quarantined']}")
    t.add_row("inclusion proof verified", "[green]yes[/]" if s["proof_verified"]
              else f"[red]no[/] {escape(str((s['proof'] or {}).get('error', '')))}")
    out.print(t)
    if s.get("pharmacy"):
        _print_pharmacy_day(s["pharmacy"], s["rejected_by_reason"])
    if s.get("access"):
        _print_access(s["access"], s["finality"])
    if s.get("study"):
        _print_study(s["study"])
    if s.get("trial"):
        from carechain.demo.trial import certificate_lines

        out.print("\n".join(certificate_lines(s["trial"])), soft_wrap=True, markup=False, highlight=False)
    p = s["proof"] or {}
    if "leaf_index" in p:
        out.print(f"proof: event {p['device_id']}#0 is leaf {p['leaf_index']} of tree {p['tree_size']} "
                  f"(root {p['root_hash'][:16]}…)", soft_wrap=True, highlight=False)
    device = p.get("device_id", "DEVICE_ID")
    if s.get("data_kept"):
        out.print(f"data: {s['data_dir']}\ntry: carechain proof {device} 0 --data-dir {s['data_dir']}/bridge --json "
                  f"> p.json && carechain verify p.json --log-key {s['log_public_key']}",
                  soft_wrap=True, markup=False, highlight=False)
    else:  # a new run makes new keys and devices: this run's would be no use to try
        out.print("data: removed (a temporary folder). To check a proof yourself, keep it: carechain demo "
                  "--data-dir DIR prints the `carechain proof … && carechain verify … --log-key …` to run.",
                  soft_wrap=True, markup=False, highlight=False)


def _print_pharmacy_day(day: dict[str, Any], reasons: dict[str, int]) -> None:
    refused = {r.removeprefix("contract:"): n for r, n in reasons.items() if r.startswith("contract:")}
    t = Table(title="pharmacy day (contracts)", show_header=False)
    t.add_row("sales refused by the contracts", str(sum(refused.values())))
    for reason, n in sorted(refused.items()):
        t.add_row(f"  refused: {reason}", str(n))
    t.add_row("violations counted against the pharmacy", str(day["pharmacy_violations"]))
    t.add_row("  sold as not Rx-only, Rx-only on the formulary", str(day["formulary_refusals"]))
    for party, minor in day["bonds"].items():
        t.add_row(f"  bond {party}", f"{minor / 100:,.2f}")
    t.add_row("terminal's sales final before hand-over",
              "[green]yes[/]" if day["terminal_sales_final"] else "[red]no[/]")
    for c in day["claims"]:
        t.add_row(f"  claim: {c['category']} for {c['patient']}",
                  f"insurer pays {c['insurer_share']} of {c['price']} (copay {c['copay']})")
    for account, minor in day["balances"].items():
        t.add_row(f"  balance {account}", f"{minor / 100:,.2f}")
    t.add_row("contract state root", day["state_root"][:32] + "…")
    out.print(t)


def _print_access(a: dict[str, Any], finality: str) -> None:
    """Who opened what through which miners, the access log, and the refusal."""
    t = Table(title="private records (sealed at the edge; access granted, logged, opened)", show_header=False)
    t.add_row("record owner", f"Alice {a['owner']} (her devices seal every health reading to her key)")
    t.add_row("requester", f"{escape(a['doctor_name'])} {a['doctor']}")
    if "access" in a:
        t.add_row("asked for", f"the last hour of heart rate of device {a['device']}")
        t.add_row("Alice granted", f"access record {a['access']}: {a['threshold']}-of-{len(a['miners'])} miners "
                                   f"{', '.join(a['miners'])}; final when {finality} cosigned")
    if "readings" in a:
        t.add_row("opened", f"{a['readings']} of {a['expected']} readings, each checked against its anchored hash "
                            f"and its device's signature, from {a['epochs']} epoch key(s)")
        t.add_row("  capsule fragments from", ", ".join(a["answered_by"]))
        if a.get("bpm"):
            t.add_row("  heart rate (bpm)", " ".join(map(str, a["bpm"])))
    t.add_row("access opened", "[green]yes[/]" if a["opened"] else "[red]no[/]")
    refusal = a.get("refusal") or {}
    t.add_row("outsider without a grant", (f"[green]refused[/] ({refusal.get('who')} asked for access "
                                           f"{refusal.get('asked_for')}: {refusal.get('reason')}; "
                                           "no page, no fragment)")
              if a["refused_without_grant"] else "[red]not refused[/]")
    if a.get("error"):
        t.add_row("[red]error[/]", escape(a["error"]))
    out.print(t)
    log = Table(title=f"access log ({len(a['log'])} access record(s) on the ledger)")
    for col in ("access", "requester", "owner", "scope", "purpose", "miners", "status"):
        log.add_column(col)
    for e in a["log"]:
        scope = f"{','.join(e['kinds']) or 'all kinds'} of {','.join(e['devices']) or 'all devices'}, " \
                f"{(e['to_ms'] - e['from_ms']) // 60_000} min"
        log.add_row(str(e["index"]), f"{escape(e['requester_name'])} ({e['requester_role']})", e["owner_name"] or
                    e["owner"], scope, escape(e["purpose"]), f"{e['threshold']}-of-{len(e['miners'])}", e["status"])
    out.print(log)


def _print_study(m: dict[str, Any]) -> None:
    """The researcher's studies: what each asked, who was included, what was opened, and the verification."""
    t = Table(title=f"data market ({m['patients']} patients consent; 3 aggregator miners compute in MPC, over "
                    "mutually authenticated TLS, by themselves)", show_header=False)
    for study in m["studies"]:
        q, answer = study["query"] or {}, study["answer"]
        where = ", ".join(f"{k} {v}" for k, v in study["filter"].items()) or "all consenting"
        if answer is None:
            shown = "[yellow]unanswered[/] (cohort too small; deposit returned)"
        elif "histogram" in answer:
            shown = " ".join(f"{lo}–{hi}: {n}" for lo, hi, n in zip(q["bins"], q["bins"][1:], answer["histogram"],
                                                                   strict=False))
        else:
            shown = f"{answer['sum'] / answer['n']:.1f} (sum {answer['sum']} over {answer['n']})"
        noise = f"; ε={study['epsilon'] / 1000:g} (noisy counts)" if study.get("epsilon") else ""
        t.add_row(f"{study['study_id']}: {q.get('type')} of {q.get('kind')} ({where})",
                  f"{study['included']} of {study['contributions']} included; {shown}{noise}; "
                  + ("[green]verified[/]" if study["verified"] else "[red]not verified[/]"))
        audit = study.get("audit")
        if audit:
            t.add_row("  audit", f"sample {audit['sample']} → {_counts(_tally(audit['outcomes']))}; "
                                 f"forfeited {audit['forfeited'] or 'none'}")
    if "paid" in m:
        t.add_row("paid to patients", f"{m['paid']['patients'] / 100:,.2f}")
    t.add_row("study part took", f"{m['seconds']} s")
    if m.get("error"):
        t.add_row("[red]error[/]", escape(m["error"]))
    out.print(t)
