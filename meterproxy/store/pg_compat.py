"""SQLite functions the store's SQL uses, defined in PostgreSQL so the same statements run there.

`meterproxy.store.pg_sql` rewrites what a token rewrite can express; what it
cannot (a function whose semantics differ, an aggregate over booleans) is
defined here once, in the database, by the first migration PostgreSQL applies
(``meterproxy.pg`` set, before the core set). Each definition is
``CREATE OR REPLACE``, so a newer meterproxy can refine one by adding a
migration that re-runs it.

- ``ifnull(a, b)``, including SQLite's mixed "number or ``''``";
- ``json_extract(text, '$.k' | '$."k"')`` -> the value as text (what SQLite
  returns for the string values ``tags`` holds);
- ``strftime(fmt, text)`` for the formats the code uses (``%s`` unix seconds,
  ``%Y %m %d %H %M %S %f %j %%``; ``'now'`` is the statement's time, UTC);
- ``sum(boolean)``: SQLite sums comparisons as 0/1 (``sum(status >= 400)``);
- ``json(text)`` (text -> json, kept verbatim) and ``json_group_array(x)``
  (a JSON array as text); ``json_object`` is renamed to ``json_build_object``
  by the translation, and JSON values are read back as text, as from SQLite;
- ``iif(cond, a, b)`` (cond boolean, or an integer flag);
- ``sqlite_master``: a view listing tables, for "does this table exist yet" checks.
"""

from __future__ import annotations

__all__ = ["COMPAT_SQL", "COMPAT_SQL_2"]

COMPAT_SQL: list[str] = [
    # ifnull: SQLite is dynamically typed (ifnull(status, '') is fine there); the text overloads
    # cover "number or empty text", which PostgreSQL's coalesce refuses.
    r"""
    CREATE OR REPLACE FUNCTION ifnull(a anycompatible, b anycompatible) RETURNS anycompatible
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(a, b) $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION ifnull(a text, b text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(a, b) $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION ifnull(a bigint, b text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(a::text, b) $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION ifnull(a double precision, b text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(a::text, b) $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION ifnull(a numeric, b text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(a::text, b) $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION json_extract(doc text, path text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
      SELECT CASE
        WHEN doc IS NULL OR path IS NULL THEN NULL
        WHEN path = '$' THEN doc
        WHEN path LIKE '$."%"' THEN
          doc::jsonb ->> replace(substr(path, 4, length(path) - 4), '""', '"')
        ELSE doc::jsonb #>> string_to_array(substr(path, 3), '.')
      END
    $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION sqlite_ts(value text) RETURNS timestamp
    LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
      SELECT CASE WHEN lower(value) = 'now' THEN statement_timestamp() AT TIME ZONE 'UTC'
                  ELSE value::timestamp END
    $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION strftime(fmt text, value text) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
      SELECT CASE
        WHEN value IS NULL OR fmt IS NULL THEN NULL
        WHEN fmt = '%s' THEN floor(extract(epoch FROM sqlite_ts(value)))::bigint::text
        ELSE replace(replace(replace(replace(replace(replace(replace(replace(replace(
               replace(fmt, '%%', chr(1)),
               '%Y', to_char(sqlite_ts(value), 'YYYY')),
               '%m', to_char(sqlite_ts(value), 'MM')),
               '%d', to_char(sqlite_ts(value), 'DD')),
               '%H', to_char(sqlite_ts(value), 'HH24')),
               '%M', to_char(sqlite_ts(value), 'MI')),
               '%f', to_char(sqlite_ts(value), 'SS.MS')),
               '%S', to_char(sqlite_ts(value), 'SS')),
               '%j', to_char(sqlite_ts(value), 'DDD')),
               chr(1), '%')
      END
    $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION sqlite_bool_sum(acc bigint, value boolean) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
      SELECT coalesce(acc, 0) + coalesce(value::int, 0)
    $fn$
    """,
    r"""
    DO $do$ BEGIN
      IF NOT EXISTS (
        SELECT 1 FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid
        WHERE p.proname = 'sum' AND p.proargtypes = '16'::oidvector
      ) THEN
        CREATE AGGREGATE sum(boolean) (SFUNC = sqlite_bool_sum, STYPE = bigint);
      END IF;
    END $do$
    """,
    r"""
    CREATE OR REPLACE FUNCTION json(value text) RETURNS json
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT value::json $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION sqlite_json_array(items anycompatiblearray) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT coalesce(array_to_json(items)::text, '[]') $fn$
    """,
    r"""
    DO $do$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'json_group_array') THEN
        CREATE AGGREGATE json_group_array(anycompatible) (
          SFUNC = array_append, STYPE = anycompatiblearray, FINALFUNC = sqlite_json_array, INITCOND = '{}'
        );
      END IF;
    END $do$
    """,
    r"""
    CREATE OR REPLACE VIEW sqlite_master AS
      SELECT CASE WHEN table_type = 'VIEW' THEN 'view' ELSE 'table' END::text AS type,
             table_name::text AS name, table_name::text AS tbl_name, NULL::text AS sql
      FROM information_schema.tables WHERE table_schema = current_schema()
    """,
]

#: Added after the first set (applied by migration ``m002`` of ``meterproxy.pg``).
COMPAT_SQL_2: list[str] = [
    r"""
    CREATE OR REPLACE FUNCTION iif(cond boolean, a anycompatible, b anycompatible) RETURNS anycompatible
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT CASE WHEN cond THEN a ELSE b END $fn$
    """,
    r"""
    CREATE OR REPLACE FUNCTION iif(cond bigint, a anycompatible, b anycompatible) RETURNS anycompatible
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT CASE WHEN cond <> 0 THEN a ELSE b END $fn$
    """,
]
