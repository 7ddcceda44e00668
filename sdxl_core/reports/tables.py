"""Markdown tables: the one builder every report and summary uses."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence


def cell(value) -> str:
    """A value as a table cell: "-" for nothing, floats to 2 decimals, text on one line with "|" escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")  # a literal "|" would end the cell early


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table (no trailing newline); format numbers that need other precision before passing them."""
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
