"""A row of the smoke: one check of one model over one protocol, and how it came out."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

LOAD = "load"  # the check every selected model gets first (not per protocol)


class CheckStatus(Enum):
    PASS = "pass"
    FAIL = "FAIL"
    SKIP = "skipped"


@dataclass(frozen=True)
class SmokeRow:
    """One check of one model over one protocol ("-" when the check is not per protocol)."""

    check: str
    protocol: str
    model: str
    status: CheckStatus
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status is not CheckStatus.FAIL
