"""Log checkpoints as C2SP tlog-checkpoint bodies inside C2SP signed notes, signed with Ed25519.

A checkpoint body is three lines, then optional extension lines:

    origin
    tree size (decimal, no leading zeros)
    base64(root hash)

A signed note is the body, a blank line, then one line per signature:
`— <key name> base64(key ID ‖ Ed25519 signature)`, where key ID = SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public
key)[:4]. The signature covers the body's UTF-8 bytes. Witnesses (miners) cosign by appending lines.
Specs: https://c2sp.org/tlog-checkpoint and https://c2sp.org/signed-note; the reference implementation
is golang.org/x/mod/sumdb/note, whose test vectors tests/test_checkpoint.py checks.

Private keys never come here: signing goes through the `sign` callable (`carechain.identity.Identity.sign`),
verification through `carechain.identity.verify_signature`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from carechain.errors import FixedReasonError, ProtocolError
from carechain.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, verify_signature
from carechain.merkle import HASH_SIZE

# The Go reference rejects notes with more than 100 signature lines; the 1 MiB cap is ours, to bound the
# work a hostile note can cause before any signature is checked.
MAX_NOTE_SIZE = 1 << 20
MAX_SIGNATURES = 100
ALG_ED25519 = 0x01
KEY_ID_SIZE = 4

_EM_DASH_PREFIX = "\u2014 "
# ASCII only (str.isdigit() would accept "٣"); at most 20 digits, which 2**64-1 has.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
# Signed notes must not contain ASCII control characters other than newline (signed-note spec).
_CONTROL = re.compile(r"[\x00-\x1f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f]")
_MAX_TREE_SIZE = 2**64 - 1


class NoteErrorReason(enum.StrEnum):
    """Why a note (or verifier key) was rejected; stable values for logs and metrics."""

    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    MALFORMED = "malformed"
    TOO_MANY_SIGNATURES = "too_many_signatures"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE_SIZE = "bad_signature_size"
    BAD_SIGNATURE = "bad_signature"
    DUPLICATE_SIGNATURE = "duplicate_signature"
    BAD_KEY = "bad_key"


class NoteError(ProtocolError):
    """A signed note or verifier key is invalid; `reason` (a `NoteErrorReason`) says which way."""

    show_reason = False  # the message says it in words

    def __init__(self, reason: NoteErrorReason, message: str, retryable: bool = False) -> None:
        super().__init__(reason, message, retryable)


class CheckpointError(FixedReasonError):
    """A checkpoint body is not a valid C2SP tlog-checkpoint."""

    REASON = "bad_checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: who (origin), how many leaves, and the RFC 9162 root of those leaves."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin:
            raise CheckpointError(
                "checkpoint origin must not be empty (use the log's name, e.g. example.org/log)"
            )
        _check_line("checkpoint origin", self.origin)
        if isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int):
            raise CheckpointError(f"checkpoint tree size must be an int, got {type(self.tree_size).__name__}")
        if not 0 <= self.tree_size <= _MAX_TREE_SIZE:
            raise CheckpointError(f"checkpoint tree size must be between 0 and 2**64-1, got {self.tree_size}")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            got = len(self.root_hash) if isinstance(self.root_hash, bytes) else type(self.root_hash).__name__
            raise CheckpointError(f"checkpoint root hash must be {HASH_SIZE} bytes (SHA-256), got {got}")
        if not isinstance(self.extensions, tuple):
            raise CheckpointError("checkpoint extensions must be a tuple of lines")
        for i, line in enumerate(self.extensions):
            if not line:
                raise CheckpointError(
                    f"checkpoint extension line {i} is empty; extension lines must be non-empty"
                )
            _check_line(f"checkpoint extension line {i}", line)

    def body(self) -> str:
        """The note text: origin, size, base64 root and extension lines, each ending in a newline."""
        lines = [self.origin, str(self.tree_size), base64.b64encode(self.root_hash).decode("ascii")]
        return "".join(line + "\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """Parse a checkpoint body (the verified text of a note), rejecting any non-canonical form."""
        if not isinstance(body, str):
            raise CheckpointError(f"checkpoint body must be text, got {type(body).__name__}")
        if not body.endswith("\n"):
            raise CheckpointError("checkpoint body must end with a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"checkpoint body has {len(lines)} line(s); it needs origin, tree size and root hash"
            )
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise CheckpointError(
                f"checkpoint tree size {size_text!r} is not a decimal number without leading zeros"
            )
        try:
            root = base64.b64decode(root_text, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise CheckpointError(f"checkpoint root hash {root_text!r} is not valid base64") from None
        if base64.b64encode(root).decode("ascii") != root_text:
            # Reject alternative encodings so that one tree head has exactly one signed text.
            raise CheckpointError(f"checkpoint root hash {root_text!r} is not canonical base64")
        return cls(origin, int(size_text), root, tuple(extensions))


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note, not yet verified."""

    name: str
    key_hash: bytes  # the 4-byte key ID
    signature: bytes  # the algorithm's signature, without the key ID

    def line(self) -> str:
        """The signature line as it appears in a note, with its newline."""
        blob = base64.b64encode(self.key_hash + self.signature).decode("ascii")
        return f"{_EM_DASH_PREFIX}{self.name} {blob}\n"


def key_hash(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of an Ed25519 key: SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public key)[:4]."""
    _check_name(name)
    _check_public_key(public_key)
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:KEY_ID_SIZE]


def vkey(name: str, public_key: bytes) -> str:
    """Verifier key text `name+<hex key ID>+base64(0x01 ‖ public key)`, as Go's note package writes it."""
    encoded = base64.b64encode(bytes([ALG_ED25519]) + public_key).decode("ascii")
    return f"{name}+{key_hash(name, public_key).hex()}+{encoded}"


def parse_vkey(text: str) -> tuple[str, bytes]:
    """Parse a verifier key into (name, Ed25519 public key), checking its key ID."""
    parts = text.split("+", 2)  # the base64 part may itself contain '+'
    if len(parts) != 3:
        raise NoteError(NoteErrorReason.BAD_KEY, f"verifier key {text!r} is not name+keyid+key")
    name, hash_hex, key_b64 = parts
    _check_name(name, NoteErrorReason.BAD_KEY)
    if len(hash_hex) != 2 * KEY_ID_SIZE or not all(c in "0123456789abcdefABCDEF" for c in hash_hex):
        raise NoteError(NoteErrorReason.BAD_KEY, f"verifier key ID {hash_hex!r} is not 8 hex digits")
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise NoteError(
            NoteErrorReason.BAD_KEY, f"verifier key material {key_b64!r} is not valid base64"
        ) from None
    if not raw or raw[0] != ALG_ED25519:
        alg = f"0x{raw[0]:02x}" if raw else "none"
        raise NoteError(
            NoteErrorReason.BAD_KEY, f"verifier key type {alg} is not supported; only Ed25519 (0x01)"
        )
    public_key = raw[1:]
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise NoteError(
            NoteErrorReason.BAD_KEY,
            f"Ed25519 verifier key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}",
        )
    if bytes.fromhex(hash_hex) != key_hash(name, public_key):
        raise NoteError(
            NoteErrorReason.BAD_KEY, f"verifier key ID {hash_hex} does not match name {name!r} and key"
        )
    return name, public_key


def parse_note(note: str | bytes) -> tuple[str, list[NoteSignature]]:
    """Split a signed note into its text and its (unverified) signatures, checking only the format."""
    text = _decode(note)
    # The text ends at the last blank line: the text itself may contain blank lines.
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteError(
            NoteErrorReason.MALFORMED, "note has no blank line between its text and its signatures"
        )
    body, sig_block = text[: split + 1], text[split + 2 :]
    if not sig_block or not sig_block.endswith("\n"):
        raise NoteError(
            NoteErrorReason.MALFORMED, "note must end with at least one newline-terminated signature line"
        )
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(
            NoteErrorReason.TOO_MANY_SIGNATURES,
            f"note has {len(lines)} signatures; at most {MAX_SIGNATURES} are accepted",
        )
    return body, [_parse_signature_line(i, line) for i, line in enumerate(lines)]


def sign_note(body: str, name: str, public_key: bytes, sign: Callable[[bytes], bytes]) -> str:
    """Sign `body` as key `name` and return the signed note.

    `sign` is the signer's `Identity.sign`; `public_key` must be its public key, which is checked by
    verifying the new signature, so a mismatched pair fails here rather than at every verifier.
    """
    _check_body(body)
    signed = body + "\n" + _signature(body, name, public_key, sign).line()
    _check_size(signed)
    return signed


def add_signature(note: str | bytes, name: str, public_key: bytes, sign: Callable[[bytes], bytes]) -> str:
    """Append a signature by `name` (a cosigner) to an already signed note.

    Existing signatures are kept as they are and not verified here; the signer should have verified the
    note (and, for a checkpoint, its consistency) before cosigning.
    """
    body, signatures = parse_note(note)
    own = key_hash(name, public_key)
    if any(s.name == name and s.key_hash == own for s in signatures):
        raise NoteError(NoteErrorReason.DUPLICATE_SIGNATURE, f"note is already signed by {name}+{own.hex()}")
    if len(signatures) + 1 > MAX_SIGNATURES:
        raise NoteError(
            NoteErrorReason.TOO_MANY_SIGNATURES,
            f"note already has {len(signatures)} signatures, the most allowed",
        )
    signed = _decode(note) + _signature(body, name, public_key, sign).line()
    _check_size(signed)
    return signed


def verify_note(note: str | bytes, name: str, public_key: bytes) -> str:
    """Return the text of `note` if it carries a valid signature by (`name`, `public_key`).

    Signatures by other keys are ignored, as the signed-note spec requires; every signature line by
    this key must verify. Raises `NoteError` otherwise.
    """
    body, signatures = parse_note(note)
    want = key_hash(name, public_key)
    ours = [s for s in signatures if s.name == name and s.key_hash == want]
    if not ours:
        present = ", ".join(f"{s.name}+{s.key_hash.hex()}" for s in signatures)
        raise NoteError(
            NoteErrorReason.UNKNOWN_KEY,
            f"note has no signature by {name}+{want.hex()}; it is signed by {present}. "
            "Check that the right verifier key is configured for this log",
        )
    message = body.encode()
    for s in ours:
        if len(s.signature) != SIGNATURE_SIZE:
            raise NoteError(
                NoteErrorReason.BAD_SIGNATURE_SIZE,
                f"signature by {name}+{want.hex()} has {len(s.signature)} bytes, Ed25519 needs "
                f"{SIGNATURE_SIZE}: the note was truncated or mangled in transit",
            )
        if not verify_signature(public_key, message, s.signature):
            raise NoteError(
                NoteErrorReason.BAD_SIGNATURE,
                f"signature by {name}+{want.hex()} does not verify: the text was altered after signing, "
                "or the signature is forged",
            )
    return body


# -- internals ------------------------------------------------------------------------------------


def _signature(body: str, name: str, public_key: bytes, sign: Callable[[bytes], bytes]) -> NoteSignature:
    kh = key_hash(name, public_key)
    message = body.encode()
    signature = bytes(sign(message))
    if len(signature) != SIGNATURE_SIZE or not verify_signature(public_key, message, signature):
        raise NoteError(
            NoteErrorReason.BAD_KEY,
            f"the signer for {name} did not produce a valid Ed25519 signature under the given public key; "
            "pass the public key of the identity whose sign() you pass",
        )
    return NoteSignature(name, kh, signature)


def _decode(note: str | bytes) -> str:
    if isinstance(note, bytes | bytearray):
        if len(note) > MAX_NOTE_SIZE:
            raise NoteError(
                NoteErrorReason.TOO_LARGE, f"note is {len(note)} bytes; at most {MAX_NOTE_SIZE} are accepted"
            )
        try:
            text = bytes(note).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NoteError(
                NoteErrorReason.NOT_UTF8, f"note is not valid UTF-8 (at byte {e.start})"
            ) from None
    elif isinstance(note, str):
        text = note
        if len(text) > MAX_NOTE_SIZE:  # a character is at least one byte: no need to encode to know
            raise NoteError(
                NoteErrorReason.TOO_LARGE,
                f"note has {len(text)} characters; at most {MAX_NOTE_SIZE} bytes are accepted",
            )
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from errors="surrogateescape"
            raise NoteError(
                NoteErrorReason.NOT_UTF8, f"note is not valid UTF-8 (at character {e.start})"
            ) from None
        if size > MAX_NOTE_SIZE:
            raise NoteError(
                NoteErrorReason.TOO_LARGE, f"note is {size} bytes; at most {MAX_NOTE_SIZE} are accepted"
            )
    else:
        raise NoteError(NoteErrorReason.MALFORMED, f"note must be str or bytes, got {type(note).__name__}")
    _check_controls("note", text, allow_newline=True)
    return text


def _parse_signature_line(i: int, line: str) -> NoteSignature:
    if not line.startswith(_EM_DASH_PREFIX):
        raise NoteError(
            NoteErrorReason.MALFORMED, f"signature line {i} does not start with '— ' (em dash, space)"
        )
    name, sep, blob = line[len(_EM_DASH_PREFIX) :].partition(" ")
    if not sep:
        raise NoteError(
            NoteErrorReason.MALFORMED, f"signature line {i} has no space between key name and signature"
        )
    _check_name(name, NoteErrorReason.MALFORMED)
    try:
        raw = base64.b64decode(blob, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise NoteError(
            NoteErrorReason.MALFORMED, f"signature line {i} ({name}) is not valid base64"
        ) from None
    if base64.b64encode(raw).decode("ascii") != blob:
        raise NoteError(NoteErrorReason.MALFORMED, f"signature line {i} ({name}) is not canonical base64")
    if len(raw) <= KEY_ID_SIZE:
        raise NoteError(
            NoteErrorReason.MALFORMED,
            f"signature line {i} ({name}) is too short to hold a key ID and a signature",
        )
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def _check_size(note: str) -> None:
    size = len(note.encode())
    if size > MAX_NOTE_SIZE:
        raise NoteError(
            NoteErrorReason.TOO_LARGE,
            f"the signed note would be {size} bytes; verifiers accept at most {MAX_NOTE_SIZE}",
        )


def _check_body(body: str) -> None:
    if not isinstance(body, str):
        raise NoteError(NoteErrorReason.MALFORMED, f"note text must be str, got {type(body).__name__}")
    if not body.endswith("\n"):
        raise NoteError(NoteErrorReason.MALFORMED, "note text must end with a newline")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NoteError(
            NoteErrorReason.NOT_UTF8, f"note text is not valid UTF-8 (at character {e.start})"
        ) from None
    _check_controls("note text", body, allow_newline=True)


def _check_name(name: str, reason: NoteErrorReason = NoteErrorReason.BAD_KEY) -> None:
    # Key names: non-empty, no Unicode spaces, no '+' (signed-note spec; Go's isValidName).
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError(reason, f"key name {name!r} must be non-empty and contain no spaces or '+'")
    _check_controls("key name", name, allow_newline=False, reason=reason)


def _check_public_key(public_key: bytes) -> None:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise NoteError(NoteErrorReason.BAD_KEY, f"an Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes")


def _check_controls(
    what: str, text: str, *, allow_newline: bool, reason: NoteErrorReason = NoteErrorReason.MALFORMED
) -> None:
    found = (_CONTROL_BUT_NEWLINE if allow_newline else _CONTROL).search(text)
    if found:
        raise NoteError(
            reason, f"{what} contains control character {found.group()!r} at position {found.start()}"
        )


def _check_line(what: str, line: str) -> None:
    found = _CONTROL.search(line)
    if found:
        raise CheckpointError(
            f"{what} contains control character {found.group()!r} at position {found.start()}"
        )
