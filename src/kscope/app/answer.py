"""One question's answer, the unit of the verdict block (``verdicts.answers``)."""

from __future__ import annotations

from dataclasses import dataclass

from kscope.app.tables import ci
from kscope.stats import Interval


@dataclass
class Answer:
    """One question's answer: ``says`` is the verdict as its table cell says it ("features better", "inconclusive",
    "equivalent within ±0.1", ...); ``diff`` the number it rests on (features − the other units) with its interval;
    ``figure`` the report's figure for it; ``table`` the heading of the table holding the numbers."""

    key: str
    question: str
    sentence: str
    says: str
    diff: Interval | None = None
    figure: str | None = None
    table: str | None = None


def short_ci(iv: Interval | None, spec: str = "+.2f") -> str:
    return ci(iv, spec)  # two decimals in a sentence
