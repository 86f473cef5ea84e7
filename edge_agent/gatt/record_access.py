"""Record Access Control Point (0x2A52) as the Glucose Service uses it: requests a collector writes, and
the responses a meter indicates back.

Every value is Op Code (uint8), Operator (uint8), Operand (variable):

| op code | meaning                          | operator                   | operand                        |
|---------|----------------------------------|----------------------------|--------------------------------|
| 1       | Report stored records            | all/first/last, ≤, ≥, range | filter type + value(s), if ≤ ≥ range |
| 2       | Delete stored records            | same                       | same                           |
| 3       | Abort operation                  | null (0)                   | none                           |
| 4       | Report number of stored records  | same as 1                  | same                           |
| 5       | Number of stored records response | null                      | uint16 count                   |
| 6       | Response code                    | null                       | request op code, response code |

Filter types: 1 sequence number (uint16 values), 2 user facing time (Date Time values). The parser checks
the layout only; whether a meter supports an operator is its business (it answers with a response code),
so a request with, say, the null operator for op code 1 parses and a peripheral can refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from edge_agent.gatt._codec import Reader, Writer, enum_or_int
from edge_agent.gatt.date_time import DateTime

CHARACTERISTIC = "Record Access Control Point"
UUID = 0x2A52


class RacpOpCode(IntEnum):
    REPORT_STORED_RECORDS = 1
    DELETE_STORED_RECORDS = 2
    ABORT_OPERATION = 3
    REPORT_NUMBER_OF_STORED_RECORDS = 4
    NUMBER_OF_STORED_RECORDS_RESPONSE = 5
    RESPONSE_CODE = 6


class RacpOperator(IntEnum):
    NULL = 0
    ALL_RECORDS = 1
    LESS_THAN_OR_EQUAL_TO = 2
    GREATER_THAN_OR_EQUAL_TO = 3
    WITHIN_RANGE_OF = 4  # inclusive
    FIRST_RECORD = 5  # the oldest
    LAST_RECORD = 6  # the most recent


class RacpFilterType(IntEnum):
    SEQUENCE_NUMBER = 1
    USER_FACING_TIME = 2


class RacpResponseCode(IntEnum):
    SUCCESS = 1
    OP_CODE_NOT_SUPPORTED = 2
    INVALID_OPERATOR = 3
    OPERATOR_NOT_SUPPORTED = 4
    INVALID_OPERAND = 5
    NO_RECORDS_FOUND = 6
    ABORT_UNSUCCESSFUL = 7
    PROCEDURE_NOT_COMPLETED = 8
    OPERAND_NOT_SUPPORTED = 9


_REQUESTS = (
    RacpOpCode.REPORT_STORED_RECORDS,
    RacpOpCode.DELETE_STORED_RECORDS,
    RacpOpCode.ABORT_OPERATION,
    RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS,
)
_FILTERED = (
    RacpOperator.LESS_THAN_OR_EQUAL_TO,
    RacpOperator.GREATER_THAN_OR_EQUAL_TO,
    RacpOperator.WITHIN_RANGE_OF,
)

FilterValue = int | DateTime
"""A sequence number (uint16) or a user facing time, per the request's filter type."""


@dataclass(frozen=True, kw_only=True)
class RacpRequest:
    """A request written by the collector. `minimum` is the bound of ≥ and the start of a range,
    `maximum` the bound of ≤ and the end of a range; both None for the other operators."""

    op_code: RacpOpCode
    operator: RacpOperator = RacpOperator.NULL
    filter_type: RacpFilterType | None = None
    minimum: FilterValue | None = None
    maximum: FilterValue | None = None


@dataclass(frozen=True, kw_only=True)
class RacpNumberOfRecords:
    """Number of Stored Records Response (op code 5)."""

    count: int


@dataclass(frozen=True, kw_only=True)
class RacpResponse:
    """Response Code (op code 6): the request it answers and how it went (unknown codes stay ints)."""

    request_op_code: RacpOpCode | int
    response_code: RacpResponseCode | int


RacpMessage = RacpRequest | RacpNumberOfRecords | RacpResponse


def racp_report_stored_records(from_sequence_number: int | None = None) -> RacpRequest:
    """Report all stored records, or those with sequence number ≥ `from_sequence_number`."""
    return _request(RacpOpCode.REPORT_STORED_RECORDS, from_sequence_number)


def racp_report_number_of_stored_records(from_sequence_number: int | None = None) -> RacpRequest:
    """Count all stored records, or those with sequence number ≥ `from_sequence_number`."""
    return _request(RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS, from_sequence_number)


def racp_abort_operation() -> RacpRequest:
    """Abort the procedure in progress."""
    return RacpRequest(op_code=RacpOpCode.ABORT_OPERATION)


def _request(op_code: RacpOpCode, from_sequence_number: int | None) -> RacpRequest:
    if from_sequence_number is None:
        return RacpRequest(op_code=op_code, operator=RacpOperator.ALL_RECORDS)
    return RacpRequest(
        op_code=op_code,
        operator=RacpOperator.GREATER_THAN_OR_EQUAL_TO,
        filter_type=RacpFilterType.SEQUENCE_NUMBER,
        minimum=from_sequence_number,
    )


def parse_record_access_control_point(data: bytes) -> RacpMessage:
    """Bytes of a 0x2A52 value (a request or a response) → the message; `GattParseError` if malformed."""
    r = Reader(data, CHARACTERISTIC)
    op_code = enum_or_int(RacpOpCode, r.u8("op code (uint8)"))
    if not isinstance(op_code, RacpOpCode):
        raise r.fail("an op code 1…6", f"{op_code}", offset=0)
    operator = enum_or_int(RacpOperator, r.u8("operator (uint8)"))
    if not isinstance(operator, RacpOperator):
        raise r.fail("an operator 0…6", f"{operator}", offset=1)
    message: RacpMessage
    if op_code in (RacpOpCode.NUMBER_OF_STORED_RECORDS_RESPONSE, RacpOpCode.RESPONSE_CODE):
        if operator != RacpOperator.NULL:
            raise r.fail("the null operator (0) in a response", f"{int(operator)}", offset=1)
        if op_code == RacpOpCode.NUMBER_OF_STORED_RECORDS_RESPONSE:
            message = RacpNumberOfRecords(count=r.u16("number of records (uint16)"))
        else:
            request = enum_or_int(RacpOpCode, r.u8("request op code (uint8)"))
            code = enum_or_int(RacpResponseCode, r.u8("response code value (uint8)"))
            message = RacpResponse(request_op_code=request, response_code=code)
    elif operator in _FILTERED:
        filter_type = enum_or_int(RacpFilterType, r.u8("filter type (uint8)"))
        if not isinstance(filter_type, RacpFilterType):
            raise r.fail("filter type 1 (sequence number) or 2 (user facing time)", f"{filter_type}", offset=2)
        first = _read_filter_value(r, filter_type)
        if operator == RacpOperator.WITHIN_RANGE_OF:
            low, high = first, _read_filter_value(r, filter_type)
        elif operator == RacpOperator.GREATER_THAN_OR_EQUAL_TO:
            low, high = first, None
        else:
            low, high = None, first
        message = RacpRequest(op_code=op_code, operator=operator, filter_type=filter_type, minimum=low, maximum=high)
    else:
        message = RacpRequest(op_code=op_code, operator=operator)
    r.end()
    return message


def _read_filter_value(r: Reader, filter_type: RacpFilterType) -> FilterValue:
    if filter_type == RacpFilterType.SEQUENCE_NUMBER:
        return r.u16("sequence number (uint16)")
    return r.date_time("user facing time (Date Time)")


def encode_record_access_control_point(message: RacpMessage) -> bytes:
    """A request or response → bytes; `GattEncodeError` if its fields do not fit its operator."""
    w = Writer(CHARACTERISTIC)
    if isinstance(message, RacpNumberOfRecords):
        w.u8(RacpOpCode.NUMBER_OF_STORED_RECORDS_RESPONSE, "op_code")
        w.u8(RacpOperator.NULL, "operator")
        w.u16(message.count, "count")
    elif isinstance(message, RacpResponse):
        w.u8(RacpOpCode.RESPONSE_CODE, "op_code")
        w.u8(RacpOperator.NULL, "operator")
        w.u8(message.request_op_code, "request_op_code")
        w.u8(message.response_code, "response_code")
    elif isinstance(message, RacpRequest):
        _encode_request(w, message)
    else:
        raise w.fail("message", f"expected RacpRequest, RacpNumberOfRecords or RacpResponse, got {message!r}")
    return w.getvalue()


def _encode_request(w: Writer, m: RacpRequest) -> None:
    if m.op_code not in _REQUESTS:
        raise w.fail("op_code", f"{m.op_code!r} is not a request; use RacpNumberOfRecords or RacpResponse")
    operator = enum_or_int(RacpOperator, m.operator) if isinstance(m.operator, int) else m.operator
    if not isinstance(operator, RacpOperator):
        raise w.fail("operator", f"{m.operator!r} is not an operator 0…6")
    wants_min = m.operator in (RacpOperator.GREATER_THAN_OR_EQUAL_TO, RacpOperator.WITHIN_RANGE_OF)
    wants_max = m.operator in (RacpOperator.LESS_THAN_OR_EQUAL_TO, RacpOperator.WITHIN_RANGE_OF)
    for field, value, wanted in (("minimum", m.minimum, wants_min), ("maximum", m.maximum, wants_max)):
        if (value is not None) != wanted:
            raise w.fail(field, f"{'required' if wanted else 'not allowed'} with operator {operator.name}")
    if (m.filter_type is not None) != (m.operator in _FILTERED):
        raise w.fail("filter_type", f"give it exactly when the operator is one of {[o.name for o in _FILTERED]}")
    w.u8(m.op_code, "op_code")
    w.u8(m.operator, "operator")
    if m.filter_type is None:
        return
    if not isinstance(enum_or_int(RacpFilterType, m.filter_type), RacpFilterType):
        raise w.fail("filter_type", f"{m.filter_type!r} is not 1 (sequence number) or 2 (user facing time)")
    w.u8(m.filter_type, "filter_type")
    for field, value in (("minimum", m.minimum), ("maximum", m.maximum)):
        if value is None:
            continue
        if m.filter_type == RacpFilterType.SEQUENCE_NUMBER:
            if isinstance(value, DateTime):
                raise w.fail(field, "a sequence number filter takes an int")
            w.u16(value, field)
        else:
            if not isinstance(value, DateTime):
                raise w.fail(field, "a user facing time filter takes a DateTime")
            w.date_time(value, field)
