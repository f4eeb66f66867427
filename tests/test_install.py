"""What ``pip install meterproxy`` brings, and that a SQLite user needs nothing more.

psycopg (PostgreSQL) and apsw (a current SQLite for exports) are extras, not
dependencies; the package then has to work without them, which is checked in
a child process where importing either fails as it would where they are not
installed: migrations, the writer, a summary and an export through the real
child process (whose two drivers write the same bytes: ``tests/test_export.py``).
The test doubles' recorded bodies ship inside the package.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import meterproxy
from meterproxy.testing import FIXTURES_DIR, load_fixture

ROOT = Path(__file__).resolve().parent.parent


def test_the_plain_install_pulls_neither_driver() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("[")[0].split(";")[0].strip().lower() for d in project["dependencies"]]
    assert not {"psycopg", "psycopg-binary", "psycopg-pool", "apsw", "sqlite-utils"} & set(names)
    extras = project["optional-dependencies"]
    assert any(d.startswith("psycopg[binary,pool]") for d in extras["postgres"])
    assert any(d.startswith("apsw") for d in extras["apsw"])
    # The tests exercise both engines and both export drivers.
    assert any("postgres" in d and "apsw" in d for d in extras["test"] if d.startswith("meterproxy["))


SQLITE_ONLY = """
import asyncio, sys
for name in ("psycopg", "psycopg_pool", "apsw"):
    sys.modules[name] = None  # as if not installed
from meterproxy.store.export_process import ExportProcess
from meterproxy.store.queries import RequestFilter, read_connection
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import Usage

db = sys.argv[1]
writer = StoreWriter(db)
writer.start()
for i in range(5):
    writer.submit(make_record(usage=Usage(input_tokens=10 + i, output_tokens=1)))
assert writer.close()
conn = read_connection(db)
totals = summarize(conn, SummaryQuery(RequestFilter(), ["model"])).totals
conn.close()

async def export() -> bytes:
    proc = await ExportProcess.start(db, RequestFilter(), "csv")
    out = b""
    while chunk := await proc.read():
        out += chunk
    await proc.close()
    return out

lines = asyncio.run(export()).count(b"\\r\\n")
print(totals["requests"], totals["input_tokens"], lines)
"""


def test_sqlite_needs_neither_psycopg_nor_apsw(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SQLITE_ONLY, str(tmp_path / "m.db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", str(10 + 11 + 12 + 13 + 14), "5"]


def test_the_test_doubles_replay_bodies_shipped_in_the_package() -> None:
    package = Path(meterproxy.__file__).resolve().parent
    assert FIXTURES_DIR.is_relative_to(package)
    assert load_fixture("openai_chat_json").body.startswith(b"{")
