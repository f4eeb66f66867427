"""SQLite-dialect SQL -> PostgreSQL SQL: the one translation every statement goes through.

The store's SQL is written once, in the SQLite dialect with ``?`` placeholders,
by whoever owns the feature (queries, rollups, budgets, imports). On
PostgreSQL each statement passes through `translate` once (the result is
cached by text) before psycopg sees it. The translation works on tokens, never
on raw text, so nothing inside a string literal or a quoted name is touched:

- ``?`` -> ``%s`` (and ``:name`` -> ``%(name)s``); a literal ``%`` -> ``%%``;
- ``user`` -> ``"user"`` (a reserved word in PostgreSQL, where bare ``user``
  silently means CURRENT_USER), and ``offset``/``limit`` where they name a column;
- ``instr(`` -> ``strpos(``, ``json_object(`` -> ``json_build_object(``;
- ``printf('<literal format>', ...)`` -> a ``||`` concatenation;
- ``sum(<comparison>)`` -> ``sum(CAST((<comparison>) AS INT4))``;
- ``WHERE 1`` -> ``WHERE TRUE``, and an integer flag used as a condition
  (``CASE WHEN streamed THEN``) -> ``streamed <> 0``;
- a unary ``+`` before a column (SQLite's "don't use an index here") is dropped;
- ``INSERT OR IGNORE`` -> ``INSERT ... ON CONFLICT DO NOTHING``;
  ``INSERT OR REPLACE`` -> ``INSERT ... ON CONFLICT (<primary key>) DO UPDATE``
  (the connection fills in the key, see `Translated.replace_table`);
- ``BEGIN IMMEDIATE|EXCLUSIVE`` -> ``BEGIN ISOLATION LEVEL SERIALIZABLE``:
  SQLite serializes writers with its file lock; SERIALIZABLE gives the same
  guarantee across replicas (the writer retries serialization failures).
  A plain ``BEGIN`` (a reader's snapshot) -> ``REPEATABLE READ``, which never
  fails a read-only transaction;
- ``PRAGMA ...`` -> nothing (`Translated.noop`);
- ``CREATE TRIGGER ... BEGIN <statements>; END`` -> a plpgsql trigger function
  (the statements translated one by one) and a ``FOR EACH ROW`` trigger;
- DDL: ``INTEGER`` -> ``BIGINT`` (costs in picodollars overflow int4),
  ``INTEGER PRIMARY KEY`` -> an identity column, ``REAL`` -> ``DOUBLE PRECISION``,
  ``BLOB`` -> ``BYTEA``, ``WITHOUT ROWID``/``AUTOINCREMENT`` dropped; and a table
  that SQLite would give an implicit ``rowid`` gets a real ``rowid`` identity
  column, so ``rowid`` queries (rollup watermarks) read the same on both;
  ``TEXT`` columns get ``COLLATE "C"`` so text compares and sorts byte-wise
  as in SQLite (ISO timestamps, keyset cursors), whatever the server's locale.

What cannot be expressed as a token rewrite is provided as SQL functions in
PostgreSQL instead (``ifnull``, ``json_extract``, ``strftime``, ``sum(boolean)``, a
``sqlite_master`` view): see `meterproxy.store.pg_compat`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Translated", "split_statements", "translate"]

_TOKEN = re.compile(
    r"""
    (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\])
  | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<qmark>\?\d*)
  | (?P<named>(?<!:):[A-Za-z_]\w*)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<ws>\s+)
  | (?P<pct>%)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_RENAMED_FUNCTIONS = {"instr": "strpos", "json_object": "json_build_object"}
_QUOTED_WORDS = {"user"}
_DDL_TYPES = {"integer": "BIGINT", "int": "BIGINT", "real": "DOUBLE PRECISION", "blob": "BYTEA"}
_VALUE_END = {"word", "qid", "num", "str", "qmark", "named", "raw"}


@dataclass(frozen=True, slots=True)
class Translated:
    sql: str
    #: The statement does nothing on PostgreSQL (PRAGMA).
    noop: bool = False
    #: For ``INSERT OR REPLACE``: the table whose primary key becomes the conflict target,
    #: and the inserted columns; ``sql`` then holds a ``{conflict}`` slot.
    replace_table: str | None = None
    replace_columns: tuple[str, ...] = ()
    #: Statements to run after ``sql`` (a SQLite trigger becomes a function plus a trigger).
    then: tuple[str, ...] = ()


def _tokens(sql: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(sql)]


def _significant(tokens: list[tuple[str, str]]) -> list[int]:
    return [i for i, (kind, _) in enumerate(tokens) if kind not in ("ws", "comment")]


@lru_cache(maxsize=2048)
def translate(sql: str) -> Translated:
    """The PostgreSQL form of one SQLite-dialect statement (cached)."""
    if "printf" in sql.lower():
        sql = _expand_printf(sql)
    if "sum" in sql.lower():
        sql = _cast_boolean_sums(sql)
    tokens = _tokens(sql)
    sig = _significant(tokens)
    words = [tokens[i][1].lower() if tokens[i][0] == "word" else "" for i in sig]
    if not sig:
        return Translated(sql)
    head = words[0]
    if head == "pragma":
        return Translated("", noop=True)
    if head == "begin":
        if len(words) > 1 and words[1] in ("immediate", "exclusive"):
            return Translated("BEGIN ISOLATION LEVEL SERIALIZABLE")
        return Translated("BEGIN ISOLATION LEVEL REPEATABLE READ")  # a snapshot for reads
    if head in ("commit", "end"):
        return Translated("COMMIT")
    if head == "create" and "trigger" in words[1:4]:
        return _translate_trigger(sql)
    ddl = head in ("create", "alter") and len(words) > 1 and words[1] in ("table", "temp", "temporary")

    out: list[str] = []
    suffix = ""
    replace_table: str | None = None
    replace_columns: tuple[str, ...] = ()
    skip: set[int] = set()
    if head == "insert" and len(words) > 2 and words[1] == "or" and words[2] in ("ignore", "replace"):
        skip.update(range(sig[1], sig[3]))  # "OR IGNORE " and its spaces
        if words[2] == "ignore":
            suffix = " ON CONFLICT DO NOTHING"
        else:
            replace_table, replace_columns = _insert_target(tokens, sig)
            suffix = " {conflict}"
    if ddl and head == "create":
        _rewrite_create_table(tokens, sig, words)
    _alias_subqueries(tokens, sig)
    if head == "insert":
        _qualify_upsert_columns(tokens, sig, words)

    prev_kind = ""
    prev_text = ""
    for pos, (kind, text) in enumerate(tokens):
        if pos in skip:
            continue
        if kind == "qmark":
            text = "%s"
        elif kind == "named":
            text = f"%({text[1:]})s"
        elif kind == "pct":
            text = "%%"
        elif kind == "str" or kind == "comment":
            text = text.replace("%", "%%")
        elif kind == "qid" and text[0] in "`[":
            text = '"' + text[1:-1] + '"'
        elif (
            kind in ("word", "qid")
            and _is_bare_condition(tokens, pos, prev_text)
            and (text.lower() not in _CONDITION_WORDS)
        ):
            # SQLite's integer flags as conditions ("WHEN streamed THEN"): PostgreSQL wants a boolean
            text = ('"user"' if text.lower() == "user" else text) + " <> 0"
        elif kind == "word":
            low = text.lower()
            if low in _QUOTED_WORDS or (low in _CONTEXT_RESERVED and _is_identifier(tokens, pos, prev_text)):
                text = f'"{low}"'
            elif low in _RENAMED_FUNCTIONS and _next_is(tokens, pos, "("):
                text = _RENAMED_FUNCTIONS[low]
            elif low in _DDL_TYPES and ((ddl and prev_kind in ("word", "qid")) or prev_text.lower() == "as"):
                text = _DDL_TYPES[low]
            elif low == "text" and ddl and prev_kind in ("word", "qid") and prev_text.lower() != "as":
                text = 'TEXT COLLATE "C"'  # compare bytes, as SQLite does, whatever the locale
            elif ddl and low in ("autoincrement",):
                text = ""
        elif kind == "num" and text in ("0", "1") and _is_bare_condition(tokens, pos, prev_text):
            text = "TRUE" if text == "1" else "FALSE"  # "WHERE 1": PostgreSQL wants a boolean
        elif kind == "other" and text == "+" and _is_unary(prev_kind, prev_text):
            text = ""  # SQLite's "+column" (keep the index out); means nothing in PostgreSQL
        if kind not in ("ws", "comment"):
            prev_kind, prev_text = kind, text
        out.append(text)
    translated = "".join(out).rstrip().rstrip(";")
    if ddl:
        translated = re.sub(r"\)\s*WITHOUT\s+ROWID\s*$", ")", translated, flags=re.IGNORECASE)
    if suffix:
        translated = _add_suffix(translated, suffix)
    return Translated(translated, replace_table=replace_table, replace_columns=replace_columns)


# After these keywords a "+" is unary (so "SELECT +ts", "WHERE +ts >= ?", "AND +x").
_KEYWORDS_BEFORE_VALUE = {
    "select",
    "where",
    "and",
    "or",
    "not",
    "on",
    "by",
    "when",
    "then",
    "else",
    "having",
    "set",
    "return",
    "in",
    "between",
    "like",
    "is",
}


# A word after a subquery's ")" that is a clause, not its alias.
_NOT_ALIAS = {
    "where", "group", "order", "limit", "offset", "join", "left", "right", "inner", "outer", "cross",
    "full", "natural", "on", "using", "union", "intersect", "except", "having", "window", "returning",
}  # fmt: skip


def _alias_subqueries(tokens: list[tuple[str, str]], sig: list[int]) -> None:
    """``FROM (SELECT ...)`` needs an alias in PostgreSQL (before 16); SQLite does not."""
    count = 0
    for n, i in enumerate(sig[:-2]):
        if tokens[i][1].lower() not in ("from", "join") or tokens[sig[n + 1]][1] != "(":
            continue
        if tokens[sig[n + 2]][1].lower() not in ("select", "with", "values"):
            continue
        depth = 0
        for m in range(n + 1, len(sig)):
            text = tokens[sig[m]][1]
            depth += text == "("
            depth -= text == ")"
            if depth == 0:
                following = tokens[sig[m + 1]] if m + 1 < len(sig) else ("", "")
                if following[0] not in ("word", "qid") or following[1].lower() in _NOT_ALIAS:
                    count += 1
                    tokens[sig[m]] = ("raw", f") AS _subquery{count}")
                break


_EXPR_WORDS = {
    "and", "or", "not", "null", "case", "when", "then", "else", "end", "is", "true", "false", "in",
    "between", "like", "distinct", "from", "as", "cast", "excluded", "where", "returning", "set",
}  # fmt: skip


def _qualify_upsert_columns(tokens: list[tuple[str, str]], sig: list[int], words: list[str]) -> None:
    """``DO UPDATE SET n = n + excluded.n``: PostgreSQL wants the left ``n`` as ``table.n``."""
    try:
        into = words.index("into")
        start = next(n for n in range(len(words) - 2) if words[n : n + 3] == ["do", "update", "set"])
    except (ValueError, StopIteration):
        return
    table = tokens[sig[into + 1]][1]
    in_value = False
    for n in range(start + 3, len(sig)):
        kind, text = tokens[sig[n]]
        low = text.lower()
        if low in ("where", "returning"):
            return
        if text == "=":
            in_value = True
        elif text == ",":
            in_value = False
        elif in_value and kind == "word" and low not in _EXPR_WORDS:
            before = tokens[sig[n - 1]][1]
            after = tokens[sig[n + 1]][1] if n + 1 < len(sig) else ""
            if before != "." and after not in ("(", "."):
                tokens[sig[n]] = ("raw", f"{table}.{text}")


_TRIGGER = re.compile(
    r"^\s*CREATE\s+TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>\w+)\s+(?P<when>AFTER|BEFORE)\s+"
    r"(?P<event>INSERT|DELETE|UPDATE(?:\s+OF\s+[\w\s,]+?)?)\s+ON\s+(?P<table>\w+)\s+"
    r"(?:FOR\s+EACH\s+ROW\s+)?BEGIN\s+(?P<body>.*);\s*END\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)


def _translate_trigger(sql: str) -> Translated:
    """SQLite ``CREATE TRIGGER t AFTER INSERT ON x BEGIN ...; END`` -> a plpgsql function and a trigger."""
    match = _TRIGGER.match(sql)
    if match is None:
        raise ValueError(f"cannot translate this trigger for PostgreSQL: {sql[:80]!r}")
    name, table = match["name"], match["table"]
    body = "; ".join(translate(part).sql for part in split_statements(match["body"]))
    function = (
        f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $trigger$ "
        f"BEGIN {body}; RETURN NULL; END $trigger$"
    )
    trigger = (
        f"CREATE TRIGGER {name} {match['when'].upper()} {match['event'].upper()} ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {name}_fn()"
    )
    return Translated(function, then=(trigger,))


def split_statements(body: str) -> list[str]:
    """Statements of a script, split at ``;`` outside literals and quoted names."""
    parts: list[str] = []
    current: list[str] = []
    for kind, text in _tokens(body):
        if kind == "other" and text == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(text)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


_BOOLEAN_OPERATORS = {"=", "<", ">", "!"}
_BOOLEAN_WORDS = {"is", "and", "or", "not", "like", "in", "between", "glob", "exists"}


def _cast_boolean_sums(sql: str) -> str:
    """``sum(a >= b)`` -> ``sum(CAST((a >= b) AS INT4))``: PostgreSQL's native integer sum.

    (The ``sum(boolean)`` aggregate in `pg_compat` would work too, but runs a SQL
    function per row: about 3x slower over a large table.)
    """
    tokens = _tokens(sql)
    out: list[str] = []
    pos = 0
    while pos < len(tokens):
        kind, text = tokens[pos]
        if kind == "word" and text.lower() == "sum" and _next_is(tokens, pos, "("):
            args, end = _call_args(tokens, pos)
            if len(args) == 1 and _is_boolean(args[0]):
                out.append(f"{text}(CAST(({args[0].strip()}) AS INT4))")
                pos = end + 1
                continue
        out.append(text)
        pos += 1
    return "".join(out)


def _is_boolean(expr: str) -> bool:
    depth = 0
    significant = [(k, t) for k, t in _tokens(expr) if k not in ("ws", "comment")]
    if not significant or significant[0][1].lower() in ("case", "distinct"):
        return False
    for kind, text in significant:
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
        elif depth == 0 and (
            (kind == "other" and text in _BOOLEAN_OPERATORS)
            or (kind == "word" and text.lower() in _BOOLEAN_WORDS)
        ):
            return True
    return False


_PRINTF_SPEC = re.compile(r"%([swdq%])")


def _expand_printf(sql: str) -> str:
    """``printf('"%w",%s', a, b)`` -> the same line as a ``||`` concatenation (no printf in PostgreSQL).

    Only a literal format with ``%s %d %w %q %%`` is expanded (what the export uses);
    a NULL argument prints as empty text, as in SQLite.
    """
    tokens = _tokens(sql)
    out: list[str] = []
    pos = 0
    while pos < len(tokens):
        kind, text = tokens[pos]
        if not (kind == "word" and text.lower() == "printf" and _next_is(tokens, pos, "(")):
            out.append(text)
            pos += 1
            continue
        args, end = _call_args(tokens, pos)
        fmt = args[0].strip() if args else ""
        if not (fmt.startswith("'") and fmt.endswith("'")):
            out.append(text)
            pos += 1
            continue
        parts: list[str] = []
        literal = fmt[1:-1].replace("''", "'")
        values = iter(args[1:])
        last = 0
        for match in _PRINTF_SPEC.finditer(literal):
            if match.start() > last:
                parts.append(_sql_literal(literal[last : match.start()]))
            spec = match.group(1)
            if spec == "%":
                parts.append("'%'")
            else:
                value = f"coalesce(CAST(({next(values)}) AS TEXT), '')"
                if spec == "w":
                    value = f"replace({value}, '\"', '\"\"')"
                elif spec == "q":
                    value = f"replace({value}, , '')"
                parts.append(value)
            last = match.end()
        if last < len(literal):
            parts.append(_sql_literal(literal[last:]))
        out.append("(" + (" || ".join(parts) or "''") + ")")
        pos = end + 1
    return "".join(out)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _call_args(tokens: list[tuple[str, str]], pos: int) -> tuple[list[str], int]:
    """The top-level argument texts of the call whose name is at ``pos``, and the index of its ``)``."""
    args: list[str] = []
    current: list[str] = []
    depth = 0
    for i in range(pos + 1, len(tokens)):
        kind, text = tokens[i]
        if text == "(" and kind == "other":
            depth += 1
            if depth == 1:
                continue
        elif text == ")" and kind == "other":
            depth -= 1
            if depth == 0:
                args.append("".join(current))
                return args, i
        elif text == "," and kind == "other" and depth == 1:
            args.append("".join(current))
            current = []
            continue
        if depth >= 1:
            current.append(text)
    return args, len(tokens) - 1


def _is_unary(prev_kind: str, prev_text: str) -> bool:
    if prev_kind == "word":
        return prev_text.lower() in _KEYWORDS_BEFORE_VALUE
    return prev_kind not in _VALUE_END and prev_text != ")"


# PostgreSQL keywords that SQLite lets tables use as column names ("offset" in import_files):
# quoted where they stand as a column, left alone in "LIMIT ? OFFSET ?".
_CONTEXT_RESERVED = {"offset", "limit"}
_IDENT_BEFORE = {"(", ",", ".", "select", "set", "by", "where", "and", "or", "on", "distinct"}
_IDENT_AFTER = {",", ")", "=", "<", ">", "<=", ">=", "!=", "<>", "+", "-", "text", "integer", "real"}


def _is_identifier(tokens: list[tuple[str, str]], pos: int, prev_text: str) -> bool:
    following = ""
    for kind, value in tokens[pos + 1 :]:
        if kind not in ("ws", "comment"):
            following = value.lower()
            break
    return prev_text.lower() in _IDENT_BEFORE or following in _IDENT_AFTER


_CONDITION_BEFORE = {"where", "and", "or", "not", "having", "when", "on"}
_CONDITION_WORDS = {"true", "false", "null", "exists", "not", "select"}
_CONDITION_AFTER = {"", ")", "and", "or", "order", "group", "limit", "having", "union", "then", "returning"}


def _is_bare_condition(tokens: list[tuple[str, str]], pos: int, prev_text: str) -> bool:
    if prev_text.lower() not in _CONDITION_BEFORE:
        return False
    following = ""
    for kind, value in tokens[pos + 1 :]:
        if kind not in ("ws", "comment"):
            following = value.lower()
            break
    return following in _CONDITION_AFTER


def _next_is(tokens: list[tuple[str, str]], pos: int, text: str) -> bool:
    for kind, value in tokens[pos + 1 :]:
        if kind in ("ws", "comment"):
            continue
        return value == text
    return False


def _insert_target(tokens: list[tuple[str, str]], sig: list[int]) -> tuple[str, tuple[str, ...]]:
    """Table and column list of ``INSERT OR REPLACE INTO t (a, b) ...``."""
    values = [tokens[i] for i in sig]
    # INSERT OR REPLACE INTO <table> ( cols )
    table = values[4][1].strip('"')
    columns: list[str] = []
    if len(values) > 5 and values[5][1] == "(":
        for kind, text in values[6:]:
            if text == ")":
                break
            if kind in ("word", "qid"):
                columns.append(text.strip('"'))
    return table, tuple(columns)


def _add_suffix(sql: str, suffix: str) -> str:
    match = re.search(r"\sRETURNING\s", sql, flags=re.IGNORECASE)
    if match:
        return sql[: match.start()] + suffix + sql[match.start() :]
    return sql + suffix


def _rewrite_create_table(tokens: list[tuple[str, str]], sig: list[int], words: list[str]) -> None:
    """``INTEGER PRIMARY KEY`` -> identity; an implicit-rowid table gets a ``rowid`` column."""
    has_int_pk = False
    for n in range(len(sig) - 2):
        if words[n] in ("integer", "int") and words[n + 1] == "primary" and words[n + 2] == "key":
            tokens[sig[n]] = ("raw", "BIGINT GENERATED BY DEFAULT AS IDENTITY")
            has_int_pk = True
    text = " ".join(w for w in words if w)
    without_rowid = "without rowid" in text
    if has_int_pk or without_rowid or "as" in words[:6]:
        return
    # Last, so positional "INSERT INTO t VALUES (...)" still lines up with the declared columns.
    depth = 0
    for i in sig:
        text = tokens[i][1]
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
            if depth == 0:
                tokens[i] = ("raw", ", rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE)")
                return
