"""The GATT Date Time field (org.bluetooth.characteristic.date_time, 7 bytes), used as a timestamp by the
health profiles: year uint16 (1582…9999, 0 = not known), month uint8 (1…12, 0 = not known), day uint8
(1…31, 0 = not known), hours, minutes, seconds uint8. It carries no time zone: it is the device's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DATE_TIME_SIZE = 7


@dataclass(frozen=True, slots=True)
class DateTime:
    """A device timestamp as sent; 0 in year, month or day means "not known" (the spec's own encoding)."""

    year: int = 0
    month: int = 0
    day: int = 0
    hours: int = 0
    minutes: int = 0
    seconds: int = 0

    @property
    def is_complete(self) -> bool:
        """True when year, month and day are all known."""
        return bool(self.year and self.month and self.day)

    def to_datetime(self) -> datetime | None:
        """A naive `datetime` (device-local time), or None when the year, month or day is not known."""
        if not self.is_complete:
            return None
        return datetime(self.year, self.month, self.day, self.hours, self.minutes, self.seconds)

    @classmethod
    def from_datetime(cls, moment: datetime) -> DateTime:
        """The Date Time of a `datetime`, to the second (microseconds and time zone are dropped)."""
        return cls(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)


def date_time_problem(value: DateTime) -> str | None:
    """Why `value` is not a valid Date Time, or None. Shared by the parser and the encoder."""
    fields = (value.year, value.month, value.day, value.hours, value.minutes, value.seconds)
    if any(isinstance(f, bool) or not isinstance(f, int) for f in fields):
        return "every Date Time field must be an integer"
    if value.year != 0 and not 1582 <= value.year <= 9999:
        return f"year {value.year} (1582…9999, or 0 for not known)"
    if not 0 <= value.month <= 12:
        return f"month {value.month} (1…12, or 0 for not known)"
    if not 0 <= value.day <= 31:
        return f"day {value.day} (1…31, or 0 for not known)"
    if not 0 <= value.hours <= 23:
        return f"hours {value.hours} (0…23)"
    if not 0 <= value.minutes <= 59:
        return f"minutes {value.minutes} (0…59)"
    if not 0 <= value.seconds <= 59:
        return f"seconds {value.seconds} (0…59)"
    if value.is_complete:
        try:
            value.to_datetime()
        except ValueError:
            return f"{value.year:04d}-{value.month:02d}-{value.day:02d} is not a calendar date"
    return None
