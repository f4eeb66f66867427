"""meterproxy: a reverse proxy that meters, prices and records LLM API usage.

Data flows one way::

    cli -> settings -> app -> proxy -> routing -> upstream
                              proxy -> tap (sse -> provider parser) -> Usage
                              Usage -> pricing -> meter -> store writer | metrics | budgets
    read side: api, dashboard -> store queries
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
