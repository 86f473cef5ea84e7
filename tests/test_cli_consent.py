"""`carechain consent give|show|revoke` on a real bridge data dir: signed entries appended through the contract
gate, read back from a replay of the ledger, exported as FHIR R4 Consents that `fhir.resources` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.consent import Consent

from carechain.identity import Identity
from tests.test_cli import run, text


class Deployment:
    def __init__(self, tmp: Path) -> None:
        config = tmp / "carechain.yaml"
        config.write_text("bridge:\n  genesis_allocations:\n    'pool:miners': 1\n")
        self.tmp = tmp
        self.opts = ["--config", str(config), "--data-dir", str(tmp / "bridge")]
        self.ids: dict[str, str] = {}
        for who, role in (("alice", "patient"), ("bob", "patient"), ("lab", "researcher")):
            Identity.generate().save(tmp / f"{who}.key")
            self.ids[who] = self.json("party", "register", role, tmp / f"{who}.key", "--name", who)["party_id"]

    def key(self, who: str) -> Path:
        return self.tmp / f"{who}.key"

    def json(self, *args: str | Path) -> dict:  # type: ignore[type-arg]
        result = run(*args, *self.opts, "--json")
        assert result.exit_code == 0, text(result)
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def give(self, who: str = "alice", *extra: str) -> dict:  # type: ignore[type-arg]
        return self.json("consent", "give", "--key", self.key(who), "--kinds", "heart_rate,glucose",
                         "--queries", "count,mean", "--min-cohort", "20", "--price", "150", "--expires", "30d",
                         *extra)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return Deployment(tmp_path)


def test_give_show_and_revoke_a_consent_on_the_ledger(deployment: Deployment) -> None:
    d = deployment
    given = d.give("alice", "--buyer", d.ids["lab"], "--age-band", "30-44", "--sex", "f")
    index = given["consent"]
    assert given["owner"] == d.ids["alice"] and given["buyers"] == d.ids["lab"]
    d.give("bob")
    shown = d.json("consent", "show", str(index))
    assert shown["count"] == 1
    record = shown["consents"][0]
    assert record["owner"] == d.ids["alice"] and record["status"] == "active"
    assert record["kinds"] == ["heart_rate", "glucose"] and record["queries"] == ["count", "mean"]
    assert record["min_cohort"] == 20 and record["price_minor"] == 150 and record["buyers"] == [d.ids["lab"]]
    assert record["attributes"] == {"age_band": "30-44", "sex": "f", "region": None}
    assert d.json("consent", "show")["count"] == 2
    assert [c["owner"] for c in d.json("consent", "show", "--owner", d.ids["bob"])["consents"]] == [d.ids["bob"]]
    # Only the owner revokes, once.
    refused = run("consent", "revoke", str(index), "--key", d.key("bob"), *d.opts)
    assert refused.exit_code == 1 and "not_the_owner" in text(refused)
    revoked = d.json("consent", "revoke", str(index), "--key", d.key("alice"))
    assert revoked["consent"] == index and revoked["revoked_at_leaf"] > index
    assert d.json("consent", "show", str(index))["consents"][0]["status"] == "revoked"
    again = run("consent", "revoke", str(index), "--key", d.key("alice"), *d.opts)
    assert again.exit_code == 1 and "consent_already_revoked" in text(again)


def test_show_fhir_writes_valid_r4_consents(deployment: Deployment) -> None:
    d = deployment
    index = d.give("alice", "--buyer", d.ids["lab"], "--region", "north")["consent"]
    d.give("bob")
    one = d.tmp / "consent.json"
    d.json("consent", "show", str(index), "--fhir", one)
    resource = json.loads(one.read_text())
    consent = Consent.model_validate(resource)
    assert consent.status == "active" and consent.provision.type == "permit"
    assert resource["patient"]["identifier"]["value"] == d.ids["alice"]
    assert resource["provision"]["actor"][0]["reference"]["identifier"]["value"] == d.ids["lab"]
    assert [c["code"] for c in resource["provision"]["class"]] == ["heart_rate", "glucose"]
    extensions = {(e["url"], next(v for k, v in e.items() if k.startswith("value"))) for e in resource["extension"]}
    assert ("urn:carechain:fhir:consent:min-cohort", 20) in extensions
    assert ("urn:carechain:fhir:consent:attribute-region", "north") in extensions
    d.json("consent", "revoke", str(index), "--key", d.key("alice"))
    both = d.tmp / "consents.json"
    d.json("consent", "show", "--fhir", both)
    bundle = json.loads(both.read_text())
    Bundle.model_validate(bundle)
    assert [e["resource"]["status"] for e in bundle["entry"]] == ["inactive", "active"]


def test_a_consent_the_rules_or_the_model_refuse_is_not_appended(deployment: Deployment) -> None:
    d = deployment
    bad_kind = run("consent", "give", "--key", d.key("alice"), "--kinds", "purchase", "--queries", "count",
                   "--min-cohort", "5", *d.opts)
    assert bad_kind.exit_code == 1 and "bad_kinds" in text(bad_kind)
    bad_query = run("consent", "give", "--key", d.key("alice"), "--kinds", "glucose", "--queries", "median",
                    "--min-cohort", "5", *d.opts)
    assert bad_query.exit_code == 2 and "queries" in text(bad_query)
    not_a_buyer = run("consent", "give", "--key", d.key("alice"), "--kinds", "glucose", "--queries", "count",
                      "--min-cohort", "5", "--buyer", d.ids["bob"], *d.opts)
    assert not_a_buyer.exit_code == 1 and "unknown_buyer" in text(not_a_buyer)
    assert d.json("consent", "show")["count"] == 0
    missing = run("consent", "show", "99", *d.opts)
    assert missing.exit_code == 1 and "no consent at leaf 99" in text(missing)
