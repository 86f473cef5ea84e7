"""One list of rejection reasons: the wire values, what may be retried, and the docs table all come from it."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from carechain import (
    checkpoint,
    cosignature,
    entries,
    envelope,
    events,
    evidence,
    merkle,
    merkle_tree,
    proofs,
    receipts,
)
from carechain.errors import ProtocolError, Reason, contract_reason, is_retryable, markdown_table
from carechain.identity import Identity, PublicKeyError
from carechain.receipts import Receipt, Rejected, open_receipt

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
TABLE = re.compile(r"<!-- reasons-table:[^\n]*-->\n(.*?)<!-- /reasons-table -->\n", re.S)

# What agents in the field already receive: a changed value would be an unknown reason to them.
# Protocol v2 (issue 13) added bad_envelope, ciphertext_missing, ciphertext_mismatch, version_retired, unknown_owner.
WIRE_VALUES = ["too_large", "bad_envelope", "malformed", "not_cose_sign1", "bad_header", "bad_alg", "bad_payload",
               "topic_mismatch", "unregistered", "revoked", "bad_signature", "unsupported_version", "bad_body",
               "ciphertext_missing", "ciphertext_mismatch", "clock_skew", "too_old", "seq_gap", "seq_reused",
               "rate_limited", "version_retired", "unknown_owner", "bad_topic", "bad_batch"]


def test_the_wire_values_of_the_reasons_are_unchanged() -> None:
    assert [r.value for r in Reason] == WIRE_VALUES


def test_only_reasons_a_wait_can_fix_are_retryable() -> None:
    assert {r for r in Reason if r.retryable} == {Reason.UNREGISTERED, Reason.RATE_LIMITED}
    assert is_retryable("rate_limited") and not is_retryable("seq_gap")
    assert not is_retryable(contract_reason("rx_missing")) and not is_retryable("no_such_reason")


def test_every_reason_has_a_one_line_description() -> None:
    for r in Reason:
        assert r.description and "\n" not in r.description and "|" not in r.description, r


def test_the_docs_table_is_the_generated_one() -> None:
    found = TABLE.search(DOC.read_text(encoding="utf-8"))
    assert found is not None, f"{DOC} lost its <!-- reasons-table --> markers"
    assert found.group(1) == markdown_table(), \
        "docs/protocol.md's reason table is stale: paste `python -m carechain.errors --markdown` between the markers"


def test_the_table_generator_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "carechain.errors", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=DOC.parents[1]).stdout
    assert out == markdown_table()
    rows = out.splitlines()[2:]
    assert len(rows) == len(Reason) + 1  # every reason, plus the contract's prefix form
    assert rows[-1].startswith("| `contract:<rule>` |")


def test_a_rejection_crosses_the_wire_as_plain_text_with_its_retryable_flag() -> None:
    bridge = Identity.from_seed(b"\x07" * 32)
    rcpt = Receipt("dev", 1, rejected=[Rejected(3, Reason.RATE_LIMITED, "slow down", Reason.RATE_LIMITED.retryable),
                                       Rejected(4, contract_reason("rx_missing"), "no rx", False)])
    back = open_receipt(rcpt.seal(bridge), bridge.public_key, "dev")
    assert [(r.reason, type(r.reason), r.retryable) for r in back.rejected] == \
        [("rate_limited", str, True), ("contract:rx_missing", str, False)]


ERROR_CLASSES = [envelope.EnvelopeError, events.PayloadError, receipts.ReceiptError, entries.EntryError,
                 merkle.ProofError, merkle_tree.TreeError, proofs.VerificationError, checkpoint.NoteError,
                 checkpoint.CheckpointError, cosignature.CosignatureError, evidence.EvidenceError, PublicKeyError]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_protocol_error_is_a_protocol_error_and_a_value_error(cls: type[Exception]) -> None:
    assert issubclass(cls, ProtocolError) and issubclass(cls, ValueError)


def test_an_envelope_error_carries_its_reason_detail_and_retryable() -> None:
    with pytest.raises(envelope.EnvelopeError) as caught:
        envelope.parse(b"\xff" * 10)
    err = caught.value
    assert (err.reason, err.retryable) == (Reason.MALFORMED, False) and err.detail
    assert str(err) == f"malformed: {err.detail}"


def test_a_one_reason_error_reads_as_its_detail_and_survives_pickling() -> None:
    with pytest.raises(merkle.ProofError) as caught:
        merkle.verify_inclusion(b"\x00" * 32, 5, 3, [], b"\x00" * 32)
    err = caught.value
    assert str(err) == err.detail and err.reason == "bad_proof"
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.reason, again.detail, str(again)) == \
        (merkle.ProofError, err.reason, err.detail, str(err))
    payload = pickle.loads(pickle.dumps(events.PayloadError(Reason.BAD_BODY, "bpm: too high")))
    assert (payload.reason, payload.detail, str(payload)) == ("bad_body", "bpm: too high", "bad_body: bpm: too high")
