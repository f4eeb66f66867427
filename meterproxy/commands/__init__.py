"""Subcommands of the ``meterproxy`` CLI, one module each (see `meterproxy.cli`)."""
