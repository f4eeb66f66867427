"""How long a test waits for a state it expects: a row committed, a delivery, a session closed.

A bound, not a pace: each wait returns as soon as its condition holds, so the bound only
costs time when the test is failing anyway. It has to cover a machine that runs the suite
beside other work (CI has seen a connect to 127.0.0.1 take over 5 s, `tests/helpers/sdk.py`),
so it is generous. A test whose meaning is a time bound ("within a second") sets its own.
"""

from __future__ import annotations

WAIT_S = 60.0
