"""One rejection type and one list of rejection reasons for the whole protocol.

`Reason` enumerates every reason the bridge can give for refusing an event. The reason strings are wire
values (they travel in receipts, `rej: [[seq, reason, detail, retryable, digest], …]`) and never change;
whether the agent may resend (`retryable`) and what each means are attached here, once, and the bridge,
the receipts, the tests and the table in docs/protocol.md all read them from here.
`python -m carechain.errors --markdown` prints that table; a test checks the doc holds exactly it.

`ProtocolError(reason, detail, retryable)` is the one base of the protocol's error classes (envelope,
payload, receipt, proof, note, entry, evidence, cosignature…): `reason` is a stable code for logs and
metrics, `detail` says what was wrong with which input, for a person.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable
from typing import ClassVar

__all__ = ["CONTRACT_PREFIX", "FixedReasonError", "ProtocolError", "Reason", "contract_reason",
           "is_retryable", "markdown_table"]

# A sale the contract rules refuse is rejected as "contract:<the contract's reason>" (docs/contracts.md).
CONTRACT_PREFIX = "contract:"


class Reason(enum.StrEnum):
    """Why the bridge refused an event: a stable wire value, whether it is retryable, and what it means.

    Listed in the order the bridge checks (cheapest first, identity before signature before time), so the
    reason a device gets names the first thing that is wrong.
    """

    retryable: bool
    receipted: bool  # sent back to the device (False: counted and logged only)
    description: str

    def __new__(cls, value: str, retryable: bool, description: str, receipted: bool = True) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.retryable = retryable
        member.receipted = receipted
        member.description = description
        return member

    TOO_LARGE = ("too_large", False, "event larger than `limits.max_event_bytes` (default 4096)")
    BAD_ENVELOPE = ("bad_envelope", False,
                    "a CBOR map that is not a sealed event (v2): the deterministic map of exactly `ct` (a "
                    "ciphertext of at most 4096 bytes) and `ev` (a COSE_Sign1), both byte strings")
    MALFORMED = ("malformed", False,
                 "not well-formed CBOR (or a tag, an indefinite length, a simple value, invalid UTF-8, too deep), "
                 "trailing bytes, or a COSE_Sign1 not in its deterministic encoding (the signature does not "
                 "cover the envelope, so other encodings of it are refused)")
    NOT_COSE_SIGN1 = ("not_cose_sign1", False, "CBOR, but not a tagged 4-element COSE_Sign1")
    BAD_HEADER = ("bad_header", False,
                  "protected header not exactly `{1: -8, 4: kid}` deterministically encoded (no other parameters, "
                  "`kid` 1–64 lowercase base32 characters), or a non-empty unprotected header")
    BAD_ALG = ("bad_alg", False, "an algorithm other than EdDSA")
    BAD_PAYLOAD = ("bad_payload", False,
                   "payload missing, not a map, not deterministic CBOR (indefinite lengths, duplicate keys, tags), "
                   "nested deeper than `limits.max_cbor_depth` (default 16), or a field of the wrong type")
    TOPIC_MISMATCH = ("topic_mismatch", False, "`kid`, payload `dev` and topic do not all name the same device")
    UNREGISTERED = ("unregistered", True, "no registration for this device_id on the ledger (yet)")
    REVOKED = ("revoked", False, "the device was revoked")
    BAD_SIGNATURE = ("bad_signature", False, "the signature does not verify with the **registered** key")
    UNSUPPORTED_VERSION = ("unsupported_version", False, "payload `v` not served by this bridge")
    BAD_BODY = ("bad_body", False, "unknown `kind`, or a body outside its model (type or physiological range)")
    CIPHERTEXT_MISSING = ("ciphertext_missing", False,
                          "a sealed reading (v2) sent without its ciphertext, as a bare COSE_Sign1")
    CIPHERTEXT_MISMATCH = ("ciphertext_mismatch", False,
                           "the ciphertext sent with a sealed reading does not hash to the `ct` its signed body "
                           "carries, or a ciphertext came with an event that has none")
    CLOCK_SKEW = ("clock_skew", False,
                  "`ts` more than `limits.max_future_skew_s` (default 300 s) ahead of the bridge")
    TOO_OLD = ("too_old", False, "`ts` older than `limits.max_age_s` (default 30 days)")
    SEQ_GAP = ("seq_gap", False,
               "`seq` more than `limits.max_seq_gap` (default 1,000,000) past the device's highest")
    SEQ_REUSED = ("seq_reused", False,
                  "this seq is already anchored with **different** bytes (the original leaf keeps it)")
    RATE_LIMITED = ("rate_limited", True,
                    "the device sent more than `limits.max_events_per_s` (default 1,000/s) beyond a burst of "
                    "`limits.burst` (default 20,000); resends of anchored events are re-acknowledged, never limited")
    VERSION_RETIRED = ("version_retired", False,
                       "a plain-text (v1) health reading after the operator's `protocol.cutover` entry; "
                       "upgrade the agent to protocol 2")
    UNKNOWN_OWNER = ("unknown_owner", False,
                     "an `epoch_key` event whose `owner` is not the device's registered owner")
    BAD_TOPIC = ("bad_topic", False, "a message on a topic that is not `cc/v1/dev/{id}/ev` (counted and logged only)",
                 False)
    BAD_BATCH = ("bad_batch", False,
                 "a batch message (a one-entry CBOR map) that is not exactly `{\"batch\": [event bytes, …]}`: empty, "
                 "more than `limits.max_batch_events` (default 1,000) events, larger than the broker's packet limit, "
                 "an element that is not a byte string or is itself a batch; refused whole, the events unread")


# The one reason that is not a fixed member: the contract's own reason follows the prefix.
_CONTRACT_ROW = ("`contract:<rule>`", "the contract rules refuse this sale, for `<rule>` (docs/contracts.md); it is "
                 "recorded as a `sale.refused` leaf where the contracts can count it", "no")


def contract_reason(rule: str) -> str:
    """The wire reason of a sale the contract rules refuse for `rule` (e.g. "contract:rx_missing")."""
    return CONTRACT_PREFIX + rule


def is_retryable(reason: str) -> bool:
    """Whether an event refused for `reason` may be resent as it is (only reasons a wait can fix)."""
    member = Reason._value2member_map_.get(reason)
    return isinstance(member, Reason) and member.retryable


class ProtocolError(ValueError):
    """Input the protocol refuses: `reason` (a stable code), `detail` (for a person), `retryable`.

    A ValueError, so callers that only care that input was bad can keep catching that.
    """

    show_reason: ClassVar[bool] = True  # str(error) is "reason: detail" (False: the detail alone)

    def __init__(self, reason: str, detail: str, retryable: bool | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if self.show_reason else detail)
        self.reason = reason
        self.detail = detail
        self.retryable = is_retryable(reason) if retryable is None else retryable

    def __reduce__(self) -> tuple[Callable[..., ProtocolError], tuple[object, ...]]:
        # Rebuilt field by field: subclasses take other constructor arguments than (reason, detail).
        return ProtocolError._rebuild, (type(self), self.reason, self.detail, self.retryable)

    @staticmethod
    def _rebuild(cls: type[ProtocolError], reason: str, detail: str, retryable: bool) -> ProtocolError:
        error = cls.__new__(cls)
        ProtocolError.__init__(error, reason, detail, retryable)
        return error


class FixedReasonError(ProtocolError):
    """A family of errors with one reason code (`REASON`): raised with the detail alone, shown as the detail."""

    REASON: ClassVar[str] = "invalid"
    show_reason = False

    def __init__(self, detail: str) -> None:
        super().__init__(self.REASON, detail, False)


def markdown_table() -> str:
    """The rejection-reason table of docs/protocol.md, from `Reason`."""
    rows = ["| reason | meaning | retryable |", "|---|---|---|"]
    for r in Reason:
        retry = ("yes" if r.retryable else "no") if r.receipted else "—"
        rows.append(f"| `{r.value}` | {r.description} | {retry} |")
    rows.append("| {} | {} | {} |".format(*_CONTRACT_ROW))
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carechain.errors",
                                     description="Print the protocol's rejection reasons.")
    parser.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/protocol.md")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    else:
        for r in Reason:
            sys.stdout.write(f"{r.value}\t{'retryable' if r.retryable else 'permanent'}\t{r.description}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
