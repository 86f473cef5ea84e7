"""C2SP tlog-checkpoint bodies and signed notes, checked against the Go reference's test vectors."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain.checkpoint import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    Checkpoint,
    CheckpointError,
    NoteError,
    NoteErrorReason,
    NoteSignature,
    add_signature,
    key_hash,
    parse_note,
    parse_vkey,
    sign_note,
    verify_note,
    vkey,
)
from carechain.identity import Identity
from carechain.merkle import leaf_hash

# -- vectors from golang.org/x/mod (commit fe2ec04f7c3c3aa6fad97631aafcff6e49e2d1db) -------------------------
# sumdb/note/note_test.go and example_test.go: Peter's signing key (its seed), verifier key and signed note,
# and a second signature by EnochRoot over the same text.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_B64 = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
ENOCH_B64 = "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ="
PETER_SIG = f"— PeterNeumann {PETER_B64}\n"
ENOCH_SIG = f"— EnochRoot {ENOCH_B64}\n"
PETER_NOTE = TEXT + "\n" + PETER_SIG
# sumdb/tlog/note_test.go: a tree note body, whose hash is tlog.RecordHash("hello world") (an RFC 6962 leaf).
GO_TREE_BODY = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"
# The C2SP signed-note spec's example (https://github.com/C2SP/C2SP signed-note.md, commit 5ba5ee83).
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n— example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)
# The C2SP tlog-checkpoint spec's example body.
SPEC_CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def _peter() -> Identity:
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])  # 0x01 (Ed25519) ‖ 32-byte seed
    assert raw[0] == 0x01
    return Identity.from_seed(raw[1:])


PETER_NAME, PETER_KEY = parse_vkey(PETER_VKEY)
ENOCH_NAME, ENOCH_KEY = parse_vkey(ENOCH_VKEY)


# -- verifier keys -------------------------------------------------------------------------------------------


def test_vkey_round_trips_go_verifier_keys() -> None:
    assert ("PeterNeumann", _peter().public_key) == (PETER_NAME, PETER_KEY)
    assert key_hash(PETER_NAME, PETER_KEY) == bytes.fromhex("c74f20a3")
    for text in (PETER_VKEY, ENOCH_VKEY, SPEC_VKEY):
        assert vkey(*parse_vkey(text)) == text


def test_mangled_verifier_keys_are_rejected() -> None:
    """Every proper substring and every one-character change of a vkey fails, as in Go's TestNewVerifier."""
    b = PETER_VKEY.encode()
    mangled = {b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1) if (i, j) != (0, len(b))}
    mangled |= {b[:i] + bytes([b[i] + 1]) + b[i + 1 :] for i in range(len(b))}
    mangled |= {
        b"PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # key too long
        b"PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # unknown algorithm
    }
    for m in mangled:
        with pytest.raises(NoteError) as info:
            parse_vkey(m.decode())
            pytest.fail(f"accepted {m!r}")
        assert info.value.reason in (NoteErrorReason.BAD_KEY, NoteErrorReason.MALFORMED)


# -- signed notes: agreement with Go -------------------------------------------------------------------------


def test_signing_reproduces_the_go_note_byte_for_byte() -> None:
    # Ed25519 is deterministic, so the same seed and text must give Go's exact signature line.
    peter = _peter()
    assert sign_note(TEXT, PETER_NAME, peter.public_key, peter.sign) == PETER_NOTE


def test_go_signed_notes_verify() -> None:
    assert verify_note(PETER_NOTE, PETER_NAME, PETER_KEY) == TEXT
    assert verify_note(PETER_NOTE.encode(), PETER_NAME, PETER_KEY) == TEXT
    spec_name, spec_key = parse_vkey(SPEC_VKEY)
    assert verify_note(SPEC_NOTE, spec_name, spec_key) == "This is an example message.\n"


def test_a_cosigned_note_verifies_for_each_signer_and_ignores_the_other() -> None:
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert verify_note(note, PETER_NAME, PETER_KEY) == TEXT
    assert verify_note(note, ENOCH_NAME, ENOCH_KEY) == TEXT
    body, sigs = parse_note(note)
    assert body == TEXT
    assert [(s.name, s.key_hash.hex()) for s in sigs] == [
        ("PeterNeumann", "c74f20a3"),
        ("EnochRoot", "af0cfe78"),
    ]
    assert "".join(s.line() for s in sigs) == PETER_SIG + ENOCH_SIG


def test_duplicated_signatures_are_accepted_like_go() -> None:
    assert (
        verify_note(TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG, PETER_NAME, PETER_KEY)
        == TEXT
    )


def test_go_tree_note_body_is_a_checkpoint() -> None:
    cp = Checkpoint("go.sum database tree", 123456789012, leaf_hash(b"hello world"))
    assert cp.body() == GO_TREE_BODY
    assert Checkpoint.parse(GO_TREE_BODY) == cp


# -- signing and cosigning -----------------------------------------------------------------------------------


def test_checkpoint_sign_verify_parse() -> None:
    log = Identity.from_seed(b"\x07" * 32)
    cp = Checkpoint("carechain.example/log", 42, leaf_hash(b"x"), ("extension line",))
    note = sign_note(cp.body(), cp.origin, log.public_key, log.sign)
    assert Checkpoint.parse(verify_note(note, cp.origin, log.public_key)) == cp


def test_cosigners_append_signatures_and_each_verifies() -> None:
    peter, witness = _peter(), Identity.from_seed(b"\x01" * 32)
    cosigned = add_signature(PETER_NOTE, "witness.example/w1", witness.public_key, witness.sign)
    assert cosigned.startswith(PETER_NOTE)
    assert verify_note(cosigned, PETER_NAME, peter.public_key) == TEXT
    assert verify_note(cosigned, "witness.example/w1", witness.public_key) == TEXT
    with pytest.raises(NoteError) as info:
        add_signature(cosigned, "witness.example/w1", witness.public_key, witness.sign)
    assert info.value.reason is NoteErrorReason.DUPLICATE_SIGNATURE


def test_signing_with_a_mismatched_public_key_fails_at_once() -> None:
    peter, other = _peter(), Identity.from_seed(b"\x02" * 32)
    with pytest.raises(NoteError, match="public key") as info:
        sign_note(TEXT, PETER_NAME, other.public_key, peter.sign)
    assert info.value.reason is NoteErrorReason.BAD_KEY


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ("no final newline", "log"),
        ("bell \x07\n", "log"),
        ("text\n", "has space"),
        ("text\n", "has+plus"),
        ("text\n", ""),
    ],
)
def test_sign_note_rejects_what_verifiers_would_reject(body: str, name: str) -> None:
    peter = _peter()
    with pytest.raises(NoteError):
        sign_note(body, name, peter.public_key, peter.sign)


_note_text = st.text(
    st.characters(blacklist_categories=("Cs",), min_codepoint=0x20) | st.just("\n"), max_size=200
).map(lambda s: s + "\n")
_key_name = st.text(
    st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="+"), min_size=1
).filter(lambda s: not any(c.isspace() for c in s))


@settings(max_examples=100)
@given(_note_text, _key_name, st.binary(min_size=32, max_size=32))
def test_any_signed_text_verifies_and_any_change_to_it_fails(text: str, name: str, seed: bytes) -> None:
    ident = Identity.from_seed(seed)
    note = sign_note(text, name, ident.public_key, ident.sign)
    assert verify_note(note, name, ident.public_key) == text
    altered = "X" + note  # prepending keeps the note well formed but changes the signed text
    with pytest.raises(NoteError) as info:
        verify_note(altered, name, ident.public_key)
    assert info.value.reason is NoteErrorReason.BAD_SIGNATURE


# -- rejections, each with its own reason --------------------------------------------------------------------


def _reason(note: str | bytes, name: str = PETER_NAME, key: bytes = PETER_KEY) -> NoteErrorReason:
    with pytest.raises(NoteError) as info:
        verify_note(note, name, key)
    assert str(info.value)  # every rejection says what is wrong
    return info.value.reason


def test_rejections_have_distinct_reasons() -> None:
    sig = base64.b64decode(PETER_SIG.split()[-1])
    truncated_sig = TEXT + "\n" + NoteSignature(PETER_NAME, sig[:4], sig[4:-4]).line()
    reasons = {
        "wrong key": _reason(PETER_NOTE, ENOCH_NAME, ENOCH_KEY),
        "altered body": _reason(PETER_NOTE.replace("answer", "Answer")),
        "truncated signature": _reason(truncated_sig),
        "not UTF-8": _reason(b"\xff" + PETER_NOTE.encode()),
        "oversized": _reason("x" * MAX_NOTE_SIZE + "\n\n" + PETER_SIG),
        "malformed": _reason(TEXT + "\n" + PETER_SIG[:-10] + "\n"),
        "too many signatures": _reason(TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1)),
    }
    assert reasons == {
        "wrong key": NoteErrorReason.UNKNOWN_KEY,
        "altered body": NoteErrorReason.BAD_SIGNATURE,
        "truncated signature": NoteErrorReason.BAD_SIGNATURE_SIZE,
        "not UTF-8": NoteErrorReason.NOT_UTF8,
        "oversized": NoteErrorReason.TOO_LARGE,
        "malformed": NoteErrorReason.MALFORMED,
        "too many signatures": NoteErrorReason.TOO_MANY_SIGNATURES,
    }
    assert len(set(reasons.values())) == len(reasons)


def test_same_name_but_other_key_is_an_unknown_key_and_says_who_signed() -> None:
    other = Identity.from_seed(b"\x03" * 32)
    with pytest.raises(NoteError, match="signed by PeterNeumann\\+c74f20a3") as info:
        verify_note(PETER_NOTE, PETER_NAME, other.public_key)
    assert info.value.reason is NoteErrorReason.UNKNOWN_KEY


def test_a_bad_signature_from_the_key_is_rejected_even_beside_a_good_one() -> None:
    # Go's TestOpen inserts "ABCD" into the signature; for us that is also a wrong length.
    assert (
        _reason(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]) is NoteErrorReason.BAD_SIGNATURE_SIZE
    )
    sig = bytearray(base64.b64decode(PETER_SIG.split()[-1]))
    sig[10] ^= 1
    forged = NoteSignature(PETER_NAME, bytes(sig[:4]), bytes(sig[4:])).line()
    assert _reason(TEXT + "\n" + PETER_SIG + forged) is NoteErrorReason.BAD_SIGNATURE


def test_non_utf8_text_given_as_str_is_rejected() -> None:
    smuggled = b"\xff".decode("utf-8", "surrogateescape") + PETER_NOTE
    assert _reason(smuggled) is NoteErrorReason.NOT_UTF8


def test_exactly_max_size_is_accepted_by_the_parser() -> None:
    filler = "x" * (MAX_NOTE_SIZE - len(PETER_SIG.encode()) - 2) + "\n"
    note = filler + "\n" + PETER_SIG
    assert len(note.encode()) == MAX_NOTE_SIZE
    assert parse_note(note)[0] == filler
    assert _reason(note + "x") is NoteErrorReason.TOO_LARGE


@pytest.mark.parametrize(
    "note",
    [
        TEXT,  # no signatures (Go's TestOpen badMsgs, from here down to "unexpected line")
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + f"— Bad Name {PETER_B64}",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG.replace("—", "-"),  # ASCII hyphen instead of the em dash
        TEXT + "\n" + PETER_SIG.replace("PeterNeumann ", "PeterNeumann"),  # no space before the signature
        TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "Peter+Neumann"),
        TEXT + "\n" + PETER_SIG.replace("x08go", "x08g*"),  # not base64
        TEXT + "\n" + PETER_SIG.replace("AM=", "AN="),  # non-canonical base64 (same bytes, other text)
        TEXT + "\n" + "— PeterNeumann AAAA\n",  # too short for key ID and signature
        TEXT + "\r\n" + PETER_SIG,
        TEXT + "\n" + PETER_SIG + "\n",  # a trailing blank line makes the signatures part of nothing
    ],
)
def test_malformed_notes_are_rejected(note: str) -> None:
    assert _reason(note) is NoteErrorReason.MALFORMED


# -- checkpoint bodies ---------------------------------------------------------------------------------------


def test_spec_checkpoint_round_trips() -> None:
    cp = Checkpoint.parse(SPEC_CHECKPOINT)
    assert (cp.origin, cp.tree_size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.body() == SPEC_CHECKPOINT


_line = st.text(st.characters(blacklist_categories=("Cs",), min_codepoint=0x20), min_size=1, max_size=40)


@given(_line, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32), st.lists(_line, max_size=3))
def test_checkpoint_body_round_trips(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.parse(cp.body()) == cp


ROOT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (f"\n5\n{ROOT_B64}\n", "origin must not be empty"),
        (f"log\n05\n{ROOT_B64}\n", "leading zeros"),
        (f"log\n00\n{ROOT_B64}\n", "leading zeros"),
        (f"log\n+5\n{ROOT_B64}\n", "not a decimal"),
        (f"log\n-1\n{ROOT_B64}\n", "not a decimal"),
        (f"log\n 5\n{ROOT_B64}\n", "not a decimal"),
        (f"log\n٣\n{ROOT_B64}\n", "not a decimal"),
        (f"log\n{2**64}\n{ROOT_B64}\n", "2\\*\\*64-1"),
        (f"log\n{'9' * 5000}\n{ROOT_B64}\n", "not a decimal"),
        (f"log\n5\n{base64.b64encode(bytes(31)).decode()}\n", "32 bytes"),
        (f"log\n5\n{ROOT_B64[:-2]}\n", "not valid base64"),
        (f"log\n5\n{ROOT_B64[:-2]}B=\n", "not canonical"),
        (f"log\n5\n{ROOT_B64}", "end with a newline"),
        ("log\n5\n", "needs origin, tree size and root hash"),
        (f"log\n5\n{ROOT_B64}\n\n", "extension line 0 is empty"),
        (f"lo\rg\n5\n{ROOT_B64}\n", "control character"),
        (f"log\n5\n{ROOT_B64}\next\x00\n", "control character"),
    ],
)
def test_invalid_checkpoint_bodies_are_rejected(body: str, why: str) -> None:
    with pytest.raises(CheckpointError, match=why):
        Checkpoint.parse(body)


def test_checkpoint_fields_are_validated_on_construction() -> None:
    with pytest.raises(CheckpointError, match="32 bytes"):
        Checkpoint("log", 1, b"short")
    with pytest.raises(CheckpointError, match="tree size"):
        Checkpoint("log", -1, bytes(32))
    with pytest.raises(CheckpointError, match="control character"):
        Checkpoint("log\nforged line", 1, bytes(32))
