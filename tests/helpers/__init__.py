"""Helpers the tests share, kept apart from the ``test_*`` modules so no test imports another.

- `pg`: a fresh database per test on the real PostgreSQL at 127.0.0.1:5432.
- `prom`: a real Prometheus server scraping the in-process proxy.
- `budgets`: a real webhook receiver, record insertion and polling for the budget tests.
- `replicas`: several real ``meterproxy serve`` processes sharing one store.
- `browser`: one Chromium for the session, a fresh context per test.
- `waits`: how long a test waits for a state it expects (`WAIT_S`).
- `userdirs`: the real user's home and XDG directories kept out of every test.
"""
