"""Event payload models (wire protocol v1): `{v, dev, seq, ts, kind, body}` and one body model per kind.

Bodies carry values in the units named by their field (SI or the clinical unit FHIR uses), so that a
reading means the same thing on every party without a lookup table.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from carechain.errors import ProtocolError, Reason

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

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


class Purchase(EventBody):
    item_code: str = Field(min_length=1, max_length=32)
    code_system: Literal["ndc", "rxnorm", "gtin"]
    rx_only: bool
    quantity: int = Field(ge=1, le=10_000)
    price_minor: int = Field(ge=0, le=10**12)  # integer minor units: no float money
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    patient_token: str = Field(min_length=1, max_length=64)
    payment_method: Literal["card", "cash", "insurance", "account"]
    rx_ref: str | None = Field(default=None, max_length=128)


BODY_MODELS: dict[str, type[EventBody]] = {
    "heart_rate": HeartRate,
    "temperature": Temperature,
    "blood_pressure": BloodPressure,
    "spo2": SpO2,
    "glucose": Glucose,
    "weight": Weight,
    "activity": Activity,
    "purchase": Purchase,
}
EventKind = Literal[
    "heart_rate", "temperature", "blood_pressure", "spo2", "glucose", "weight", "activity", "purchase"
]


class EventPayload(BaseModel):
    """The signed payload of a device event."""

    model_config = _strict
    v: int
    dev: str = Field(min_length=1, max_length=64, pattern=r"^[a-z2-7]+$")
    seq: int = Field(ge=0, le=2**63 - 1)
    ts: int = Field(ge=0, le=2**63 - 1)  # device time, ms since the Unix epoch
    kind: EventKind
    body: dict[str, Any]

    def parsed_body(self) -> EventBody:
        return BODY_MODELS[self.kind].model_validate(self.body)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump()


class PayloadError(ProtocolError):
    """A signed payload whose content cannot be accepted; `reason` (a `Reason`) is reported to the device."""


def make_payload(dev: str, seq: int, ts: int, kind: str, body: EventBody | dict[str, Any]) -> dict[str, Any]:
    """Build a validated wire payload; `body` may be a model or a plain dict."""
    body_model = body if isinstance(body, EventBody) else BODY_MODELS[kind].model_validate(body)
    if type(body_model) is not BODY_MODELS.get(kind):
        raise PayloadError(Reason.BAD_BODY, f"body model {type(body_model).__name__} does not match kind {kind!r}")
    body_dict = body_model.model_dump(exclude_none=True, exclude_defaults=True)
    return EventPayload.model_validate(
        {"v": PROTOCOL_VERSION, "dev": dev, "seq": seq, "ts": ts, "kind": kind, "body": body_dict}).to_wire()


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
    try:
        event.parsed_body()
    except ValidationError as exc:
        raise PayloadError(Reason.BAD_BODY, f"{event.kind}: {_first_error(exc)}") from None
    return event


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{loc}: {err['msg']}"
