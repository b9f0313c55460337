"""Query parameter types whose OpenAPI schema says exactly what they accept."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BeforeValidator

__all__ = ["IsoDateTime"]

# A date, "T" (or a space), and a time; pydantic checks the rest of the text.
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _date_time_text(value: Any) -> Any:
    # pydantic also reads a number as seconds since the epoch and a bare date as its
    # midnight, which OpenAPI's "format: date-time" does not allow: "?since=0.5" must
    # be refused, not read as 1970.
    if not isinstance(value, datetime) and not (isinstance(value, str) and _DATE_TIME.match(value)):
        raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z")
    return value


# A date-time query parameter (OpenAPI "format: date-time"): ISO 8601 text with a time.
IsoDateTime = Annotated[datetime, BeforeValidator(_date_time_text)]
