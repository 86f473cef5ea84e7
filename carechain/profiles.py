"""Device profiles: what one device *type* speaks — GATT services, parsers, units, sampling, FHIR codes.

A profile is data in `device_profiles/<name>.yaml`; this module is its schema and its one loader. A
profile name is a label for a device type, never an identity (that is the device's key).

Errors name the file, the line and the field (`heart_rate_band.yaml:14: gatt.service: ...`), so whoever
edits a profile can fix it without reading this code. The small YAML-with-line-numbers reader used for
that (`read_yaml`, `YamlDocument`, `YamlFileError`) is shared with `carechain.inventory`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from carechain.events import BODY_MODELS

PROFILES_DIR_ENV = "CARECHAIN_PROFILES_DIR"
PROFILES_PACKAGE = "device_profiles"  # the YAML profiles, shipped as package data
SIG_BASE_UUID = "0000{:04x}-0000-1000-8000-00805f9b34fb"

Loc = tuple[str | int, ...]

# -- YAML with line numbers ---------------------------------------------------------------------------


class YamlFileError(ValueError):
    """A problem in a user-edited YAML file: `{file}:{line}: {what}`, one line per problem."""

    def __init__(
        self, path: Path | str, line: int | None, what: str, *, more: Sequence[tuple[int | None, str]] = ()
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.what = what
        self.problems: list[tuple[int | None, str]] = [(line, what), *more]
        super().__init__("\n".join(f"{_where(self.path, ln)}: {w}" for ln, w in self.problems))


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file that remembers the line of every value, for errors a user can act on."""

    path: Path
    data: Any
    root: yaml.Node

    def line_of(self, loc: Iterable[str | int]) -> int:
        """1-based line of the value at `loc` (mapping keys and list indexes), or of its deepest ancestor.

        Parts that do not name a child (e.g. pydantic's union tags) are skipped, so any validation
        error location maps to the most precise line that exists.
        """
        node, line = self.root, self.root.start_mark.line + 1
        for part in loc:
            found = _child(node, part)
            if found is not None:
                line, node = found
        return line


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line + 1, value  # the line of `key:` reads best in a message
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item
    return None


def read_yaml(path: Path | str, error: type[YamlFileError] = YamlFileError) -> YamlDocument:
    """Read one YAML document with the safe loader, keeping line numbers; raise `error` naming the line.

    Duplicate mapping keys are refused: PyYAML silently keeps the last one, which hides typos.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, None, f"cannot read the file: {exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise error(path, mark.line + 1 if mark else None, f"not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise error(path, None, f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if root is None:
        raise error(path, None, "the file is empty")
    duplicate = _first_duplicate_key(root)
    if duplicate is not None:
        key, first, again = duplicate
        raise error(path, again, f"key {key!r} appears twice (first on line {first}); keep one")
    return YamlDocument(path, data, root)


def _first_duplicate_key(root: yaml.Node) -> tuple[str, int, int] | None:
    seen_nodes: set[int] = set()  # aliases share nodes (and may be recursive): visit each once
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in keys:
                        return key.value, keys[key.value], line
                    keys[key.value] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def describe_validation_error(exc: ValidationError) -> list[tuple[Loc, str]]:
    """Each pydantic error as (location, readable message), e.g. (("gatt", "service"), "...")."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        kind, value = err["type"], err.get("input")
        if kind == "missing":
            msg = "required field is missing"
        elif kind == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation)"
        elif kind.endswith("_type") and not isinstance(value, dict | list):
            msg = f"{msg}, got {value!r}" + (" (quote it)" if kind == "string_type" else "")
        elif kind == "literal_error":
            msg = f"{msg}, got {value!r}"
        problems.append((loc, msg))
    return problems


def format_loc(loc: Loc) -> str:
    """`("gatt", "characteristics", 0, "uuid")` → `gatt.characteristics[0].uuid`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- schema -------------------------------------------------------------------------------------------

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_IDENT_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_LOINC_RE = re.compile(r"^(\d{1,7})-(\d)$")
_NDC_RE = re.compile(r"^\d{4,5}-\d{3,4}-\d{1,2}$")


def _uuid_not_a_number(value: Any) -> Any:
    # YAML reads an unquoted 0x180D as the integer 6157; say what to write instead of "not a string".
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        raise ValueError(
            f"0x{value:04X} is a 16-bit UUID; write it in full, as {SIG_BASE_UUID.format(value)}"
        )
    return value


def _uuid128(value: str) -> str:
    if not _UUID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a full 128-bit UUID in lowercase; a 16-bit SIG UUID such as 0x180D is "
            f"written {SIG_BASE_UUID.format(0x180D)}"
        )
    return value


def _identifier(value: str) -> str:
    if not _IDENT_RE.match(value):
        raise ValueError(f"{value!r} must be lower_snake_case (a-z, 0-9, _), starting with a letter")
    return value


def _loinc(value: str) -> str:
    match = _LOINC_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a LOINC code (digits, a hyphen and a check digit, e.g. '8867-4')")
    if _loinc_check_digit(match.group(1)) != int(match.group(2)):
        raise ValueError(f"LOINC code {value!r} has a wrong check digit; look the code up again")
    return value


def _loinc_check_digit(digits: str) -> int:
    # LOINC uses the mod-10 (Luhn) scheme: double every second digit from the right, starting with the last.
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return (10 - total % 10) % 10


def bluetooth_uuid(short: int) -> str:
    """The full 128-bit form of a 16-bit Bluetooth SIG UUID, as profiles write it (0x180D → 0000180d-…)."""
    return SIG_BASE_UUID.format(short)


Uuid128 = Annotated[str, BeforeValidator(_uuid_not_a_number), AfterValidator(_uuid128)]
Identifier = Annotated[str, AfterValidator(_identifier)]
LoincCode = Annotated[str, AfterValidator(_loinc)]
Text = Annotated[str, Field(min_length=1, max_length=200)]
PositiveSeconds = Annotated[float, Field(gt=0, le=86_400 * 7, allow_inf_nan=False)]
Range = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=2)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Characteristic(_Model):
    """One GATT characteristic the agent subscribes to or reads, and the parser for its bytes."""

    uuid: Uuid128
    name: Text
    parser: Identifier  # a GATT parser in edge_agent, by name
    mode: Literal["notify", "indicate", "read"]
    event: str | None = None  # the event kind its readings become; None for device status (battery, …)
    service: Uuid128 | None = None  # the service holding it, when not the profile's primary service


class Gatt(_Model):
    service: Uuid128  # primary service: what a scan matches a device of this type on
    also_read: list[Uuid128] = []  # status services (battery, device information) read on connect
    characteristics: list[Characteristic] = Field(min_length=1)

    def service_of(self, characteristic: Characteristic) -> str:
        return characteristic.service or self.service


class FhirComponent(_Model):
    code: LoincCode
    display: Text
    value: str  # the body field holding this component's value


class FhirObservation(_Model):
    """How one event kind maps to a FHIR Observation (LOINC code, value field or components)."""

    event: str
    category: Literal["vital-signs", "activity", "laboratory"]
    code: LoincCode
    also_codes: list[LoincCode] = []  # extra codings FHIR profiles require (e.g. SpO2's 2708-6)
    display: Text
    value: str | None = None  # the body field giving valueQuantity; None for a panel of components
    components: list[FhirComponent] = []


class Signal(_Model):
    """A simulated quantity: a mean-reverting random walk around a per-device baseline."""

    baseline: Range  # each simulated device draws its own baseline from [low, high]
    limits: Range  # values never leave [low, high]
    step: float = Field(ge=0, allow_inf_nan=False)  # standard deviation of one step
    spread: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # max distance from the baseline
    reversion: float = Field(default=0.1, ge=0, le=1)  # share of the gap to the baseline closed per step

    @model_validator(mode="after")
    def _ordered(self) -> Signal:
        (b_lo, b_hi), (lo, hi) = self.baseline, self.limits
        problems: list[tuple[Loc, str]] = []
        if lo > hi:
            problems.append((("limits",), f"low {lo} is above high {hi}"))
        if b_lo > b_hi:
            problems.append((("baseline",), f"low {b_lo} is above high {b_hi}"))
        elif not (lo <= b_lo and b_hi <= hi):
            problems.append((("baseline",), f"[{b_lo}, {b_hi}] must lie within limits [{lo}, {hi}]"))
        _raise_if(problems, self)
        return self


class HeartRateSim(_Model):
    bpm: Signal


class TemperatureSim(_Model):
    celsius: Signal
    site: Annotated[str, Field(min_length=1, max_length=32)] | None = None


class BloodPressureSim(_Model):
    systolic_mmhg: Signal
    diastolic_mmhg: Signal
    pulse_bpm: Signal | None = None
    min_pulse_pressure_mmhg: float = Field(default=25, ge=1, le=100)  # systolic minus diastolic, at least

    @model_validator(mode="after")
    def _systolic_above_diastolic(self) -> BloodPressureSim:
        if self.systolic_mmhg.limits[0] <= self.diastolic_mmhg.limits[1]:
            raise ValueError("systolic_mmhg.limits must start above the end of diastolic_mmhg.limits")
        return self


class SpO2Sim(_Model):
    spo2_pct: Signal
    pulse_bpm: Signal | None = None


class GlucoseSim(_Model):
    mg_dl: Signal
    sample: Annotated[str, Field(min_length=1, max_length=32)] | None = None


class WeightSim(_Model):
    kg: Signal
    height_m: Range | None = None  # each simulated person's height is drawn from here, for BMI


class ActivitySim(_Model):
    steps_per_min: Signal  # cadence; steps and active minutes accumulate over the (UTC) day
    active_above_steps_per_min: float = Field(default=60, gt=0)


class CatalogueItem(_Model):
    code: Annotated[str, Field(min_length=1, max_length=32)]
    code_system: Literal["ndc", "rxnorm", "gtin"] = "ndc"
    description: Text
    rx_only: bool
    immunization: bool = False  # billed to the insurer by the insurance contract
    cvx: str | None = None  # CDC vaccine code, for immunizations
    price_minor: int = Field(ge=0, le=10**9)  # per package, integer minor units: no float money
    max_quantity: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="after")
    def _ndc_shape(self) -> CatalogueItem:
        if self.code_system == "ndc" and not _NDC_RE.match(self.code):
            raise ValueError(f"NDC {self.code!r} must be written with hyphens, e.g. 4-4-2, 5-3-2 or 5-4-1")
        return self


class PurchaseSim(_Model):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    patients: int = Field(ge=1, le=100_000)  # size of the pool of simulated patient tokens
    catalogue: list[CatalogueItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_codes(self) -> PurchaseSim:
        first: dict[str, int] = {}
        problems: list[tuple[Loc, str]] = []
        for i, item in enumerate(self.catalogue):
            if item.code in first:
                problems.append(
                    (("catalogue", i, "code"), f"{item.code} is already catalogue[{first[item.code]}]")
                )
            first.setdefault(item.code, i)
        _raise_if(problems, self)
        return self


class Simulate(_Model):
    """Per event kind, how `edge_agent.sources.simulated` makes plausible readings."""

    heart_rate: HeartRateSim | None = None
    temperature: TemperatureSim | None = None
    blood_pressure: BloodPressureSim | None = None
    spo2: SpO2Sim | None = None
    glucose: GlucoseSim | None = None
    weight: WeightSim | None = None
    activity: ActivitySim | None = None
    purchase: PurchaseSim | None = None

    def kinds(self) -> list[str]:
        return [kind for kind in type(self).model_fields if getattr(self, kind) is not None]


class Sampling(_Model):
    interval_s: PositiveSeconds  # nominal time between events of one kind
    event_interval_s: dict[str, PositiveSeconds] = {}  # per event kind, where it differs
    simulate: Simulate | None = None


class DeviceProfile(_Model):
    """A device type, mirroring `device_profiles/<name>.yaml`; each field's comment says what it means."""

    name: Identifier
    description: Annotated[str, Field(min_length=1, max_length=1000)]
    transport: Literal["ble", "network"]
    events: list[str] = Field(min_length=1)
    gatt: Gatt | None = None
    units: dict[str, dict[str, Annotated[str, Field(min_length=1, max_length=32)]]] = {}  # UCUM codes
    sampling: Sampling
    fhir: list[FhirObservation] = []

    def interval_s(self, kind: str) -> float:
        """Nominal seconds between two events of `kind`."""
        return self.sampling.event_interval_s.get(kind, self.sampling.interval_s)

    def unit(self, kind: str, field: str) -> str | None:
        """The UCUM unit of a body field, if the profile names one."""
        return self.units.get(kind, {}).get(field)

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        _raise_if(_consistency_problems(self), self)
        return self


def _consistency_problems(p: DeviceProfile) -> list[tuple[Loc, str]]:
    """Cross-field rules, each reported at the field that breaks it."""
    problems: list[tuple[Loc, str]] = []
    known = sorted(BODY_MODELS)
    events = set(p.events) & set(BODY_MODELS)  # an unknown kind is reported once, under events

    def check_kind(loc: Loc, kind: str | None) -> bool:
        if kind is None or kind in events:
            return True
        if kind in BODY_MODELS:
            problems.append((loc, f"event {kind!r} is not in this profile's events {p.events}; add it there"))
        else:
            problems.append((loc, f"unknown event kind {kind!r}; known kinds: {', '.join(known)}"))
        return False

    def check_field(loc: Loc, kind: str, field: str) -> bool:
        if field in BODY_MODELS[kind].model_fields:
            return True
        fields = ", ".join(BODY_MODELS[kind].model_fields)
        problems.append((loc, f"{kind} events have no field {field!r}; their fields are: {fields}"))
        return False

    seen: set[str] = set()
    for i, kind in enumerate(p.events):
        if kind not in BODY_MODELS:
            problems.append((("events", i), f"unknown event kind {kind!r}; known kinds: {', '.join(known)}"))
        elif kind in seen:
            problems.append((("events", i), f"event {kind!r} is listed twice"))
        seen.add(kind)

    if p.transport == "ble" and p.gatt is None:
        problems.append((("transport",), "a BLE profile needs a `gatt:` section (service, characteristics)"))
    if p.transport != "ble" and p.gatt is not None:
        problems.append((("gatt",), f"transport {p.transport!r} has no GATT; remove `gatt:` or use ble"))
    if p.gatt is not None:
        produced: set[str] = set()
        where: dict[tuple[str, str], int] = {}
        for i, ch in enumerate(p.gatt.characteristics):
            loc: Loc = ("gatt", "characteristics", i)
            if check_kind((*loc, "event"), ch.event) and ch.event is not None:
                produced.add(ch.event)
            key = (p.gatt.service_of(ch), ch.uuid)
            if key in where:
                problems.append(((*loc, "uuid"), f"{ch.uuid} is already characteristics[{where[key]}]"))
            where.setdefault(key, i)
        if p.transport == "ble":
            for i, kind in enumerate(p.events):
                if kind in BODY_MODELS and kind not in produced:
                    problems.append((("events", i), f"no characteristic under gatt produces {kind!r} events"))

    for kind, fields in p.units.items():
        if check_kind(("units", kind), kind):
            for field in fields:
                check_field(("units", kind, field), kind, field)

    for i, obs in enumerate(p.fhir):
        loc = ("fhir", i)
        if not check_kind((*loc, "event"), obs.event):
            continue
        if obs.value is None and not obs.components:
            problems.append((loc, "give `value:` (a body field) or `components:`, or both"))
        refs: list[tuple[Loc, str]] = [((*loc, "value"), obs.value)] if obs.value is not None else []
        refs += [((*loc, "components", j, "value"), c.value) for j, c in enumerate(obs.components)]
        for ref_loc, field in refs:
            if check_field(ref_loc, obs.event, field) and p.unit(obs.event, field) is None:
                problems.append((ref_loc, f"field {field!r} has no unit; add it under units.{obs.event}"))

    for kind in p.sampling.event_interval_s:
        check_kind(("sampling", "event_interval_s", kind), kind)
    if p.sampling.simulate is not None:
        for kind in p.sampling.simulate.kinds():
            check_kind(("sampling", "simulate", kind), kind)
    return problems


def _raise_if(problems: list[tuple[Loc, str]], model: BaseModel) -> None:
    # A ValidationError raised inside a validator keeps each problem's own location (pydantic prefixes
    # the enclosing path), so a cross-field error still points at the line that breaks the rule.
    if problems:
        raise ValidationError.from_exception_data(
            type(model).__name__,
            [
                InitErrorDetails(type=PydanticCustomError("profile", msg), loc=loc, input=None)
                for loc, msg in problems
            ],
        )


# -- loading ------------------------------------------------------------------------------------------


class ProfileError(YamlFileError):
    """A device profile file is missing, malformed or inconsistent; names the file, line and field."""

    def __init__(
        self,
        path: Path | str,
        line: int | None,
        what: str,
        *,
        field: str | None = None,
        more: Sequence[tuple[int | None, str]] = (),
    ) -> None:
        self.field = field
        super().__init__(path, line, f"{field}: {what}" if field else what, more=more)


def default_profiles_dir() -> Path:
    """Where device profiles are read from when no folder is given, in this order:

    1. `$CARECHAIN_PROFILES_DIR`, if set (a folder of `*.yaml` profiles);
    2. the profiles installed with carechain: the `device_profiles` package's data, which is the repository's
       `device_profiles/` folder in a checkout or an editable install, and a copy in site-packages after
       `pip install .`.

    An explicit folder (`load_profiles(path)`, `carechain register --profiles-dir`) comes before both.
    """
    override = os.environ.get(PROFILES_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return installed_profiles_dir()


def installed_profiles_dir() -> Path:
    """The folder of the profiles shipped as package data with carechain (the `device_profiles` package)."""
    hint = f"reinstall carechain, or set {PROFILES_DIR_ENV} to a folder of *.yaml profiles"
    try:
        shipped = resources.files(PROFILES_PACKAGE)
    except ModuleNotFoundError:
        raise ProfileError(PROFILES_PACKAGE, None, f"the {PROFILES_PACKAGE} package is not installed; {hint}") from None
    if not isinstance(shipped, Path):  # e.g. a zipped install: profiles are read as files, with line numbers
        raise ProfileError(str(shipped), None, f"the shipped profiles are not a folder on disk; {hint}")
    return shipped


def load_profile(path: Path | str) -> DeviceProfile:
    """Load and validate one profile; its `name` must equal the file's stem."""
    path = Path(path)
    doc = read_yaml(path, ProfileError)
    if not isinstance(doc.data, dict):
        raise ProfileError(path, doc.line_of(()), "a profile must be a YAML mapping (name:, transport:, …)")
    try:
        profile = DeviceProfile.model_validate(doc.data)
    except ValidationError as exc:
        located = sorted(
            ((doc.line_of(loc), format_loc(loc), msg) for loc, msg in describe_validation_error(exc)),
            key=lambda p: p[0],
        )
        (line, field, what), *rest = located
        more = [(ln, f"{f}: {w}" if f else w) for ln, f, w in rest]
        raise ProfileError(path, line, what, field=field or None, more=more) from None
    if profile.name != path.stem:
        raise ProfileError(
            path,
            doc.line_of(("name",)),
            f"{profile.name!r} must equal the file name {path.stem!r}; rename one of them",
            field="name",
        )
    return profile


def load_profiles(directory: Path | str | None = None) -> dict[str, DeviceProfile]:
    """Every `*.yaml` profile in `directory` (default: `default_profiles_dir()`, which says the order), by name."""
    directory = Path(directory) if directory is not None else default_profiles_dir()
    if not directory.is_dir():
        hint = f"set {PROFILES_DIR_ENV} to a folder of *.yaml profiles"
        raise ProfileError(directory, None, f"no profiles directory here; {hint}")
    profiles = {}
    for path in sorted(directory.glob("*.yaml")):
        profile = load_profile(path)
        profiles[profile.name] = profile
    if not profiles:
        raise ProfileError(directory, None, "no *.yaml device profiles in this directory")
    return profiles
