"""One timeout for every official SDK client the tests build.

The SDKs' default connect timeout is 5 s (``openai`` and ``anthropic`` both use
``Timeout(600, connect=5)``). On a machine running the suite beside other work a
connect to 127.0.0.1 has been seen to take longer than that (CI failed with
``APITimeoutError`` from ``ConnectTimeout`` in test_pricing_coverage), so test
clients wait as long as the suite's own waits do. No test relies on an SDK
timeout firing.
"""

from __future__ import annotations

SDK_TIMEOUT = 120.0
