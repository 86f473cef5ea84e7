"""Event payload models: `{v, dev, seq, ts, kind, body}` and one body model per kind.

Bodies carry values in the units named by their field (SI or the clinical unit FHIR uses), so that a
reading means the same thing on every party without a lookup table.

Protocol v2 (docs/protocol.md, "Protocol v2: sealed readings") seals the health readings (`SEALED_KINDS`): the
signed body of such a reading is only `SealedBody {epoch, ct}`, the hash of a ciphertext (carechain.sealed)
that carries the reading's body model; the models in `BODY_MODELS` are then used only by whoever holds the
data key (the agent before sealing, a requester after opening). v2 adds two clear kinds, `epoch_key` (the
epoch's data key encapsulated to its owner) and `weekly_activity` (a summary disclosed to a wellness policy).
v1 payloads are validated exactly as before.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from carechain import cbor
from carechain.errors import ProtocolError, Reason
from carechain.identity import Identity

PROTOCOL_VERSION = 1  # what v1 agents sign; v2 agents sign PROTOCOL_V2
PROTOCOL_V2 = 2
SUPPORTED_VERSIONS = frozenset({1, 2})
# Health readings: sealed under protocol v2. Purchases stay clear (the contracts read them; they carry
# pseudonymous patient tokens, not vitals).
SEALED_KINDS = frozenset({"heart_rate", "temperature", "blood_pressure", "spo2", "glucose", "weight", "activity",
                          "trial_measure"})
# Sealed kinds only protocol v2 carries: a v1 (plain-text) event of one is refused.
V2_ONLY_SEALED_KINDS = frozenset({"trial_measure"})
MAX_CAPSULE_BYTES = 256
MAX_KEY_CT_BYTES = 256
MIN_EPOCH_MS = 60_000  # one minute
MAX_EPOCH_MS = 86_400_000  # one day

_strict = ConfigDict(extra="forbid", frozen=True, strict=True)
Finite = Annotated[float, Field(allow_inf_nan=False)]
# When the device says it measured: its own clock, local time without a zone (GATT Date Time carries none).
LocalDateTime = Annotated[str, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$")]
# Status bits the device raised with a reading, as snake_case names (e.g. "cuff_too_loose").
StatusFlags = Annotated[list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]], Field(max_length=48)]


class EventBody(BaseModel):
    """The body of one event kind (a subclass per kind, in `BODY_MODELS`): strict, frozen, no extra keys."""

    model_config = _strict


class HeartRate(EventBody):
    bpm: int = Field(ge=20, le=300)
    sensor_contact: bool | None = None
    energy_kj: int | None = Field(default=None, ge=0, le=65535)
    rr_intervals_1024: list[Annotated[int, Field(ge=0, le=65535)]] = Field(default_factory=list, max_length=32)


class Temperature(EventBody):
    celsius: Finite = Field(ge=25.0, le=45.0)
    site: str | None = Field(default=None, max_length=32)
    measured_at: LocalDateTime | None = None


class BloodPressure(EventBody):
    systolic_mmhg: Finite = Field(ge=40, le=300)
    diastolic_mmhg: Finite = Field(ge=20, le=200)
    mean_mmhg: Finite | None = Field(default=None, ge=20, le=250)
    pulse_bpm: Finite | None = Field(default=None, ge=20, le=300)
    user_id: int | None = Field(default=None, ge=0, le=254)  # the cuff's user index (255, unknown, is omitted)
    status: StatusFlags = Field(default_factory=list)
    measured_at: LocalDateTime | None = None

    @model_validator(mode="after")
    def _systolic_above_diastolic(self) -> BloodPressure:
        if self.systolic_mmhg <= self.diastolic_mmhg:
            raise ValueError("systolic must exceed diastolic")
        return self


class SpO2(EventBody):
    spo2_pct: Finite = Field(ge=50, le=100)
    pulse_bpm: Finite | None = Field(default=None, ge=20, le=300)
    pulse_amplitude_index_pct: Finite | None = Field(default=None, ge=0, le=100)
    status: StatusFlags = Field(default_factory=list)
    measured_at: LocalDateTime | None = None


class Glucose(EventBody):
    mg_dl: Finite = Field(ge=10, le=1000)
    record_seq: int | None = Field(default=None, ge=0, le=65535)
    sample: str | None = Field(default=None, max_length=32)
    sample_location: str | None = Field(default=None, max_length=32)
    status: StatusFlags = Field(default_factory=list)
    measured_at: LocalDateTime | None = None


class Weight(EventBody):
    kg: Finite = Field(gt=0, le=650)
    bmi: Finite | None = Field(default=None, gt=0, le=200)
    height_m: Finite | None = Field(default=None, gt=0, le=3)
    user_id: int | None = Field(default=None, ge=0, le=254)  # the scale's user index (255, unknown, is omitted)
    measured_at: LocalDateTime | None = None


class Activity(EventBody):
    steps: int = Field(ge=0, le=200_000)
    active_minutes: int = Field(ge=0, le=1440)


class TrialMeasure(EventBody):
    """A trial participant's primary-outcome measure, derived on her device from its readings (docs/trials.md).

    Sealed like any reading, so nobody learns it before the trial's database lock (values could leak arms);
    she discloses the ciphertext and its epoch key in `trial.outcome` after the lock. Integers in the unit
    1/`unit_scale` of the measure's natural unit (e.g. unit_scale 1000 and resting heart rate: milli-bpm).
    """

    trial_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    measure: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    baseline: int = Field(ge=-(2**53), le=2**53)
    followup: int = Field(ge=-(2**53), le=2**53)
    unit_scale: int = Field(ge=1, le=10**9)


class PaymentAuthorization(EventBody):
    """The patient's consent to one sale line: `pay_minor` tokens from her account and `claim_minor` from her
    insurer's, both to the pharmacy. `sig` is her wallet key's signature over `payment_message(...)`, which
    binds the terminal, the item, quantity, price, both amounts, the policy and `nonce` (each nonce once)."""

    patient: str = Field(pattern=r"^[a-z2-7]{16}$")  # her party id: her account is "patient:<id>"
    pay_minor: int = Field(ge=0, le=10**12)
    claim_minor: int = Field(ge=0, le=10**12)
    nonce: int = Field(ge=0, le=2**63 - 1)
    sig: bytes = Field(min_length=64, max_length=64)


class Purchase(EventBody):
    item_code: str = Field(min_length=1, max_length=32)
    # "trialkit": a clinical trial's kit, item_code its public label (contract_rules.trials, trial.dispense).
    code_system: Literal["ndc", "rxnorm", "gtin", "trialkit"]
    rx_only: bool
    quantity: int = Field(ge=1, le=10_000)
    price_minor: int = Field(ge=0, le=10**12)  # integer minor units: no float money
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    patient_token: str = Field(min_length=1, max_length=64)
    # "token" and "insurance" move tokens on the ledger and need the patient's `payment`; the rest settle off it.
    payment_method: Literal["card", "cash", "insurance", "account", "token"]
    rx_ref: str | None = Field(default=None, max_length=128)
    payment: PaymentAuthorization | None = None


PAYMENT_DOMAIN = b"carechain/payment/v1\x00"


def payment_message(terminal: str, item: str, quantity: int, price_minor: int, pay_minor: int, claim_minor: int,
                    policy_id: str, nonce: int) -> bytes:
    """What a patient's wallet signs to authorize a payment: the domain tag, then the terms as CBOR.

    `terminal` is the terminal's device id, `item` "system:code", `policy_id` the id of the policy the claim
    is billed to ("" when `claim_minor` is 0).
    """
    return PAYMENT_DOMAIN + cbor.encode([terminal, item, quantity, price_minor, pay_minor, claim_minor, policy_id,
                                         nonce])


def authorize_payment(wallet: Identity, terminal: str, item: str, quantity: int, price_minor: int, *,
                      pay_minor: int, claim_minor: int = 0, policy_id: str = "", nonce: int) -> PaymentAuthorization:
    """Sign a payment with the patient's wallet key (her party key): what a terminal puts on the sale."""
    message = payment_message(terminal, item, quantity, price_minor, pay_minor, claim_minor, policy_id, nonce)
    return PaymentAuthorization(patient=wallet.device_id, pay_minor=pay_minor, claim_minor=claim_minor, nonce=nonce,
                                sig=wallet.sign(message))


BODY_MODELS: dict[str, type[EventBody]] = {
    "heart_rate": HeartRate,
    "temperature": Temperature,
    "blood_pressure": BloodPressure,
    "spo2": SpO2,
    "glucose": Glucose,
    "weight": Weight,
    "activity": Activity,
    "purchase": Purchase,
    "trial_measure": TrialMeasure,
}


class SealedBody(EventBody):
    """The signed body of a v2 health reading: its epoch and the hash of its ciphertext (`sealed.ciphertext_hash`)."""

    epoch: int = Field(ge=0, le=2**63 - 1)
    ct: bytes = Field(min_length=32, max_length=32)


class EpochKey(EventBody):
    """The data key of one (device, epoch), encapsulated to the device's owner (`reencryption.encapsulate`).

    Sent once per epoch before its readings; the rules keep it as the `epochs` record miners re-encrypt.
    """

    epoch: int = Field(ge=0, le=2**63 - 1)
    epoch_ms: int = Field(ge=MIN_EPOCH_MS, le=MAX_EPOCH_MS)
    owner: str = Field(pattern=r"^[a-z2-7]{16}$")  # the owner's party id (`Identity.device_id` of her key)
    capsule: bytes = Field(min_length=1, max_length=MAX_CAPSULE_BYTES)
    key_ct: bytes = Field(min_length=1, max_length=MAX_KEY_CT_BYTES)


class WeeklyActivity(EventBody):
    """Active minutes of one ISO week, disclosed in clear to one wellness policy with the patient's consent."""

    week: str = Field(pattern=r"^[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])$")
    active_minutes: int = Field(ge=0, le=7 * 1440)
    policy: str = Field(min_length=1, max_length=64)


# Kinds only v2 carries, in clear.
V2_CLEAR_MODELS: dict[str, type[EventBody]] = {"epoch_key": EpochKey, "weekly_activity": WeeklyActivity}
EventKind = Literal[
    "heart_rate", "temperature", "blood_pressure", "spo2", "glucose", "weight", "activity", "purchase",
    "epoch_key", "weekly_activity", "trial_measure",
]


def signed_body_model(v: int, kind: str) -> type[EventBody] | None:
    """The model of the body a device signs for `kind` under protocol `v`; None when `v` cannot carry `kind`."""
    if v == PROTOCOL_V2:
        if kind in SEALED_KINDS:
            return SealedBody
        return V2_CLEAR_MODELS.get(kind) or BODY_MODELS.get(kind)
    if v == PROTOCOL_VERSION:
        return None if kind in V2_ONLY_SEALED_KINDS else BODY_MODELS.get(kind)
    return None


class EventPayload(BaseModel):
    """The signed payload of a device event."""

    model_config = _strict
    v: int
    dev: str = Field(min_length=1, max_length=64, pattern=r"^[a-z2-7]+$")
    seq: int = Field(ge=0, le=2**63 - 1)
    ts: int = Field(ge=0, le=2**63 - 1)  # device time, ms since the Unix epoch
    kind: EventKind
    body: dict[str, Any]

    @property
    def sealed(self) -> bool:
        """Whether the body is a `SealedBody` (a v2 health reading) rather than the reading itself."""
        return self.v == PROTOCOL_V2 and self.kind in SEALED_KINDS

    def parsed_body(self) -> EventBody:
        """The signed body as its model: the reading (v1, clear kinds) or a `SealedBody` (v2 readings)."""
        model = signed_body_model(self.v, self.kind)
        if model is None:
            raise PayloadError(Reason.BAD_BODY, f"kind {self.kind!r} is not carried by protocol version {self.v}")
        return model.model_validate(self.body)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump()


class PayloadError(ProtocolError):
    """A signed payload whose content cannot be accepted; `reason` (a `Reason`) is reported to the device."""


def make_payload(dev: str, seq: int, ts: int, kind: str, body: EventBody | dict[str, Any], *,
                 v: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """Build a validated wire payload of a clear kind; `body` may be a model or a plain dict.

    Under v2 a health reading is not clear: seal its body (`sealed.seal_body`) and use `make_sealed_payload`.
    """
    model = signed_body_model(v, kind)
    if v == PROTOCOL_V2 and kind in SEALED_KINDS:
        raise PayloadError(Reason.BAD_BODY, f"{kind} is sealed under protocol 2: use make_sealed_payload")
    if model is None:
        raise PayloadError(Reason.BAD_BODY, f"kind {kind!r} is not carried by protocol version {v}")
    body_model = body if isinstance(body, EventBody) else model.model_validate(body)
    if type(body_model) is not model:
        raise PayloadError(Reason.BAD_BODY, f"body model {type(body_model).__name__} does not match kind {kind!r}")
    body_dict = body_model.model_dump(exclude_none=True, exclude_defaults=True)
    return EventPayload.model_validate(
        {"v": v, "dev": dev, "seq": seq, "ts": ts, "kind": kind, "body": body_dict}).to_wire()


def make_sealed_payload(dev: str, seq: int, ts: int, kind: str, epoch: int, ct_hash: bytes) -> dict[str, Any]:
    """The v2 payload of a sealed health reading: its epoch and the hash of its ciphertext."""
    if kind not in SEALED_KINDS:
        raise PayloadError(Reason.BAD_BODY, f"{kind!r} is not a sealed kind ({', '.join(sorted(SEALED_KINDS))})")
    body = SealedBody(epoch=epoch, ct=ct_hash).model_dump()
    return EventPayload.model_validate(
        {"v": PROTOCOL_V2, "dev": dev, "seq": seq, "ts": ts, "kind": kind, "body": body}).to_wire()


def validate_payload(raw: Any) -> EventPayload:
    """Validate a decoded payload from the wire, mapping failures to stable reason codes."""
    if not isinstance(raw, dict):
        raise PayloadError(Reason.BAD_PAYLOAD, "payload must be a CBOR map")
    v = raw.get("v")
    # type() first: `[1] in frozenset` raises TypeError, and True and 1.0 would pass as version 1.
    if type(v) is not int or v not in SUPPORTED_VERSIONS:
        raise PayloadError(Reason.UNSUPPORTED_VERSION, f"protocol version {v!r:.40} is not supported")
    try:
        event = EventPayload.model_validate(raw)
    except ValidationError as exc:
        raise PayloadError(Reason.BAD_PAYLOAD, _first_error(exc)) from None
    if v == PROTOCOL_VERSION and (event.kind in V2_CLEAR_MODELS or event.kind in V2_ONLY_SEALED_KINDS):
        # Refused as v1 always refused a kind it does not know (the payload's `kind` is out of range).
        raise PayloadError(Reason.BAD_PAYLOAD, f"kind: {event.kind!r} needs protocol version {PROTOCOL_V2}")
    try:
        event.parsed_body()
    except ValidationError as exc:
        raise PayloadError(Reason.BAD_BODY, f"{event.kind}: {_first_error(exc)}") from None
    return event


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{loc}: {err['msg']}"
